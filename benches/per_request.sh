#!/usr/bin/env bash
# Instructions per request through a sidecar pair, counted by callgrind (the same on a busy or
# an idle machine): `quicar demo` under valgrind, `wrk -t1 -c8 -d20s` against its outbound
# listener, total instructions ÷ requests answered (start-up included, so compare binaries with
# the same duration, or run twice with PER_REQUEST_SECONDS=4 and 20 and divide the differences).
# Needs valgrind, wrk and curl.
#   benches/per_request.sh target/release/quicar
set -euo pipefail
bin=${1:?usage: per_request.sh QUICAR_BINARY}
out=$(mktemp /tmp/quicar-callgrind.XXXXXX)
valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" demo \
  --listen 127.0.0.1:34140 --admin 127.0.0.1:39901 >/dev/null 2>&1 &
pid=$!
trap 'kill -INT $pid 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -s -o /dev/null -H 'Host: hello' http://127.0.0.1:34140/ && break
  sleep 1
done
n=$(wrk -t1 -c8 -d${PER_REQUEST_SECONDS:-20}s -H 'Host: hello' http://127.0.0.1:34140/ | awk '/requests in/ {print $1}')
kill -INT $pid
wait $pid 2>/dev/null || true
trap - EXIT
ir=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "$bin: $n requests, $ir instructions, $((ir / n)) per request"
rm -f "$out"
