#!/usr/bin/env bash
# Server capacity against the reference peers: ../shared/bench/compare.sh (the C load generator,
# three shapes, peers in one run) for our server as configured by default, with --codec orjson,
# and with --workers 2; then the 50x1 --workers 2 / --workers 1 ratio.
#
#   bash bench/capacity.sh [seconds-per-run]        (from the project root, project env active)
#   VARIANTS="default orjson workers2" ROUNDS=3 COMPARE=../shared/bench/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-3}
COMPARE=${COMPARE:-../shared/bench/compare.sh}
VARIANTS=${VARIANTS:-"default orjson workers2"}
[[ -f $COMPARE ]] || { echo "compare.sh not found at $COMPARE (set COMPARE=...)" >&2; exit 2; }
base="python -m geventtcp serve handlers --bind 127.0.0.1:{port}"
echo "machine: $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1);" \
  "$(python -V 2>&1); gevent $(python -c 'import gevent; print(gevent.__version__)')"
declare -A fanin
for v in $VARIANTS; do
  case $v in
    default) cmd=$base ;;
    orjson) cmd="$base --codec orjson" ;;
    workers2) cmd="$base --workers 2" ;;
    *) echo "unknown variant $v" >&2; exit 2 ;;
  esac
  echo; echo "## $v: $cmd"
  out=$(SERVER_CMD="$cmd" bash "$COMPARE" "$T" 2>/dev/null | grep -v WARNING)
  echo "$out"
  fanin[$v]=$(awk '$1 == "fanin50" {sub(/\(.*/, "", $2); print $2}' <<<"$out")
done
if [[ -n ${fanin[default]:-} && -n ${fanin[workers2]:-} ]]; then
  awk -v a="${fanin[workers2]}" -v b="${fanin[default]}" \
    'BEGIN{printf "\n50x1: --workers 2 / --workers 1 = %.2f (%s / %s req/s)\n", a / b, a, b}'
fi
