//! Connections between sidecars: [`quic`] (HTTP/3, the default) and [`tcp`] (TLS + HTTP/2),
//! each with its server side and its client connection pool.

pub mod quic;
pub mod slots;
pub mod tcp;
