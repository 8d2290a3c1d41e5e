#!/usr/bin/env bash
# Our TCP transport beside Envoy's h2 pair over a lossy link, with the kernel's view of each
# pair's connection: peerbench's lossy.sh link (linkem, 25 ms each way, 2 % loss each way, both
# sidecars A in namespace qa, B and nginx in qb), the same load (`oha -c 32 -q 200 -n 2000
# --latency-correction` of /16k), only these two pairs, interleaved rounds, and `ss -tin` of the
# A-B connection on both sides every 0.2 s during each round (/tmp/peerbench/tcp-loss/ss-PAIR-ROUND.txt:
# cwnd, BBR's bandwidth estimate, bytes unsent, retransmissions). Written to see why a round of
# either pair sometimes falls behind the offered rate and queues for seconds (BENCHMARKS.md,
# "Thirty-sixth session of round 2").
#   benches/tcp_loss.sh target/pgo/quicar [ROUNDS]      # default 3 rounds, about 25 s each
# Needs root and ../shared/peerbench set up (its setup.sh: PKI, linkem, Envoy, nginx, oha), and
# `127.0.0.1 hello hello-tcp` in /etc/hosts. Every process is started and stopped by PID.
set -uo pipefail
BIN=${1:?usage: tcp_loss.sh QUICAR_BIN [ROUNDS]}
BIN=$(realpath "$BIN")
ROUNDS=${2:-3}
PB=$(cd "$(dirname "$0")/../../shared/peerbench" && pwd)
source "$PB/lib.sh"
DELAY=25ms LOSS=2 RATE=200 DUR=10
LK=$T/linkem-target/release/linkem
[ -x "$LK" ] || { echo "no linkem at $LK: run $PB/setup.sh first" >&2; exit 1; }
for ns in qa qb; do
  [ -e "/run/netns/$ns" ] && { echo "namespace $ns exists already (another run?); '$LK down' removes it" >&2; exit 1; }
done
CFG=$T/tcp-loss
rm -rf "$CFG"; mkdir -p "$CFG"
LKPID=
cleanup() {
  stop_all
  if [ -n "$LKPID" ]; then kill -TERM "$LKPID" 2>/dev/null; wait "$LKPID" 2>/dev/null; LKPID=; fi
  [ -e /run/netns/qa ] || [ -e /run/netns/qb ] && "$LK" down >/dev/null 2>&1
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
B_ADDR=198.18.0.2 APP_LISTEN="listen 198.18.0.2:18080 backlog=4096;"
gen_configs >/dev/null || { echo "config check failed" >&2; exit 1; }
"$LK" up --delay $DELAY --loss $LOSS > "$CFG/linkem.log" 2>&1 &
LKPID=$!
for _ in $(seq 100); do grep -q '^linkem: up' "$CFG/linkem.log" && break; sleep 0.1; done
grep -q '^linkem: up' "$CFG/linkem.log" || { echo "linkem did not come up" >&2; exit 1; }
ip netns exec qa ip link set lo up; ip netns exec qb ip link set lo up
start nginx qb nginx -c "$CFG/nginx.conf" -p "$CFG/nginx"
start envoy-b qb "$ENVOY" -c "$CFG/envoy-b.yaml" --concurrency 1 --base-id 42 -l warn
start envoy-a qa "$ENVOY" -c "$CFG/envoy-a.yaml" --concurrency 1 --base-id 41 -l warn
export PEERBENCH_PKI=$PKI PEERBENCH_PEER=198.18.0.2 PEERBENCH_BACKEND=127.0.0.1:18080
start quicar-b qb bash -c "exec $PB/quicar.sh b $BIN"
start quicar-a qa bash -c "exec $PB/quicar.sh a $BIN"
echo "TCP congestion control: qa $(ip netns exec qa cat /proc/sys/net/ipv4/tcp_congestion_control)," \
  "qb $(ip netns exec qb cat /proc/sys/net/ipv4/tcp_congestion_control)"
# name, URL from qa, B's port
PAIRS=("quicar-tcp http://hello-tcp:14001/16k 14443" "envoy-h2 http://127.0.0.1:17002/16k 17443")
for p in "${PAIRS[@]}"; do
  set -- $p
  wait_http qa "$2" 30 >/dev/null || { echo "$1 never answered; logs in $CFG" >&2; exit 1; }
  # warm-up: open the A-B connection and grow its window (not recorded)
  ip netns exec qa timeout -s INT 15 oha --no-tui -n 200 -c 32 -q $RATE "$2" >/dev/null 2>&1
done
for r in $(seq "$ROUNDS"); do
  for p in "${PAIRS[@]}"; do
    set -- $p; name=$1 url=$2 port=$3
    (
      while :; do
        echo "T $(date +%s.%N)"
        echo B; ip netns exec qb ss -tinmH state established "( sport = :$port )"
        echo A; ip netns exec qa ss -tinmH state established "( dport = :$port )"
        sleep 0.2
      done
    ) > "$CFG/ss-$name-$r.txt" 2>&1 &
    sampler=$!
    ip netns exec qa timeout -s INT $((DUR * 3 + 10)) oha --no-tui -n $((RATE * DUR)) -c 32 -q $RATE \
      --latency-correction --output-format json "$url" > "$CFG/oha-$name-$r.json" 2>/dev/null
    kill "$sampler"; wait "$sampler" 2>/dev/null
    python3 - "$CFG/oha-$name-$r.json" "$r" "$name" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
lp = d["latencyPercentiles"]
ok = int(d["statusCodeDistribution"].get("200", 0))
print(f"round {sys.argv[2]} {sys.argv[3]}: p50 {lp['p50'] * 1000:.1f} ms, p99 {lp['p99'] * 1000:.1f} ms, "
      f"{d['summary']['requestsPerSec']:.1f} req/s served, {ok} ok")
PY
  done
done
