//! Connections between sidecars. QUIC (HTTP/3) is the transport; [`quic`] holds both its
//! server endpoint and the client connection pool.

pub mod quic;
