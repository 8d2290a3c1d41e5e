#!/usr/bin/env bash
# The production build: a release build optimised with a profile of quicar's own request path
# (profile-guided optimisation, PGO). Writes target/pgo/quicar.
#
#   benches/pgo.sh               # about 14 minutes on 2 cores: two release builds and 1.5 min of load
#
# 1. builds quicar instrumented (`-Cprofile-generate`), in target/pgo/gen;
# 2. trains it on `quicar bench --loopback` (no root, all on 127.0.0.1): a sidecar pair over QUIC
#    and over TCP, small GETs open loop and 16 KiB responses 32 in flight, then small POSTs
#    with 50 in flight. The nodes are stopped with SIGTERM, drain, and write their counts as
#    they exit;
# 3. merges the counts with llvm-profdata (rustup's llvm-tools component, or Debian's
#    llvm-N for the LLVM major version rustc reports) into target/pgo/quicar.profdata;
# 4. builds again with `-Cprofile-use`, in target/pgo/use, and copies the binary to
#    target/pgo/quicar.
#
# The profile says which branches and calls the request path takes, so the compiler inlines and
# lays out code for them: 0.81 x (QUIC) and 0.82 x (TCP) the instructions per request of a plain
# release build with 50 requests in flight (BENCHMARKS.md, "Twenty-second session of round 2").
# The profile is made fresh from the source being built; the build warns "hash mismatch" only for
# functions that changed between the two builds (none when the tree is left alone meanwhile).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/target/pgo
HOST=$(rustc -vV | awk '/^host:/ {print $2}')
LLVM_MAJOR=$(rustc -vV | awk '/^LLVM version:/ {split($3, v, "."); print v[1]}')

profdata=$(rustc --print sysroot)/lib/rustlib/$HOST/bin/llvm-profdata
if [ ! -x "$profdata" ]; then
  profdata=$(command -v "llvm-profdata-$LLVM_MAJOR" || true)
fi
if [ -z "$profdata" ] || [ ! -x "$profdata" ]; then
  echo "benches/pgo.sh needs llvm-profdata for LLVM $LLVM_MAJOR (rustc's):" >&2
  echo "  rustup component add llvm-tools    or    apt-get install llvm-$LLVM_MAJOR" >&2
  exit 1
fi

rm -rf "$OUT/raw" "$OUT/train"
mkdir -p "$OUT/raw" "$OUT/train"
echo "== 1/4 instrumented build (target/pgo/gen)"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$OUT/raw" CARGO_TARGET_DIR=$OUT/gen \
  cargo build --release --locked --bin quicar

echo "== 2/4 training on quicar bench --loopback"
gen=$OUT/gen/release/quicar
"$gen" bench --loopback --rounds 1 --duration 10s --out "$OUT/train/get"
"$gen" bench --loopback --rounds 1 --duration 5s --request-size 1024 \
  --concurrent 50 --concurrent-size 256 --out "$OUT/train/post"
ls "$OUT"/raw/*.profraw >/dev/null

echo "== 3/4 merging the profile ($profdata)"
"$profdata" merge -o "$OUT/quicar.profdata" "$OUT"/raw/*.profraw

echo "== 4/4 optimised build (target/pgo/use)"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$OUT/quicar.profdata" CARGO_TARGET_DIR=$OUT/use \
  cargo build --release --locked --bin quicar
cp "$OUT/use/release/quicar" "$OUT/quicar"
echo "written: target/pgo/quicar (profile: target/pgo/quicar.profdata)"
