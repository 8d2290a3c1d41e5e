#!/bin/bash
# cpu_split.sh QUICAR_BIN [ROUNDS] [states]: where a sidecar pair's CPU per request goes,
# HAProxy's h2 pair beside a quicar pair (QUIC and TCP services), with nginx alone as the floor
# of one wake-up per request. Needs ../shared/peerbench set up (its setup.sh: PKI, haproxy, nginx, wrk, oha).
#
# For each path, interleaved, ROUNDS times (default 2):
#   open   oha -q 1000 -c 64 -z 10s (what peerbench's "CPU per 1k req/s" column measures)
#   closed wrk -t1 -c50 -d5s
# and per sidecar: user and system CPU µs per request (/proc/PID/stat), run time per request
# from the scheduler (/proc/PID/task/*/schedstat, ns exact, all threads) and voluntary context
# switches (wake-ups) per request, and minor page faults per request. With `states` as the
# third argument, each closed-loop run also samples which processes are runnable (run_states).
# Every process is started and stopped by PID (peerbench's lib.sh). Output: one line per path
# and load, on stdout.
set -uo pipefail
BIN=$(realpath "${1:?usage: cpu_split.sh QUICAR_BIN [ROUNDS] [states]}")
ROUNDS=${2:-2}
STATES=${3:-}
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

# sample PID: utime stime (ticks), minor faults, run time (ns), voluntary context switches, all
# threads
sample() {
  echo "$(awk '{ sub(/^.*\) /, ""); print $12, $13, $8 }' "/proc/$1/stat")" \
    "$(cat /proc/"$1"/task/*/schedstat | awk '{s += $1} END {printf "%.0f", s}')" \
    "$(cat /proc/"$1"/task/*/status | awk '/^voluntary_ctxt/ {s += $2} END {printf "%.0f", s}')"
}
# run_states NAME TIMEOUT_PID PID...: while wrk runs, which of wrk, the given sidecars and nginx
# are runnable (state R, any thread), read from /proc every millisecond for 3 s; prints the
# share of samples by how many are runnable, each one's runnable share, and the commonest
# states. The sampler takes a little of a core itself, so these rounds' CPU figures run high.
run_states() {
  local name=$1 wrk; shift
  sleep 1
  wrk=$(pgrep -P "$1" wrk || echo "$1"); shift
  local -a procs=("wrk=$wrk")
  [ $# -eq 2 ] && procs+=("A=$1" "B=$2")
  procs+=("nginx=$NGW")
  python3 - "$name" "${procs[@]}" <<'PY'
import collections, os, sys, time
name, procs = sys.argv[1], [a.split('=') for a in sys.argv[2:]]
files = {n: [f"/proc/{p}/task/{t}/stat" for t in os.listdir(f"/proc/{p}/task")] for n, p in procs}
def runnable(paths):
    for f in paths:
        try:
            if open(f).read().rsplit(')', 1)[1].split()[0] == 'R':
                return True
        except OSError:
            pass
    return False
seen, n, end = collections.Counter(), 0, time.time() + 3
while time.time() < end:
    seen[tuple(runnable(files[p]) for p, _ in procs)] += 1
    n += 1
    time.sleep(0.001)
count = collections.Counter()
for k, v in seen.items():
    count[sum(k)] += v
by = " ".join(f"{k}:{100 * v / n:.0f}%" for k, v in sorted(count.items()))
each = " ".join(f"{p} {100 * sum(v for k, v in seen.items() if k[i]) / n:.0f}%" for i, (p, _) in enumerate(procs))
top = ", ".join(f"{'+'.join(p for (p, _), r in zip(procs, k) if r) or 'none'} {100 * v / n:.1f}%"
                for k, v in seen.most_common(4))
print(f"{name:14} states  {n} samples   runnable at once {by}   runnable {each}   commonest {top}")
PY
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
    timeout 30 wrk -t1 -c50 -d5s -H "Host: $host" "http://127.0.0.1:$port/" > "$CFG/wrk.out" &
    local w=$!
    [ "$STATES" = states ] && run_states "$name" "$w" "$@"
    wait "$w"
    reqs=$(awk '/requests in/ {print $1}' "$CFG/wrk.out")
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
    faults = (a[2] - b[2]) / reqs
    run = (a[3] - b[3]) / 1e3 / reqs
    wakes = (a[4] - b[4]) / reqs
    pair += run
    cols.append(f"{side} user {user:5.1f} sys {system:5.1f} run {run:6.1f} µs, {wakes:4.2f} wakes, {faults:5.3f} faults")
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
