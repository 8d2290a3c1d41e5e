//! `cargo bench`: a short run of the TCP-vs-QUIC comparison (`quicar bench --quick`): two
//! scenarios over the emulated link, one round. The full matrix is `quicar bench` (see
//! BENCHMARKS.md). Needs root for the network namespaces; without it, says so and skips.

use std::process::Command;

fn main() {
    // `cargo nextest run --all-targets` lists each target's tests with `--list`: a benchmark
    // has none, and running it then would take minutes (and outlive a cancelled run).
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !quicar::bench::is_root() {
        println!(
            "transport bench skipped: quicar bench needs root (network namespaces and TUN devices)"
        );
        return;
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-quick");
    let status = Command::new(env!("CARGO_BIN_EXE_quicar"))
        .args(["bench", "--quick", "--out"])
        .arg(&out)
        .status()
        .expect("run quicar bench");
    assert!(status.success(), "quicar bench --quick failed: {status}");
}
