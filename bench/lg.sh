#!/usr/bin/env bash
# Drive a geventtcp server with the C load generator bench/lg.c (the team's own tool, built here
# with gcc on first use): N connections each keeping D requests in flight, for T seconds after a
# 1 s warm-up; prints rps and latency percentiles (p50/p90/p99/max in microseconds).
#
#   bash bench/lg.sh                         # 50 connections x 1 in flight, 5 s, own server
#   bash bench/lg.sh -c 4 -d 32 -t 5         # any lg flags: -c conns -d depth -t seconds -w warmup
#   SERVER_ARGS="--codec orjson" bash bench/lg.sh       # flags for the server this script starts
#   ADDRESS=127.0.0.1:8889 bash bench/lg.sh  # a server you started yourself, with any settings
#
# Without ADDRESS it starts `python -m geventtcp serve handlers` (the example echo, 1 worker) on a
# free loopback port and stops it afterwards. The request is the one the documented figures use.
# Run it from a clone: PYTHON defaults to .venv/bin/python when that exists. Quote numbers only
# with the machine described: the load generator shares the CPUs with the server.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -z ${PYTHON:-} && -x .venv/bin/python ]] && PY=.venv/bin/python
LG=${LG:-/tmp/geventtcp-lg}
[[ -x $LG && $LG -nt bench/lg.c ]] || gcc -O2 -o "$LG" bench/lg.c
MESSAGE='{"cmdid":1,"timestamp":0,"params":{"content":"Hello world!"}}'
args=("$@")
[[ ${#args[@]} -gt 0 ]] || args=(-c 50 -d 1 -t 5)
server=""
cleanup() { [[ -z $server ]] || { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }; }
trap cleanup EXIT
if [[ -z ${ADDRESS:-} ]]; then
  port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # shellcheck disable=SC2086  # SERVER_ARGS is a list of flags
  "$PY" -m geventtcp serve handlers --bind "127.0.0.1:$port" ${SERVER_ARGS:-} >/tmp/geventtcp-lg-server.log 2>&1 &
  server=$!
  ADDRESS=127.0.0.1:$port
fi
host=${ADDRESS%:*}
port=${ADDRESS##*:}
for _ in $(seq 100); do (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null && break; sleep 0.1; done
echo "lg ${args[*]} against $ADDRESS ($(nproc) CPUs, $("$PY" -V 2>&1))" >&2
"$LG" "$host" "$port" -w 1 "${args[@]}" -m "$MESSAGE"
