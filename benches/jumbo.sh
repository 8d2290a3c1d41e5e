#!/bin/bash
# jumbo.sh QUICAR_BIN [MTU] [SERVICE]: 1 MiB downloads between two sidecars in two
# network namespaces joined by a veth link with MTU (default 9000), 8 at once for 10 s with
# oha, over SERVICE `quic` (default) or `tcp`. Prints req/s and the pair's CPU seconds per GB
# (user + system, /proc/PID/stat). Needs root, ip (iproute2) and oha. Run it for two MTUs or
# two binaries one after the other and compare ratios, never lone figures.
#
# The namespaces (qj-a, qj-b), the link's addresses (198.18.0.1-2) and the sidecars are the
# script's own; it stops the sidecars by PID and deletes the namespaces on exit.
set -uo pipefail
BIN=$(realpath "${1:?usage: jumbo.sh QUICAR_BIN [MTU] [quic|tcp]}")
MTU=${2:-9000}
SVC=${3:-quic}
for b in ip oha curl; do
  command -v "$b" >/dev/null || { echo "missing $b" >&2; exit 1; }
done
A=qj-a B=qj-b
D=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  ip netns del $A 2>/dev/null; ip netns del $B 2>/dev/null
  rm -rf "$D"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

ip netns add $A && ip netns add $B || exit 1
ip -n $A link add v0 type veth peer name v1 netns $B
ip -n $A addr add 198.18.0.1/24 dev v0
ip -n $B addr add 198.18.0.2/24 dev v1
for ns in $A $B; do ip -n $ns link set lo up; done
ip -n $A link set v0 mtu "$MTU" up
ip -n $B link set v1 mtu "$MTU" up

"$BIN" certs init --dir "$D" >/dev/null && "$BIN" certs issue a --dir "$D" >/dev/null &&
  "$BIN" certs issue b --dir "$D" >/dev/null || exit 1
identity() { printf '[identity]\ncert = "%s/%s.crt"\nkey = "%s/%s.key"\nca = "%s/ca.crt"\n' "$D" "$1" "$D" "$1" "$D"; }
cat > "$D/a.toml" <<EOF
$(identity a)
[outbound]
listen = "127.0.0.1:24001"
[inbound]
listen = "127.0.0.1:24143"
[admin]
listen = "127.0.0.1:24901"
[[service]]
name = "b"
transport = "$SVC"
endpoints = [{ address = "198.18.0.2:24443", identity = "spiffe://quicar.local/b" }]
EOF
cat > "$D/b.toml" <<EOF
$(identity b)
[outbound]
listen = "127.0.0.1:24002"
[inbound]
listen = "198.18.0.2:24443"
[admin]
listen = "127.0.0.1:24902"
[[local]]
name = "b"
address = "127.0.0.1:18080"
allow = ["spiffe://quicar.local/a"]
EOF
ip netns exec $B "$BIN" internal node --config "$D/b.toml" --backend 127.0.0.1:18080 >/dev/null 2>"$D/b.err" &
pb=$!; pids+=("$pb")
ip netns exec $A "$BIN" internal node --config "$D/a.toml" >/dev/null 2>"$D/a.err" &
pa=$!; pids+=("$pa")
url="http://127.0.0.1:24001/r?size=1048576"
for _ in $(seq 50); do
  ip netns exec $A curl -sf -o /dev/null -m 5 -H "host: b" "$url" && break
  sleep 0.2
done
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
a0=$(cpu $pa) b0=$(cpu $pb)
out=$(ip netns exec $A oha --no-tui -z 10s -c 8 -H "host: b" "$url" 2>&1)
a1=$(cpu $pa) b1=$(cpu $pb)
rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
ok=$(echo "$out" | awk '/\[200\]/ {print $2}')
ticks=$(getconf CLK_TCK)
awk -v mtu="$MTU" -v svc="$SVC" -v rps="$rps" -v ok="${ok:-0}" -v a=$((a1 - a0)) -v b=$((b1 - b0)) -v t="$ticks" \
  'BEGIN { gb = rps * 10 * 1048576 / 1e9;
           printf "mtu %s %s: %.0f req/s (%d answered 200), CPU A %.2f s, B %.2f s, %.2f CPU s per GB\n",
                  mtu, svc, rps, ok, a / t, b / t, (a + b) / t / gb }'
