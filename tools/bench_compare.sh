#!/usr/bin/env bash
# Speed of two gemma3 binaries side by side on the same model files: runs them in turns
# (A B, B A, A B, ...) so that both see the same machine state, and prints each one's median
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
# On a virtual machine, a run during which the hypervisor gave other guests over 1 % of
# the CPU time the run had (/proc/stat "steal", against wall time x CPUs) is "disturbed":
# its threads lost their cores mid-step and it ran several percent slow. The rates are
# medians of the calm runs where each binary has at least 3 (the table says how many),
# else of all; B / A is the median of the rounds' own ratios (B's run over the A run beside
# it, rounds with both runs calm where there are 3), which drift in the machine's
# speed between rounds moves less than a ratio of medians.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
A=$1 B=$2
shift 2
ROUNDS=${ROUNDS:-5} DECODE=${DECODE:-64} PREFILL_TOKENS=${PREFILL_TOKENS:-512}
for bin in "$A" "$B"; do [ -x "$bin" ] || { echo "bench_compare: $bin is not an executable" >&2; exit 2; }; done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$(dirname "$0")/.."
# A prompt of about PREFILL_TOKENS tokens: README.md's prose (about 4 characters a token),
# less the name of the image token, which gemma3 -p refuses in text.
tr -s ' \n' ' ' <README.md | sed 's/<image_soft_token>/image token/g' | head -c $((PREFILL_TOKENS * 4)) > "$work/long.txt" || true  # (head closes the pipe early)
[ -s "$work/long.txt" ] || { echo "bench_compare: no README.md beside tools/ for the prompt" >&2; exit 2; }
cpus=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)

# steal: the hypervisor's steal ticks since boot (all CPUs; 0 where there is no such figure)
steal() { awk '/^cpu / { s = $9 } END { print s + 0 }' /proc/stat 2>/dev/null || echo 0; }
ticks=$(getconf CLK_TCK 2>/dev/null || echo 100)

# rate BIN MODEL WHICH ARGS...: prints "RATE CALM" for one run: the prompt (WHICH=1) or
# generation (2) rate, and 1 if the run was not disturbed (0 if it was)
rate() {
    local bin=$1 model=$2 which=$3 s0 s1 t0 t1
    shift 3
    s0=$(steal); t0=$(date +%s.%N)
    "$bin" "$model" "$@" 2>"$work/err" >/dev/null || { cat "$work/err" >&2; return 1; }
    s1=$(steal); t1=$(date +%s.%N)
    sed -n 's/^prompt \([0-9]*\) tokens, \([0-9.]*\) tok\/s; generated \([0-9]*\) tokens, \([0-9.]*\) tok\/s$/\1 \2 \3 \4/p' "$work/err" |
        awk -v w="$which" -v want="$DECODE" -v st=$((s1 - s0)) -v wall="$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" \
            -v cpus="$cpus" -v hz="$ticks" \
            '{ calm = st / hz <= 0.01 * wall * cpus; if (w == 1) print $2, calm; else if ($3 + 0 >= want) print $4, calm; else print "short" }'
}

# median FILE: the median value of the calm lines in FILE ("VALUE CALM" lines; - for
# stdin) if they are at least 3, else of all; then how many lines were calm
median() {
    awk '$2 == 1 { c[++nc] = $1 } { a[++na] = $1 } END {
        if (nc >= 3) { for (i = 1; i <= nc; i++) v[i] = c[i]; n = nc } else { for (i = 1; i <= na; i++) v[i] = a[i]; n = na }
        for (i = 2; i <= n; i++) { x = v[i]; for (j = i - 1; j >= 1 && v[j] > x; j--) v[j + 1] = v[j]; v[j + 1] = x }
        printf "%s %d\n", (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2, nc }' "$1"
}

# ratio FILE_A FILE_B: the median of B's rate over A's, round by round (a round is calm
# when both its runs are), as median takes it
ratio() {
    paste -d ' ' "$1" "$2" | awk '{ print $3 / $1, ($2 == 1 && $4 == 1) }' | median - | awk '{ printf "%.3f\n", $1 }'
}

printf '| model | A prefill | B prefill | B / A | A decode | B decode | B / A | calm runs of %d: prefill A, B; decode A, B |\n' "$ROUNDS"
printf '|---|---|---|---|---|---|---|---|\n'
for model in "$@"; do
    dec=(-p "The history of" -n "$DECODE" -t 0)
    if [ "$(rate "$A" "$model" 2 "${dec[@]}")" = short ]; then dec=(-p "The history of" -n "$DECODE" -t 1 -s 1); fi
    : >"$work/pa"; : >"$work/pb"; : >"$work/da"; : >"$work/db"
    for r in $(seq "$ROUNDS"); do
        order=(A B); [ $((r % 2)) -eq 0 ] && order=(B A) # A B, B A, ...: neither always goes first
        for x in "${order[@]}"; do
            bin=$A; [ "$x" = B ] && bin=$B
            rate "$bin" "$model" 1 -f "$work/long.txt" -n 0 >>"$work/p${x,,}"
        done
        for x in "${order[@]}"; do
            bin=$A; [ "$x" = B ] && bin=$B
            rate "$bin" "$model" 2 "${dec[@]}" >>"$work/d${x,,}"
        done
        echo "bench_compare: $(basename "$model") round $r/$ROUNDS" >&2
    done
    if grep -q short "$work/da" "$work/db"; then echo "bench_compare: $model: generation stopped early" >&2; exit 1; fi
    read -r pa npa < <(median "$work/pa"); read -r pb npb < <(median "$work/pb")
    read -r da nda < <(median "$work/da"); read -r db ndb < <(median "$work/db")
    awk -v m="$(basename "$model")" -v pa="$pa" -v pb="$pb" -v da="$da" -v db="$db" -v n="$npa, $npb; $nda, $ndb" \
        -v rp="$(ratio "$work/pa" "$work/pb")" -v rd="$(ratio "$work/da" "$work/db")" \
        'BEGIN { printf "| %s | %.1f | %.1f | %s | %.2f | %.2f | %s | %s |\n", m, pa, pb, rp, da, db, rd, n }'
done
echo
echo "A = $A, B = $B; $ROUNDS rounds of alternated runs: rates are medians (of the calm runs where each binary has 3), B / A the median of the rounds' ratios (of the calm rounds where there are 3); prefill: a $(wc -c <"$work/long.txt")-character prompt; decode: $DECODE tokens; threads: ${OMP_NUM_THREADS:-all}."
