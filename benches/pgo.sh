#!/usr/bin/env bash
# The production build: a release build optimised with a profile of quicar's own request path
# (profile-guided optimisation, PGO). Writes target/pgo/quicar.
#
#   benches/pgo.sh               # about 14 minutes on 2 cores: two release builds and 1.5 min of load
#   benches/pgo.sh floor         # the same for benches/floor.rs (target/pgo/floor), trained on
#                                # peerbench's closed loop over both wires: needs ../shared/peerbench
#                                # set up, as benches/callgrind_pair.sh does
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

WHAT=${1:-quicar}
case $WHAT in
  quicar) RAW=$OUT/raw GEN=gen USE=use CARGO_TARGET=(--bin quicar) ;;
  floor) RAW=$OUT/floor-raw GEN=floor-gen USE=floor-use CARGO_TARGET=(--bench floor) ;;
  *) echo "usage: benches/pgo.sh [floor]" >&2; exit 2 ;;
esac

# build DIR PROFILE_FLAG: a release build of $WHAT in $OUT/DIR; prints the executable's path.
build() {
  local dir=$1 flag=$2
  RUSTFLAGS="${RUSTFLAGS:-} $flag" CARGO_TARGET_DIR=$OUT/$dir \
    cargo build --release --locked "${CARGO_TARGET[@]}" >&2
  if [ "$WHAT" = floor ]; then
    # a bench's executable is deps/floor-HASH (the newest, if several)
    ls -t "$OUT/$dir"/release/deps/floor-* | grep -v '\.d$' | head -1
  else
    echo "$OUT/$dir/release/quicar"
  fi
}

rm -rf "$RAW" "$OUT/train"
mkdir -p "$RAW" "$OUT/train"
echo "== 1/4 instrumented build (target/pgo/$GEN)"
gen=$(build "$GEN" "-Cprofile-generate=$RAW")

if [ "$WHAT" = floor ]; then
  echo "== 2/4 training on peerbench's closed loop (benches/callgrind_pair.sh closed)"
  # the script knows the floor by its name; each node writes its counts when SIGTERM ends it
  cp "$gen" "$OUT/train/floor-gen"
  for host in hello hello-tcp; do
    benches/callgrind_pair.sh "$OUT/train/floor-gen" closed "$host"
  done
else
  echo "== 2/4 training on quicar bench --loopback"
  "$gen" bench --loopback --rounds 1 --duration 10s --out "$OUT/train/get"
  "$gen" bench --loopback --rounds 1 --duration 5s --request-size 1024 \
    --concurrent 50 --concurrent-size 256 --out "$OUT/train/post"
fi
ls "$RAW"/*.profraw >/dev/null

echo "== 3/4 merging the profile ($profdata)"
"$profdata" merge -o "$OUT/$WHAT.profdata" "$RAW"/*.profraw

echo "== 4/4 optimised build (target/pgo/$USE)"
bin=$(build "$USE" "-Cprofile-use=$OUT/$WHAT.profdata")
cp "$bin" "$OUT/$WHAT"
echo "written: target/pgo/$WHAT (profile: target/pgo/$WHAT.profdata)"
