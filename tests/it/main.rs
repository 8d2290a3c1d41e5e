//! The integration suite: whole sidecars in-process on real loopback sockets, PKI made at test
//! time, plus the built binary driven as a user would.

#![allow(unreachable_pub)] // test modules share items through `pub`, as tests do.

mod cache;
mod cli;
mod config;
mod deploy;
mod dns;
mod errors;
mod faults;
mod hostile;
mod interim;
mod interop;
mod mtls;
mod process;
mod resilience;
mod support;
mod telemetry;
mod tunnel;
