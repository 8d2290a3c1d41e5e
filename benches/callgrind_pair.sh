#!/usr/bin/env bash
# Instructions per request on each sidecar of a pair, counted by callgrind (exact, the same on a
# busy or an idle machine), for a quicar pair and for peerbench's HAProxy pair in the same
# harness. Each sidecar runs under valgrind, its counts zeroed after a warm-up of 200 requests
# (callgrind_control -z); oha sends N1 requests to one fresh pair and N2 to another, and the
# difference in instructions ÷ (N2 − N1) removes shutdown. Repeat runs of one binary agree
# within about 0.2 % (before the zeroing, start-up's timed loops made them differ by up to 1 %).
# It also prints the machine code each request runs through, in KiB: what a request costs
# beyond its instructions when it runs on cold caches, as at 1,000 req/s.
#   seq   one request at a time (oha -c 1), 2,000 and 12,000 requests
#   conc  50 in flight (oha -c 50), 4,000 and 24,000 requests: many requests per wake-up
#   closed  no valgrind: peerbench's closed loop (wrk -t1 -c50 -d5s) alone (req/s, the machine's
#         idle share, CPU µs per request), then again with `perf stat` on A, B, nginx and wrk for
#         each one's context switches and system calls per request (needs perf with tracepoint
#         access)
# Needs ../shared/peerbench set up (its setup.sh: PKI, haproxy, nginx, oha), valgrind, curl,
# and `127.0.0.1 hello hello-tcp` in /etc/hosts. Ports: 24001-24902 (quicar), peerbench's own
# (HAProxy, nginx :18080). Every process is started and stopped by PID.
#   benches/callgrind_pair.sh target/release/quicar conc hello      # QUIC service
#   benches/callgrind_pair.sh target/release/quicar seq hello-tcp   # TCP service
#   benches/callgrind_pair.sh haproxy conc                          # HAProxy's pair
#   benches/callgrind_pair.sh target/release/deps/floor-HASH conc   # benches/floor.rs's pair
#   B_BIN=target/release/deps/floor-HASH benches/callgrind_pair.sh target/release/quicar closed hello-tcp
#                                     # B from another build (or the floor's), A from the first
set -euo pipefail
BIN=${1:?usage: [B_BIN=EXE] callgrind_pair.sh QUICAR_BIN|haproxy seq|conc|closed [hello|hello-tcp]}
B_BIN=${B_BIN:-$BIN}
MODE=${2:?seq, conc or closed}
HOST=${3:-hello}
PB=$(cd "$(dirname "$0")/../../shared/peerbench" && pwd)
source "$PB/lib.sh"
[ -s "$PKI/a.pem" ] || { echo "no PKI: run $PB/setup.sh first" >&2; exit 1; }
CFG=$T/callgrind
rm -rf "$CFG"; mkdir -p "$CFG"
B_ADDR=127.0.0.1 APP_LISTEN=""
gen_configs >/dev/null
case $MODE in
  seq) C=1 N1=2000 N2=12000 ;;
  conc) C=50 N1=4000 N2=24000 ;;
  closed) ;;
  *) echo "mode is seq, conc or closed" >&2; exit 2 ;;
esac

# The quicar pair: A's app side on :24001, B in front of nginx, QUIC and TCP services.
pair_configs() {
  local role name cert listen admin outbound
  for role in a b; do
    if [ $role = a ]; then name=client cert=a listen=24143 admin=24901 outbound=24001
    else name=hello cert=b listen=24443 admin=24902 outbound=24002; fi
    {
      printf '[node]\nname = "%s"\n[identity]\ncert = "%s"\nkey = "%s"\nca = "%s"\n' \
        "cg-$role" "$PKI/$cert.crt" "$PKI/$cert.key" "$PKI/ca.crt"
      printf '[outbound]\nlisten = "127.0.0.1:%s"\n[inbound]\nlisten = "127.0.0.1:%s"\n' "$outbound" "$listen"
      printf '[admin]\nlisten = "127.0.0.1:%s"\n' "$admin"
      if [ $role = a ]; then
        for s in hello:quic hello-tcp:tcp; do
          printf '[[service]]\nname = "%s"\ntransport = "%s"\n' "${s%%:*}" "${s##*:}"
          printf 'endpoints = [{ address = "127.0.0.1:24443", identity = "spiffe://quicar.local/hello" }]\n'
        done
      else
        for s in hello hello-tcp; do
          printf '[[local]]\nname = "%s"\naddress = "127.0.0.1:18080"\n' "$s"
          printf 'allow = ["spiffe://quicar.local/client"]\n'
        done
      fi
    } > "$CFG/quicar-$role.toml"
  done
}

# pair_label: what the output names the pair by.
pair_label() {
  if [ "$BIN" = haproxy ]; then echo haproxy
  elif [ "$B_BIN" = "$BIN" ]; then echo "$(basename "$BIN") $HOST"
  else echo "A $(basename "$BIN"), B $(basename "$B_BIN") $HOST"; fi
}

# side_cmd ROLE EXE: sets cmd_ROLE (a or b, the caller's) to run that sidecar from EXE, a quicar
# binary or benches/floor.rs's executable (both speak the same wires, so they pair).
side_cmd() {
  local -n cmd=cmd_$1
  case $(basename "$2") in
    floor*)
      if [ "$1" = a ]; then cmd=("$2" a 127.0.0.1:24001 127.0.0.1:24443 "$PKI")
      else cmd=("$2" b 127.0.0.1:24443 127.0.0.1:18080 "$PKI"); fi ;;
    *) cmd=("$2" run --config "$CFG/quicar-$1.toml") ;;
  esac
}

# run N: a fresh pair under callgrind, N requests; prints "A B" instruction totals.
run() {
  local n=$1 url cmd_a cmd_b
  PID=() PID_ORDER=()
  start nginx - nginx -c "$CFG/nginx.conf" -p "$CFG/nginx"
  if [ "$BIN" = haproxy ]; then
    url=http://127.0.0.1:15001/
    cmd_b=(haproxy -db -f "$CFG/haproxy-b.cfg") cmd_a=(haproxy -db -f "$CFG/haproxy-a.cfg")
  else
    url=http://$HOST:24001/
    side_cmd a "$BIN"
    side_cmd b "$B_BIN"
  fi
  if [ "$MODE" = closed ]; then
    start b - "${cmd_b[@]}"
    start a - "${cmd_a[@]}"
  else
    start b - valgrind --tool=callgrind --dump-instr=yes --callgrind-out-file="$CFG/$n-b.out" "${cmd_b[@]}"
    start a - valgrind --tool=callgrind --dump-instr=yes --callgrind-out-file="$CFG/$n-a.out" "${cmd_a[@]}"
  fi
  wait_http - "$url" 120 >/dev/null || { echo "$url never answered; logs in $CFG" >&2; stop_all; exit 1; }
  oha --no-tui -n 200 -c 10 "$url" >/dev/null 2>&1
  if [ "$MODE" = closed ]; then
    closed_loop "$url"
    stop_all >/dev/null 2>&1 || true
    return
  fi
  # Counting starts after the warm-up: start-up has parts that run for a time, not a number of
  # steps (quanta's clock calibration loops until enough time has passed), so their
  # instructions differ from one start to the next and the subtraction below would not cancel
  # them (±200-700 a request on one sidecar before this). vgdb interrupts each process with
  # ptrace: root, or kernel.yama.ptrace_scope = 0.
  local p
  for p in "${PID[a]}" "${PID[b]}"; do
    callgrind_control -z "$p" >/dev/null 2>&1 ||
      { echo "callgrind_control -z $p failed (vgdb needs ptrace)" >&2; stop_all; exit 1; }
  done
  local ok
  ok=$(oha --no-tui -n "$n" -c "$C" "$url" 2>&1 | awk '/Success rate/ {print $3}')
  # SIGINT, then time to exit on their own: valgrind writes its profile as a process exits,
  # and a sidecar under valgrind takes longer to drain than stop_all waits before SIGKILL.
  kill -INT "${PID[a]}" "${PID[b]}" 2>/dev/null || true
  for _ in $(seq 300); do
    kill -0 "${PID[a]}" 2>/dev/null || kill -0 "${PID[b]}" 2>/dev/null || break
    sleep 0.1
  done
  stop_all >/dev/null 2>&1 || true   # a process stopped by SIGINT exits non-zero
  [ "$ok" = "100.00%" ] || { echo "success rate $ok at $n requests" >&2; exit 1; }
  echo "$(total "$CFG/$n-a.out") $(total "$CFG/$n-b.out")"
}
total() { awk '/^(summary|totals):/ {print $2; exit}' "$1"; }

# closed_loop URL: wrk's closed loop through the running pair, twice. First alone: req/s, the
# machine's idle share, and CPU µs per request of A, B and nginx's worker from /proc (10 ms
# ticks). Then with each process under `perf stat` (nginx: its worker) for context switches and
# system calls per request. perf's system-call tracepoint slows every call and changes how the
# four processes interleave, so that run's req/s and idle share are not the pair's: on a quicar
# pair it turned a run at 6 % idle into one at 22 % (BENCHMARKS.md, "Thirty-first session").
closed_loop() {
  local url=$1 events=task-clock,context-switches,raw_syscalls:sys_enter x p pids=() worker
  worker=$(pgrep -P "${PID[nginx]}" | head -1)
  ticks() { local p; for p in "${PID[a]}" "${PID[b]}" "$worker"; do awk '{printf "%d ", $14 + $15}' "/proc/$p/stat"; done; echo; }
  ticks > "$CFG/ticks0"
  head -1 /proc/stat > "$CFG/stat0"
  wrk -t1 -c50 -d5s "$url" > "$CFG/closed0.wrk" 2>&1
  head -1 /proc/stat > "$CFG/stat0b"
  ticks > "$CFG/ticks0b"
  for x in a b n; do
    case $x in a) p=${PID[a]} ;; b) p=${PID[b]} ;; n) p=$worker ;; esac
    perf stat -x, -e "$events" -p "$p" -o "$CFG/closed-$x.perf" & pids+=($!)
  done
  sleep 0.5
  head -1 /proc/stat > "$CFG/stat1"
  perf stat -x, -e "$events" -o "$CFG/closed-w.perf" wrk -t1 -c50 -d5s "$url" > "$CFG/closed.wrk" 2>&1
  head -1 /proc/stat > "$CFG/stat2"
  kill -INT "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
  python3 - "$CFG" "$(pair_label)" "$(getconf CLK_TCK)" <<'PY'
import re, sys
d, label, hz = sys.argv[1], sys.argv[2], int(sys.argv[3])
def wrk(name):
    text = open(f"{d}/{name}").read()
    return (int(re.search(r"(\d+) requests in", text).group(1)),
            float(re.search(r"Requests/sec:\s*([\d.]+)", text).group(1)))
def idle(a, b):
    s1 = list(map(int, open(f"{d}/{a}").read().split()[1:9]))
    s2 = list(map(int, open(f"{d}/{b}").read().split()[1:9]))
    delta = [y - x for x, y in zip(s1, s2)]
    return 100 * delta[3] / sum(delta)
n, rps = wrk("closed0.wrk")
t0 = list(map(int, open(f"{d}/ticks0").read().split()))
t1 = list(map(int, open(f"{d}/ticks0b").read().split()))
cpu = [(y - x) * 1e6 / hz / n for x, y in zip(t0, t1)]
print(f"{label} closed loop: {rps:.0f} req/s, machine idle {idle('stat0', 'stat0b'):.0f} % of the run; "
      f"CPU µs per request A {cpu[0]:.2f}, B {cpu[1]:.2f}, nginx {cpu[2]:.2f}")
n, rps = wrk("closed.wrk")
print(f"  under perf stat ({rps:.0f} req/s, machine idle {idle('stat1', 'stat2'):.0f} %; not the pair's own):")
names = {"a": "A", "b": "B", "n": "nginx", "w": "wrk"}
for x in "abnw":
    v = {}
    for line in open(f"{d}/closed-{x}.perf"):
        f = line.strip().split(",")
        if len(f) > 2 and f[0].replace(".", "").isdigit():
            v[f[2]] = float(f[0])
    cpu_us = v.get("task-clock", 0) * 1000 / n   # task-clock is in ms
    print(f"  {names[x]:5s} {cpu_us:6.2f} µs CPU, {v.get('context-switches', 0) / n:.3f} context switches, "
          f"{v.get('raw_syscalls:sys_enter', 0) / n:.2f} system calls per request")
PY
}

# benches/floor.rs (its executable is target/release/deps/floor-*): the least a pair on
# quicar's crates does per request, measured in the same harness.
[ "$BIN" = haproxy ] || pair_configs
trap 'stop_all' EXIT
if [ "$MODE" = closed ]; then
  run closed
  exit 0
fi
run $N1 > "$CFG/first"
run $N2 > "$CFG/second"
read -r a1 b1 < "$CFG/first"
read -r a2 b2 < "$CFG/second"
pa=$(( (a2 - a1) / (N2 - N1) )) pb=$(( (b2 - b1) / (N2 - N1) ))
echo "$(pair_label) $MODE: A $pa + B $pb = $((pa + pb)) instructions per request"
# The code a request runs through, which is what a request pays for on cold caches (at 1,000
# req/s the other processes on the cores evict it between requests): 64-byte lines of machine
# code (any object: the binary, libc, libssl) with an instruction that ran at least N2 / 2
# times in the second run, so in about every request or more.
python3 - "$CFG/$N2-a.out" "$CFG/$N2-b.out" "$N2" <<'PY'
import sys
def lines(path, n):
    most, addr, call = {}, 0, False
    for line in open(path, errors="replace"):
        if line.startswith("calls="):
            call = True            # the next line is the call's inclusive cost at its site
            continue
        if not line or line[0] not in "0123456789+-*":
            continue
        t = line.split()
        p = t[0]
        addr = int(p, 16) if p.startswith("0x") else addr + int(p) if p[0] in "+-" else addr
        if call:
            call = False
            continue
        if len(t) >= 3:
            most[addr >> 6] = max(most.get(addr >> 6, 0), int(t[2]))
    return sum(1 for c in most.values() if c >= n / 2)
n = int(sys.argv[3])
a, b = lines(sys.argv[1], n), lines(sys.argv[2], n)
print(f"  code run per request: A {a * 64 / 1024:.0f} KiB + B {b * 64 / 1024:.0f} KiB = {(a + b) * 64 / 1024:.0f} KiB ({a} + {b} 64-byte lines)")
PY
