#!/usr/bin/env bash
# Decode speed when other programs keep the cores busy: gemma3 on all cores (the default)
# against one thread, in turns, while one busy loop per core runs beside it. On a busy
# machine a forward pass's threads wait for each other at every step, so all threads can
# decode far slower than one; gemma3 times both and decodes on the faster (pick_team in
# gemma3.c). Prints the median tok/s of each and the ratio. Not a test.
#
#   bash tools/bench_load.sh MODEL.bin [GEMMA3_BINARY]
#
# Environment: ROUNDS=5, DECODE=48 (tokens), BUSY=$(nproc) (busy loops beside gemma3).
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
model=$1 bin=${2:-./gemma3}
ROUNDS=${ROUNDS:-5} DECODE=${DECODE:-48} BUSY=${BUSY:-$(nproc)}
pids=()
trap 'kill ${pids[@]+"${pids[@]}"} 2>/dev/null || true' EXIT
for _ in $(seq "$BUSY"); do (while :; do :; done) & pids+=($!); done
rate() { # OMP_NUM_THREADS value ("" = unset): decode tok/s of one run
    env ${1:+OMP_NUM_THREADS=$1} "$bin" "$model" -p "The history of" -n "$DECODE" -t 1 -s 1 2>&1 >/dev/null |
        sed -n 's/.*generated [0-9]* tokens, \([0-9.]*\) tok\/s$/\1/p'
}
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
all=() one=()
for r in $(seq "$ROUNDS"); do
    all+=("$(rate "")")
    one+=("$(rate 1)")
    echo "bench_load: round $r/$ROUNDS: all threads ${all[-1]}, one thread ${one[-1]} tok/s" >&2
done
a=$(printf '%s\n' "${all[@]}" | median) o=$(printf '%s\n' "${one[@]}" | median)
awk -v a="$a" -v o="$o" -v b="$BUSY" -v n="$(nproc)" 'BEGIN {
    printf "decode beside %d busy loops on %d cores: all threads %.2f tok/s, one thread %.2f tok/s, ratio %.2f\n", b, n, a, o, a / o }'
