#!/usr/bin/env bash
# Speed of two gemma3 binaries side by side on the same model files: runs them in turns
# (A, B, A, B, ...) so that both see the same machine state, and prints each one's median
# prefill and decode rates per file and the ratio B / A. For checking that a change keeps
# the speed (e.g. A built from the previous commit in a git worktree). Not a test.
#
#   bash tools/bench_compare.sh A_BINARY B_BINARY MODEL.bin [MODEL.bin ...]
#
# Environment: ROUNDS=5 (runs of each binary per measurement), DECODE=64 (tokens to
# generate), PREFILL_TOKENS=512 (prompt length, roughly), OMP_NUM_THREADS.
# Rates are gemma3's own timers ("prompt N tokens, X tok/s; generated M tokens, Y tok/s"
# on stderr), which leave out process start and loading. Decode is greedy; on a random
# model that stops early, the run is repeated sampled with a fixed seed.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
A=$1 B=$2
shift 2
ROUNDS=${ROUNDS:-5} DECODE=${DECODE:-64} PREFILL_TOKENS=${PREFILL_TOKENS:-512}
for bin in "$A" "$B"; do [ -x "$bin" ] || { echo "bench_compare: $bin is not an executable" >&2; exit 2; }; done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$(dirname "$0")/.."
# A prompt of about PREFILL_TOKENS tokens: README.md's prose (about 4 characters a token).
tr -s ' \n' ' ' <README.md | head -c $((PREFILL_TOKENS * 4)) > "$work/long.txt" || true  # (head closes the pipe early)

# rate BIN MODEL WHICH ARGS...: the prompt (WHICH=1) or generation (2) rate of one run
rate() {
    local bin=$1 model=$2 which=$3
    shift 3
    "$bin" "$model" "$@" 2>"$work/err" >/dev/null || { cat "$work/err" >&2; return 1; }
    sed -n 's/^prompt \([0-9]*\) tokens, \([0-9.]*\) tok\/s; generated \([0-9]*\) tokens, \([0-9.]*\) tok\/s$/\1 \2 \3 \4/p' "$work/err" |
        awk -v w="$which" -v want="$DECODE" '{ if (w == 1) print $2; else if ($3 + 0 >= want) print $4; else print "short" }'
}

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

printf '| model | A prefill | B prefill | B / A | A decode | B decode | B / A |\n|---|---|---|---|---|---|---|\n'
for model in "$@"; do
    dec=(-p "The history of" -n "$DECODE" -t 0)
    if [ "$(rate "$A" "$model" 2 "${dec[@]}")" = short ]; then dec=(-p "The history of" -n "$DECODE" -t 1 -s 1); fi
    : >"$work/pa"; : >"$work/pb"; : >"$work/da"; : >"$work/db"
    for r in $(seq "$ROUNDS"); do
        rate "$A" "$model" 1 -f "$work/long.txt" -n 0 >>"$work/pa"
        rate "$B" "$model" 1 -f "$work/long.txt" -n 0 >>"$work/pb"
        rate "$A" "$model" 2 "${dec[@]}" >>"$work/da"
        rate "$B" "$model" 2 "${dec[@]}" >>"$work/db"
        echo "bench_compare: $(basename "$model") round $r/$ROUNDS" >&2
    done
    if grep -q short "$work/da" "$work/db"; then echo "bench_compare: $model: generation stopped early" >&2; exit 1; fi
    pa=$(median <"$work/pa") pb=$(median <"$work/pb") da=$(median <"$work/da") db=$(median <"$work/db")
    awk -v m="$(basename "$model")" -v pa="$pa" -v pb="$pb" -v da="$da" -v db="$db" \
        'BEGIN { printf "| %s | %.1f | %.1f | %.3f | %.2f | %.2f | %.3f |\n", m, pa, pb, pb / pa, da, db, db / da }'
done
echo
echo "A = $A, B = $B; medians of $ROUNDS alternated runs each; prefill: a $(wc -c <"$work/long.txt")-character prompt; decode: $DECODE tokens; threads: ${OMP_NUM_THREADS:-all}."
