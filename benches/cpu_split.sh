#!/bin/bash
# cpu_split.sh QUICAR_BIN [ROUNDS]: where a sidecar pair's CPU per request goes, HAProxy's h2 pair
# beside a quicar pair (QUIC and TCP services), with nginx alone as the floor of one wake-up per
# request. Needs ../shared/peerbench set up (its setup.sh: PKI, haproxy, nginx, wrk, oha).
#
# For each path, interleaved, ROUNDS times (default 2):
#   open   oha -q 1000 -c 64 -z 10s (what peerbench's "CPU per 1k req/s" column measures)
#   closed wrk -t1 -c50 -d5s
# and per sidecar: user and system CPU µs per request (/proc/PID/stat), run time per request
# from the scheduler (/proc/PID/task/*/schedstat, ns exact, all threads) and voluntary context
# switches (wake-ups) per request. Every process is started and stopped by PID (peerbench's
# lib.sh). Output: one line per path and load, on stdout.
set -uo pipefail
BIN=$(realpath "${1:?usage: cpu_split.sh QUICAR_BIN [ROUNDS]}")
ROUNDS=${2:-2}
PB=$(cd "$(dirname "$0")/../../shared/peerbench" && pwd)
source "$PB/lib.sh"
for b in wrk oha haproxy nginx curl; do
  command -v "$b" >/dev/null || { echo "missing $b: run $PB/setup.sh first" >&2; exit 1; }
done
[ -s "$PKI/a.pem" ] || { echo "no PKI: run $PB/setup.sh first" >&2; exit 1; }
CFG=$T/split
rm -rf "$CFG"; mkdir -p "$CFG"
trap 'stop_all' EXIT
trap 'exit 130' INT TERM HUP
B_ADDR=127.0.0.1 APP_LISTEN=""
ports_free - || exit 1
gen_configs >/dev/null || { log "config check failed"; exit 1; }
unset PEERBENCH_PEER
export PEERBENCH_PKI=$PKI PEERBENCH_BACKEND=127.0.0.1:18080
start nginx - nginx -c "$CFG/nginx.conf" -p "$CFG/nginx"
start haproxy-b - haproxy -db -f "$CFG/haproxy-b.cfg"
start haproxy-a - haproxy -db -f "$CFG/haproxy-a.cfg"
start quicar-b - bash -c "exec $PB/quicar.sh b $BIN"
start quicar-a - bash -c "exec $PB/quicar.sh a $BIN"
wait_http - http://127.0.0.1:18080/ 30 && wait_http - http://127.0.0.1:15001/ 30 || exit 1
for _ in $(seq 100); do
  curl -s -o /dev/null -H 'Host: hello' http://127.0.0.1:14001/ &&
    curl -s -o /dev/null -H 'Host: hello-tcp' http://127.0.0.1:14001/ && break
  sleep 0.2
done
# nginx's worker (the master only forks it)
NGW=$(pgrep -P "${PID[nginx]}" | head -1)

# sample PID: utime stime (ticks), run time (ns), voluntary context switches, all threads
sample() {
  echo "$(awk '{ sub(/^.*\) /, ""); print $12, $13 }' "/proc/$1/stat")" \
    "$(cat /proc/"$1"/task/*/schedstat | awk '{s += $1} END {printf "%.0f", s}')" \
    "$(cat /proc/"$1"/task/*/status | awk '/^voluntary_ctxt/ {s += $2} END {printf "%.0f", s}')"
}
measure() { # NAME HOST PORT LOAD PID...
  local name=$1 host=$2 port=$3 load=$4 reqs; shift 4
  local -a before=() after=()
  for p in "$@"; do before+=("$(sample "$p")"); done
  if [ "$load" = open ]; then
    timeout 60 oha --no-tui -q 1000 -c 64 -z 10s -H "Host: $host" --output-format json \
      "http://127.0.0.1:$port/" > "$CFG/oha.json" 2>/dev/null
    reqs=$(python3 -c "import json; print(json.load(open('$CFG/oha.json'))['statusCodeDistribution'].get('200', 0))")
  else
    reqs=$(timeout 30 wrk -t1 -c50 -d5s -H "Host: $host" "http://127.0.0.1:$port/" | awk '/requests in/ {print $1}')
  fi
  for p in "$@"; do after+=("$(sample "$p")"); done
  python3 - "$name" "$load" "$reqs" "$CLK_TCK" "${before[@]}" -- "${after[@]}" <<'PY'
import sys
name, load, reqs, hz = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rest = sys.argv[5:]; cut = rest.index('--')
before = [list(map(int, s.split())) for s in rest[:cut]]
after = [list(map(int, s.split())) for s in rest[cut + 1:]]
cols, pair = [], 0.0
for side, (b, a) in zip('AB', zip(before, after)):
    user = (a[0] - b[0]) / hz * 1e6 / reqs
    system = (a[1] - b[1]) / hz * 1e6 / reqs
    run = (a[2] - b[2]) / 1e3 / reqs
    wakes = (a[3] - b[3]) / reqs
    pair += run
    cols.append(f"{side} user {user:5.1f} sys {system:5.1f} run {run:6.1f} µs, {wakes:4.2f} wakes")
label = "per request" if len(cols) == 1 else f"pair run {pair:6.1f} µs per request"
print(f"{name:14} {load:6} {reqs:7} req   " + " | ".join(cols) + f"   {label}")
PY
}
for r in $(seq "$ROUNDS"); do
  for load in open closed; do
    measure nginx-alone hello 18080 "$load" "$NGW"
    measure haproxy-h2 hello 15001 "$load" "${PID[haproxy-a]}" "${PID[haproxy-b]}"
    measure quicar-quic hello 14001 "$load" "${PID[quicar-a]}" "${PID[quicar-b]}"
    measure quicar-tcp hello-tcp 14001 "$load" "${PID[quicar-a]}" "${PID[quicar-b]}"
  done
done
