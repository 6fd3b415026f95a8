#!/usr/bin/env bash
# gemma3 and llama.cpp side by side on the same GGUF files: prefill (pp) and decode (tg)
# tokens/s of each, measured in turns in one run (A B, B A, A B, ...: both see the same
# machine state), and the ratio gemma3 / llama.cpp. Prints a Markdown table on stdout
# (progress on stderr). Not a test and not in CI: it needs a llama.cpp built beside the
# project (never committed), e.g.
#
#   git clone https://github.com/ggml-org/llama.cpp ../llama.cpp
#   cmake -S ../llama.cpp -B ../llama.cpp/build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
#   cmake --build ../llama.cpp/build --target llama-bench -j2
#   LLAMA_CPP=../llama.cpp bash tools/bench_llamacpp.sh
#
# Cases (CASES, default "270m:q4_k_m 1b:q4_k_m 1b:q8_0 1b:q4_0 1b:bf16"), SHAPE:TYPE:
#   270m:q4_k_m  the real Gemma 3 270M Q4_K_M GGUF that `make test-real` uses
#                (tests/fetch_real_model.sh, cached in ~/.cache/gemma3c; $GEMMA3_GGUF)
#   1b:TYPE      the random 1B checkpoint of tools/bench.sh (same cache, tests/build/bench/1b)
#                as a GGUF that tools/make_gguf.py writes: q4_k_m (llama.cpp's mix, as
#                tools/bench.sh measures it), q8_0, q4_0, bf16 (f32, f16 too)
#   270m-random:TYPE  the same on the random 270M checkpoint of `bench.sh --quick` (quick)
# llama.cpp runs each GGUF as it is. gemma3 runs its export of that GGUF: q4_k_m with the
# blocks kept (export.py --dtype gguf), the others in gemma3's own format of that name
# (--dtype q8_0 / q4_0 / bf16, from the GGUF's values; f16 -> bf16). Files are cached in
# BENCH_DIR (tests/build/bench) and redone when the tools that make them are newer.
#
# Measurements, ROUNDS rounds (default 5) of one run of each engine per measurement:
#   prefill  llama-bench -p PP -n 0 -r 1 (its pp, after its warmup pass); gemma3 -f TEXT -n 0
#            with a TEXT of PP - 1 tokens (PP with <bos>) and -p "" -n 0 (<bos> alone: the
#            first pass, which also takes the page faults of the mmap'd weights), rate =
#            (PP - 1) / (prompt time - <bos> time), the prompt times gemma3's own timers.
#   decode   llama-bench -p 0 -n TG -r 1 (its tg: TG single-token passes after the warmup);
#            gemma3 -p PROMPT -n TG + 1: TG forward passes after the prompt, its generation
#            timer. Greedy; a random model that stops early is rerun sampled (-t 1 -s 1).
# Rates are medians of the rounds; gemma3 / llama.cpp is the median of the rounds' own
# ratios. Both engines use THREADS threads (OMP_NUM_THREADS for gemma3, -t for llama-bench).
#
# Environment (defaults in brackets):
#   LLAMA_CPP            llama.cpp source tree with build/bin/llama-bench      (required,
#                        or LLAMA_BENCH=path of the binary)
#   CASES                see above
#   ROUNDS=5  PP=512  TG=64  THREADS=$OMP_NUM_THREADS or all cores
#   LLAMA_ARGS=""        more llama-bench options (e.g. "-fa on")
#   GEMMA3=./gemma3      binary to measure (default: `make gemma3` first)
#   BENCH_DIR=tests/build/bench
#
#   bash tools/bench_llamacpp.sh [--quick]    --quick: CASES="270m-random:q4_k_m" ROUNDS=2
#                                             PP=64 TG=16, to see that it works
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "bench_llamacpp: $*" >&2; }
die() { echo "bench_llamacpp: error: $*" >&2; exit 1; }

if [ "${1:-}" = --quick ]; then
    CASES=${CASES:-270m-random:q4_k_m} ROUNDS=${ROUNDS:-2} PP=${PP:-64} TG=${TG:-16}
elif [ -n "${1:-}" ]; then
    case "$1" in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
    die "unknown argument '$1' (usage: LLAMA_CPP=DIR bash tools/bench_llamacpp.sh [--quick])"
fi
CASES=${CASES:-270m:q4_k_m 1b:q4_k_m 1b:q8_0 1b:q4_0 1b:bf16}
ROUNDS=${ROUNDS:-5} PP=${PP:-512} TG=${TG:-64}
THREADS=${THREADS:-${OMP_NUM_THREADS:-$(nproc)}}
BENCH_DIR=${BENCH_DIR:-tests/build/bench}
LLAMA_ARGS=${LLAMA_ARGS:-}
for v in ROUNDS PP TG THREADS; do
    case "${!v}" in ''|0|*[!0-9]*) die "$v must be a positive count, got '${!v}'" ;; esac
done
[ "$PP" -ge 2 ] || die "PP must be at least 2"

if [ -z "${LLAMA_BENCH:-}" ]; then
    [ -n "${LLAMA_CPP:-}" ] || die "set LLAMA_CPP to a llama.cpp tree with build/bin/llama-bench (or LLAMA_BENCH to the binary)"
    LLAMA_BENCH=$LLAMA_CPP/build/bin/llama-bench
fi
[ -x "$LLAMA_BENCH" ] || die "$LLAMA_BENCH is not an executable (cmake --build build --target llama-bench)"
if [ -n "${GEMMA3:-}" ]; then
    [ -x "$GEMMA3" ] || die "GEMMA3=$GEMMA3 is not an executable"
else
    GEMMA3=./gemma3
    make -s gemma3 >&2 || die "make gemma3 failed"
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/gemma3-bench-llamacpp.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp "$GEMMA3" "$work/gemma3" # a private copy: a rebuild in this tree mid-run must not change it
bin=$work/gemma3
export OMP_NUM_THREADS=$THREADS

calc() { awk "BEGIN { printf $* }"; }

# ---- the files ------------------------------------------------------------------------
tok=tests/data/tokenizer.json

# checkpoint PRESET: the random checkpoint of tools/bench.sh (same command, same stamp:
# the two scripts share it); prints its directory.
checkpoint() {
    local ckpt=$BENCH_DIR/$1/checkpoint gen
    gen="python3 tools/make_checkpoint.py $ckpt --preset $1 --fast-random --seed 1 --tokenizer $tok"
    if [ "$(cat "$ckpt/.bench-stamp" 2>/dev/null)" != "$gen" ]; then
        [ -f "$tok" ] || bash tests/fetch_tokenizer.sh >&2 || die "no $tok"
        say "writing the random $1 checkpoint: $gen"
        rm -rf "$ckpt"
        mkdir -p "$BENCH_DIR/$1"
        $gen >&2 || die "the checkpoint generator failed"
        echo "$gen" >"$ckpt/.bench-stamp"
    fi
    echo "$ckpt"
}

# newer FILE DEPS...: true if FILE is missing or older than one of DEPS
newer() {
    local f=$1 d; shift
    [ -f "$f" ] || return 0
    for d in "$@"; do [ "$d" -nt "$f" ] && return 0; done
    return 1
}

# case_files SHAPE TYPE: sets GGUF (the file llama.cpp runs) and BIN (gemma3's export of it)
case_files() {
    local shape=$1 type=$2 ckpt dtype
    case "$type" in q4_k_m) dtype=gguf ;; f16) dtype=bf16 ;; *) dtype=$type ;; esac
    case "$shape" in
        270m)
            [ "$type" = q4_k_m ] || die "case 270m:$type: the real 270M is a Q4_K_M file only"
            GGUF=${GEMMA3_GGUF:-${GEMMA3C_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gemma3c}/gemma-3-270m-q4_k_m.gguf}
            [ -f "$GGUF" ] || bash tests/fetch_real_model.sh >&2 || die "no $GGUF (tests/fetch_real_model.sh)"
            BIN=$BENCH_DIR/llamacpp/real-270m-$type.bin ;;
        1b|270m-random)
            ckpt=$(checkpoint "${shape%-random}")
            GGUF=$BENCH_DIR/${shape%-random}/model-$type.gguf
            if newer "$GGUF" "$ckpt/.bench-stamp" tools/make_gguf.py tools/gguf_quantize.c; then
                say "writing $GGUF: python3 tools/make_gguf.py $ckpt $GGUF --type $type"
                python3 tools/make_gguf.py "$ckpt" "$GGUF" --type "$type" -q || die "tools/make_gguf.py failed"
            fi
            # q4_k_m: the very file tools/bench.sh measures
            if [ "$type" = q4_k_m ]; then BIN=$BENCH_DIR/${shape%-random}/model-q4_k_m.bin
            else BIN=$BENCH_DIR/llamacpp/${shape%-random}-$type-gguf.bin; fi ;;
        *) die "unknown case '$shape:$type' (270m:q4_k_m, 1b:TYPE, 270m-random:TYPE)" ;;
    esac
    mkdir -p "$(dirname "$BIN")"
    if newer "$BIN" "$GGUF" export.py; then
        say "exporting: python3 export.py $GGUF $BIN --dtype $dtype"
        python3 export.py "$GGUF" "$BIN.tmp" --dtype "$dtype" -q || { rm -f "$BIN.tmp"; die "export.py failed"; }
        mv -f "$BIN.tmp" "$BIN"
    fi
}

# ---- one run of each engine ---------------------------------------------------------------
# gemma3_times MODEL ARGS...: sets P_N P_S G_N G_S (prompt tokens, seconds; generated
# tokens, seconds) from gemma3's "prompt N tokens, X tok/s; generated M tokens, Y tok/s".
gemma3_times() {
    local model=$1 line; shift
    "$bin" "$model" "$@" >/dev/null 2>"$work/err" || { tail -n 3 "$work/err" >&2; die "gemma3 failed: $model $*"; }
    line=$(grep '^prompt [0-9]* tokens, [0-9.]* tok/s; generated [0-9]* tokens, [0-9.]* tok/s' "$work/err" | tail -n 1)
    [ -n "$line" ] || die "no timing line from gemma3 (see $work/err)"
    read -r P_N P_S G_N G_S < <(echo "$line" | awk '{ gsub(/[,;]/, ""); printf "%d %.9f %d %.9f\n", $2, ($4 > 0 ? $2 / $4 : 0), $7, ($9 > 0 ? $7 / $9 : 0) }')
}

# gemma3_pp MODEL: prints gemma3's prefill tok/s (the prompt less the <bos>-alone pass)
gemma3_pp() {
    local base
    gemma3_times "$1" -p "" -n 0
    base=$P_S
    gemma3_times "$1" -f "$work/prompt.txt" -n 0
    awk -v n="$P_N" -v s="$P_S" -v b="$base" 'BEGIN { if (s > b) printf "%.3f\n", (n - 1) / (s - b); else print "nan" }'
}

# gemma3_tg MODEL: prints gemma3's decode tok/s: TG + 1 tokens generated are TG forward
# passes (the last token is not fed back); "short" if generation stopped early
gemma3_tg() {
    gemma3_times "$1" -p "The history of" -n $((TG + 1)) "${SAMPLING[@]}"
    if [ "$G_N" -lt $((TG + 1)) ]; then echo short; return 0; fi
    awk -v n="$G_N" -v s="$G_S" 'BEGIN { printf "%.3f\n", (n - 1) / s }'
}

# llama_rate GGUF -p N -n M: prints llama-bench's tok/s for that test (one repetition)
llama_rate() {
    local gguf=$1; shift
    # shellcheck disable=SC2086
    "$LLAMA_BENCH" -m "$gguf" "$@" -r 1 -t "$THREADS" $LLAMA_ARGS -o jsonl >"$work/lb.out" 2>"$work/lb.err" ||
        { tail -n 3 "$work/lb.err" >&2; die "llama-bench failed on $gguf"; }
    python3 -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
if not rows:
    sys.exit("no result from llama-bench")
print("%.3f" % rows[-1]["avg_ts"])' "$work/lb.out" || die "cannot read llama-bench's output ($work/lb.out)"
}

# median: of the numbers on stdin
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# ---- the cases ---------------------------------------------------------------------------------
rows=$work/rows.md
: >"$rows"
load0=$(cut -d ' ' -f 1-3 /proc/loadavg 2>/dev/null || echo "?")
for c in $CASES; do
    case_files "${c%%:*}" "${c#*:}"
    say "$c: $GGUF (llama.cpp) and $BIN (gemma3)"
    # the prompt: PP - 1 tokens of the docs (gemma3's tokenizer of this file), <bos> makes PP
    for _ in 1 2 3 4 5 6 7 8; do cat FORMAT.md README.md; done | sed 's/<image_soft_token>/image token/g' >"$work/source.txt"
    "$bin" "$BIN" --encode <"$work/source.txt" | tr ' ' '\n' | head -n $((PP - 1)) >"$work/ids.txt" || true
    [ "$(wc -l <"$work/ids.txt")" -eq $((PP - 1)) ] || die "the docs have fewer than $PP tokens"
    "$bin" "$BIN" --decode <"$work/ids.txt" >"$work/prompt.txt"
    SAMPLING=(-t 0)
    [ "$(gemma3_tg "$BIN")" = short ] && SAMPLING=(-t 1 -s 1) && say "  greedy stops early (random model): sampled, -t 1 -s 1"
    : >"$work/pa"; : >"$work/pb"; : >"$work/ta"; : >"$work/tb"
    for r in $(seq "$ROUNDS"); do
        order="a b"; [ $((r % 2)) -eq 0 ] && order="b a" # neither always goes first
        for x in $order; do
            if [ "$x" = a ]; then gemma3_pp "$BIN" >>"$work/pa"; else llama_rate "$GGUF" -p "$PP" -n 0 >>"$work/pb"; fi
        done
        for x in $order; do
            if [ "$x" = a ]; then gemma3_tg "$BIN" >>"$work/ta"; else llama_rate "$GGUF" -p 0 -n "$TG" >>"$work/tb"; fi
        done
        say "  round $r/$ROUNDS: pp $(tail -n 1 "$work/pa") / $(tail -n 1 "$work/pb"), tg $(tail -n 1 "$work/ta") / $(tail -n 1 "$work/tb") tok/s (gemma3 / llama.cpp)"
    done
    grep -q short "$work/ta" && die "$c: gemma3's generation stopped early even sampled"
    pa=$(median <"$work/pa"); pb=$(median <"$work/pb"); ta=$(median <"$work/ta"); tb=$(median <"$work/tb")
    rp=$(paste -d ' ' "$work/pa" "$work/pb" | awk '{ print $1 / $2 }' | median)
    rt=$(paste -d ' ' "$work/ta" "$work/tb" | awk '{ print $1 / $2 }' | median)
    label=$c; [ "${SAMPLING[*]}" = "-t 0" ] || label="$c (gemma3 sampled)"
    echo "| $label | $(calc "\"%.2f GB\", $(wc -c <"$GGUF") / 1e9") / $(calc "\"%.2f GB\", $(wc -c <"$BIN") / 1e9") |" \
         "$(calc "\"%.1f\", $pa") | $(calc "\"%.1f\", $pb") | $(calc "\"%.2f\", $rp") |" \
         "$(calc "\"%.2f\", $ta") | $(calc "\"%.2f\", $tb") | $(calc "\"%.2f\", $rt") |" >>"$rows"
done

cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1)
rev=$(git rev-parse --short HEAD 2>/dev/null || echo "?")
git diff --quiet HEAD -- gemma3.c kernels_x86.c gguf_blocks.c 2>/dev/null || rev="$rev + local changes"
# llama.cpp's build as llama-bench reports it
lrev=$(python3 -c '
import json, sys
r = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")][-1]
print("%s (build %s)" % (r.get("build_commit", "?"), r.get("build_number", "?")))' "$work/lb.out" 2>/dev/null || echo "?")
echo "Machine: $(getconf _NPROCESSORS_ONLN) CPUs, ${cpu:-unknown CPU}, $THREADS threads each, load average $load0 at the start; gemma3 $rev, llama.cpp $lrev (llama-bench${LLAMA_ARGS:+ $LLAMA_ARGS})."
echo "$ROUNDS rounds, the engines in turns; rates are medians, gemma3 / llama.cpp the median of the rounds' ratios. pp$PP: a $PP-token prompt; tg$TG: $TG tokens decoded (greedy; \"gemma3 sampled\": -t 1 -s 1, the random model's greedy run stopped early)."
echo
echo "| case | size: GGUF / gemma3 file | gemma3 pp$PP tok/s | llama.cpp pp$PP | gemma3 / llama.cpp | gemma3 tg$TG tok/s | llama.cpp tg$TG | gemma3 / llama.cpp |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
cat "$rows"
