#!/usr/bin/env bash
# Inference speed of gemma3 on a random checkpoint of the real Gemma 3 1B shape, for each
# model file format: file size, peak RSS, prefill and decode tokens/s, and decode as a
# share of the memory-bandwidth limit. Prints a Markdown table on stdout (progress goes to
# stderr). Not a test: numbers depend on the machine and its load and are never asserted.
#
#   bash tools/bench.sh [--quick]          (or: make bench)
#
#   --quick   smoke run on the 270M shape, short prompts (under a minute once cached)
#
# Environment (defaults in brackets):
#   FORMATS="f32 bf16 q8_0 q4_0 q4_k_m"
#                        export.py --dtype values to measure; one whose export fails is
#                        reported as such and skipped, the others still run. q4_k_m: the
#                        checkpoint written as a Q4_K_M GGUF by tools/make_gguf.py
#                        (llama.cpp's mix of Q4_K, Q6_K, Q5_0 and Q8_0, made without
#                        llama.cpp), exported with its blocks kept (--dtype gguf)
#   PREFILL="128 512"    prompt lengths for prefill tok/s        [quick: "32 128"]
#   DECODE=64            tokens to generate for decode tok/s     [quick: 32]
#   REPEAT=1             runs of each prefill and decode measurement; the fastest prefill
#                        and the median decode run (by share of its limit) are kept
#                        (the machine may be shared: 3 steadies the numbers)
#   FILL_CONTEXT=0       N > 0: also run each format with -c N and a prompt of N - 8 tokens
#                        (-f), and report its peak RSS with the whole KV cache in use and its
#                        prefill rate (slow: Gemma 3 1B at N = 32768 takes minutes per format)
#   LONG_FORMATS=""      formats (of FORMATS) whose prefill is also measured on long prompts,
#                        once each (slow: Gemma 3 1B at 16K tokens takes minutes a format)
#   LONG_PREFILL="512 4096 16384"
#                        those prompts' lengths in tokens; each run gets -c of its length
#                        + 8 and the prompt in a file (-f). The table gives each rate as a
#                        share of the first length's: attention's work per token grows with
#                        the position, the matrices' does not
#   MEMBW_MIB=1024       array size of the bandwidth probe, MiB (must exceed the caches)
#   OMP_NUM_THREADS      threads for gemma3 and the probe        [all cores]
#   GEMMA3=./gemma3      binary to measure (default: `make gemma3` first)
#   BENCH_DIR=tests/build/bench   cache of checkpoints and exported files
#
# The random checkpoint (tools/make_checkpoint.py, seed 1, with the real tokenizer) and
# each exported file are cached in BENCH_DIR and reused; an exported file is redone when
# export.py (or, for q4_k_m's GGUF, tools/make_gguf.py or tools/gguf_quantize.c) is newer
# than it. The 1B shape needs about 2 GB (checkpoint) + 4 GB (f32) + 2 GB (bf16) + 1.1 GB
# (q8_0) + 0.6 GB (q4_0) + 2 x 0.8 GB (q4_k_m: the GGUF and its export) of disk. `rm -rf tests/build/bench` frees it
# (`make clean` does too).
#
# What is measured, and how (each in a small function below, easy to adapt if the CLI
# grows a --bench mode):
#   timers   gemma3 -p times its prompt and its generation loop itself and prints
#            "prompt N tokens, X tok/s; generated M tokens, Y tok/s" on stderr: those
#            timers leave out process start, load and tokenization, whose noise a
#            difference of two wall-clock times would add. (One decimal: about 1% at the
#            rates seen here.) stderr_rates() is the one place that reads them.
#   prefill  `gemma3 M -p TEXT -n 0` with a TEXT of T - 1 tokens (T with <bos>), and
#            with an empty TEXT (<bos> only). The first forward pass of a process also
#            takes the page faults of the mmap'd weights; the <bos>-only run measures
#            that pass, so prefill tok/s = (T - 1) / (prompt time(T) - prompt time(1)).
#            (Not --logits: that computes the classifier for every position, which
#            a prompt does not need.) TEXT is cut from FORMAT.md and README.md: encoded,
#            the first T - 1 ids kept, decoded back to text.
#   decode   `gemma3 M -p PROMPT -n N -t 0`. Its generation time covers N samplings
#            and N - 1 forward passes (the last token is not fed back), so
#            decode tok/s = (N - 1) / generation time. The model is random: if greedy
#            decoding stops early at <eos>/<end_of_turn>, it is retried with -t 1 -s 1
#            (marked "sampled"), and a run that still stops early is reported with the
#            number of tokens it really generated (then every one was fed back).
#   pages    before a format's runs its file is dropped from the page cache and read back
#            (page_in), so that it sits in 2 MiB pages as after a reboot; the share that
#            maps so is reported under the table.
#   RSS      peak resident set of the process (/usr/bin/time %M, else python3's
#            getrusage of the child: the same kernel figure, ru_maxrss), the largest of the
#            runs of a format. The model file is mmap'd, so its touched pages count.
#   limit    tools/membw.c sums a 1 GiB float array (2 MiB pages on Linux) with all
#            threads, one stream and four streams per thread in turns, and reports the
#            faster pattern's best. It runs before the first decode run and after each
#            one (the machine is shared: bandwidth moves with the neighbours' load, within
#            seconds), so every run has a probe right before and right after it, and its
#            bandwidth is the better of the two. Decode reads every weight once per
#            token, so a run's limit tok/s = its bandwidth / weight bytes, the weight
#            bytes being the sum of the tensor sizes in the file's tensor directory
#            (FORMAT.md). Of the REPEAT runs, the table reports the median one by share
#            of its limit (its tok/s, bandwidth, limit and %), and the mean of all the
#            probes' medians beside its bandwidth. Runs during which the hypervisor took
#            over 1 % of the CPU time away (/proc/stat steal) are logged as disturbed and
#            left out of the median (counted under the table), unless all of them were.
#   peak     tools/peak.c runs once before the formats: each kind of vector multiply-add
#            the CPU has (f32 FMA, bf16 dot, int8 dot), on all threads, in multiply-adds
#            per second (one product added to a sum). A second table gives each prefill
#            as a share of the peak of the arithmetic its format's matmuls use: f32 the
#            best f32 FMA kind, bf16 the bf16 dot where the CPU has one (else the FMA),
#            q8_0, q4_0 and q4_k_m the best int8 kind. Multiply-adds per token are those of the
#            layers' matrices, rows x columns of each (the header's shape: q, k, v, o,
#            gate, up, down, times the layers), i.e. one per weight: no attention scores
#            or values (which grow with the position), norms, embedding or classifier
#            (a prompt's positions but the last skip it). So the share understates the
#            arithmetic done, more so for long prompts.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench: unknown argument '$arg' (usage: bash tools/bench.sh [--quick])" >&2; exit 2 ;;
    esac
done

if [ "$quick" = 1 ]; then
    preset=270m; prefill_default="32 128"; decode_default=32
else
    preset=1b; prefill_default="128 512"; decode_default=64
fi
FORMATS=${FORMATS:-f32 bf16 q8_0 q4_0 q4_k_m}
PREFILL=${PREFILL:-$prefill_default}
DECODE=${DECODE:-$decode_default}
REPEAT=${REPEAT:-1}
FILL_CONTEXT=${FILL_CONTEXT:-0}
LONG_FORMATS=${LONG_FORMATS:-}
LONG_PREFILL=${LONG_PREFILL:-512 4096 16384}
MEMBW_MIB=${MEMBW_MIB:-1024}
BENCH_DIR=${BENCH_DIR:-tests/build/bench}
PROMPT="The quick brown fox jumps over the lazy dog"

say() { echo "bench: $*" >&2; }
die() { echo "bench: error: $*" >&2; exit 1; }

for t in $PREFILL; do
    case "$t" in ''|*[!0-9]*) die "PREFILL must be token counts >= 2, got '$t'" ;; esac
    [ "$t" -ge 2 ] || die "PREFILL must be token counts >= 2, got '$t'"
done
case "$DECODE" in ''|*[!0-9]*) die "DECODE must be a token count >= 2, got '$DECODE'" ;; esac
[ "$DECODE" -ge 2 ] || die "DECODE must be a token count >= 2, got '$DECODE'"
case "$REPEAT" in ''|0|*[!0-9]*) die "REPEAT must be a count >= 1, got '$REPEAT'" ;; esac
for t in $LONG_PREFILL; do
    case "$t" in ''|*[!0-9]*) die "LONG_PREFILL must be token counts >= 2, got '$t'" ;; esac
    [ "$t" -ge 2 ] || die "LONG_PREFILL must be token counts >= 2, got '$t'"
done
for f in $LONG_FORMATS; do
    case " $FORMATS " in *" $f "*) ;; *) die "LONG_FORMATS: '$f' is not in FORMATS ($FORMATS)" ;; esac
done
case "$FILL_CONTEXT" in ''|*[!0-9]*) die "FILL_CONTEXT must be a context length (0 = off), got '$FILL_CONTEXT'" ;; esac
[ "$FILL_CONTEXT" = 0 ] || [ "$FILL_CONTEXT" -ge 16 ] || die "FILL_CONTEXT must be 0 or at least 16, got '$FILL_CONTEXT'"
command -v python3 >/dev/null || die "python3 is needed (checkpoint generator and exporter)"

mkdir -p "$BENCH_DIR/$preset"
# Scratch files (logs, prompts) live outside BENCH_DIR: a `make clean` elsewhere must not
# pull them away mid-run.
work=$(mktemp -d "${TMPDIR:-/tmp}/gemma3-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT

# ---- binaries ---------------------------------------------------------------------
if [ -n "${GEMMA3:-}" ]; then
    [ -x "$GEMMA3" ] || die "GEMMA3=$GEMMA3 is not an executable"
else
    GEMMA3=./gemma3
    make -s gemma3 >&2 || die "make gemma3 failed"
fi
# Measure a private copy: other work in this tree (make asan, make valgrind, a test run)
# may rebuild ./gemma3 with other flags in the middle of a long run.
cp "$GEMMA3" "$work/gemma3" || die "cannot copy $GEMMA3"
bin=$work/gemma3
build="OpenMP"
if command -v ldd >/dev/null; then
    libs=$(ldd "$bin" 2>/dev/null || true)
    case "$libs" in *gomp*|*libomp*) ;; *) build="no OpenMP: one thread" ;; esac
    case "$libs" in *asan*|*ubsan*|*tsan*) build="$build, SANITIZER BUILD: not representative" ;; esac
fi
case "$build" in OpenMP) ;; *) say "warning: $GEMMA3 is a build with $build" ;; esac

# The bandwidth probe, built afresh each run as gemma3 is (-O3, -march=native where the
# compiler has it): an -O2 build without -march sums with 16-byte SSE loads, four per
# cache line, and read 10-14 % less than this one when the memory ran at ~88 GB/s (the
# same at ~50): the limit has to be what the machine can read, not what a slow loop reads.
# OpenMP like gemma3; without it, one thread (said in the header).
# The arithmetic peak probe (tools/peak.c): no -march, it picks its instructions at run time.
peak=$work/peak
if ! ${CC:-cc} -O2 -fopenmp -o "$peak" tools/peak.c 2>"$work/cc-peak.log"; then
    ${CC:-cc} -O2 -o "$peak" tools/peak.c || die "cannot build tools/peak.c"
fi

membw=$work/membw
membw_note=""
membw_flags="-O3"
${CC:-cc} -march=native -x c -c -o /dev/null /dev/null 2>/dev/null && membw_flags="-O3 -march=native"
if ! ${CC:-cc} $membw_flags -fopenmp -o "$membw" tools/membw.c 2>"$work/cc.log"; then
    ${CC:-cc} $membw_flags -o "$membw" tools/membw.c || die "cannot build tools/membw.c"
    membw_note=" (membw built without OpenMP: one thread)"
fi

# Peak RSS: GNU time if installed, else the same figure (ru_maxrss of the waited-for
# child, KiB on Linux) from python3's resource module.
if command -v /usr/bin/time >/dev/null && /usr/bin/time -f %M -o /dev/null true 2>/dev/null; then
    rss_tool="/usr/bin/time -f %M"
else
    rss_tool="python3 getrusage"
fi

# ---- helpers ----------------------------------------------------------------------
now() { date +%s.%N; }
calc() { awk "BEGIN { printf $* }"; }     # calc '"%.2f", 1 / 3' prints 0.33

# run_timed LOG CMD...: runs CMD (stdout to LOG.out, stderr to LOG), sets T_WALL
# (wall seconds, for the log: the rates come from gemma3's own timers), raises PEAK_RSS (KiB) and adds the run's major page faults to MAJFLT (pages
# read from disk: the file was not, or no longer, in the page cache; such a run measured
# the disk). Logs the command and its figures to $logs/runs. Returns CMD's exit status.
run_timed() {
    local log=$1 t0 t1 rc=0 rss maj; shift
    t0=$(now)
    if [ "$rss_tool" = "python3 getrusage" ]; then
        python3 -c '
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
u = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write("%d %d\n" % (u.ru_maxrss, u.ru_majflt))
sys.exit(rc)' "$work/rss" "$@" >"$log.out" 2>"$log" || rc=$?
    else
        /usr/bin/time -f "%M %F" -o "$work/rss" "$@" >"$log.out" 2>"$log" || rc=$?
    fi
    t1=$(now)
    T_WALL=$(calc "\"%.6f\", $t1 - $t0")
    read -r rss maj < <(tail -n 1 "$work/rss" 2>/dev/null || true) || true
    case "$rss" in ''|*[!0-9]*) rss=0 ;; esac
    case "$maj" in ''|*[!0-9]*) maj=0 ;; esac
    [ "$rss" -gt "$PEAK_RSS" ] && PEAK_RSS=$rss
    MAJFLT=$((MAJFLT + maj))
    echo "$T_WALL s, $rss KiB, $maj major faults, exit $rc: $*" | tr '\n' ' ' | cut -c 1-200 >>"$logs/runs"
    if [ "$rc" != 0 ]; then
        say "failed (exit $rc): $*"
        tail -n 3 "$log" | sed 's/^/    /' >&2
    fi
    return "$rc"
}

# weight_bytes FILE: the sum of the tensor data sizes in the tensor directory (FORMAT.md:
# n_tensors u32 @88, directory offset u64 @112, 104-byte entries, data size u64 @96).
weight_bytes() {
    python3 - "$1" <<'PY'
import struct, sys
with open(sys.argv[1], "rb") as f:
    h = f.read(128)
    if len(h) < 128 or h[:4] != b"GM3C":
        sys.exit("not a gemma3.c model file: " + sys.argv[1])
    n_tensors, = struct.unpack_from("<I", h, 88)
    dir_off, = struct.unpack_from("<Q", h, 112)
    f.seek(dir_off)
    d = f.read(104 * n_tensors)
total = sum(struct.unpack_from("<Q", d, 104 * i + 96)[0] for i in range(n_tensors))
print(total)
PY
}

# matmul_macs FILE: multiply-adds per token in the layers' matrices (one per weight of q, k,
# v, o, gate, up and down), from the header's shape (FORMAT.md).
matmul_macs() {
    python3 - "$1" <<'PY'
import struct, sys
with open(sys.argv[1], "rb") as f:
    h = f.read(128)
if len(h) < 128 or h[:4] != b"GM3C":
    sys.exit("not a gemma3.c model file: " + sys.argv[1])
dim, hidden, layers, heads, kv, hd = struct.unpack_from("<6I", h, 20)
print(layers * (2 * dim * heads * hd + 2 * dim * kv * hd + 3 * dim * hidden))
PY
}

# peak_of FMT: the peak (G multiply-adds/s) of the arithmetic FMT's matmuls use, and its
# name, from tools/peak.c's lines in $work/peak.txt; nothing if the probe has no such kind.
peak_of() {
    local pat
    case "$1" in
        f32) pat='^peak: f32 ' ;;
        bf16) if grep -q '^peak: bf16 ' "$work/peak.txt"; then pat='^peak: bf16 '; else pat='^peak: f32 '; fi ;;
        *) pat='^peak: int8 ' ;;
    esac
    grep "$pat" "$work/peak.txt" | sed 's/^peak: \(.*\): \([0-9.]*\) G.*/\2 \1/' | sort -g -r | head -n 1
}

# steal_ms: CPU time the hypervisor gave other guests (/proc/stat "steal", all CPUs), in ms
# since boot; 0 where there is no such figure. A decode run's share of it goes in the log:
# a run whose threads lost the CPU waits for them at every matmul.
steal_ms() {
    awk '/^cpu / { s = $9 } END { printf "%d\n", (s + 0) * 1000 / '"$(getconf CLK_TCK 2>/dev/null || echo 100)"' }' /proc/stat 2>/dev/null || echo 0
}

# bandwidth TAG: runs the probe, sets BW_BEST and BW_MEDIAN (GB/s).
bandwidth() {
    local line
    line=$("$membw" "$MEMBW_MIB" 2>/dev/null) || { say "membw failed"; return 1; }
    echo "$line" >>"$work/membw.log"
    BW_BEST=$(echo "$line" | sed -n 's/.*best \([0-9.]*\) GB\/s.*/\1/p')
    BW_MEDIAN=$(echo "$line" | sed -n 's/.*median \([0-9.]*\) GB\/s.*/\1/p')
    if [ -z "$BW_BEST" ] || [ -z "$BW_MEDIAN" ]; then say "cannot parse membw output: $line"; return 1; fi
    say "  $1: $line"
}

# prompt_text MODEL T: writes $work/text-T.txt, a text of T - 1 tokens. Decoding then
# encoding again could merge tokens across the cut, so the rate uses the count gemma3
# prints, and the table marks a count other than T.
prompt_text() {
    local f=$work/text-$2.txt
    [ -f "$f" ] && return 0
    if [ ! -f "$work/source.txt" ]; then
        # less the name of the image token, which the docs mention and gemma3 -p refuses
        # (text may not place an image's soft tokens)
        for _ in 1 2 3 4 5 6 7 8; do cat FORMAT.md README.md; done | sed 's/<image_soft_token>/image token/g' >"$work/source.txt"
    fi
    "$bin" "$1" --encode <"$work/source.txt" >"$work/source.ids" || return 1
    # long prompts (FILL_CONTEXT): repeat the text until it has enough tokens
    while [ "$(wc -w <"$work/source.ids")" -lt "$2" ]; do
        cat "$work/source.txt" "$work/source.txt" >"$work/source2.txt" && mv "$work/source2.txt" "$work/source.txt"
        "$bin" "$1" --encode <"$work/source.txt" >"$work/source.ids" || return 1
    done
    tr ' ' '\n' <"$work/source.ids" | head -n "$(($2 - 1))" >"$work/ids-$2.txt"
    [ "$(wc -l <"$work/ids-$2.txt")" -eq "$(($2 - 1))" ] || { say "source text has fewer than $2 tokens"; return 1; }
    "$bin" "$1" --decode <"$work/ids-$2.txt" >"$f" || return 1
}

# stderr_rates LOG: sets P_N, P_S (prompt tokens and seconds) and G_N, G_S (generated
# tokens and seconds) from gemma3's "prompt N tokens, X tok/s; generated M tokens, Y tok/s"
# line (the seconds are N / X and M / Y; 0 when a rate is 0).
stderr_rates() {
    local line
    line=$(grep '^prompt [0-9]* tokens, [0-9.]* tok/s; generated [0-9]* tokens, [0-9.]* tok/s' "$1" | tail -n 1)
    [ -n "$line" ] || { say "no 'prompt N tokens, ... generated M tokens' line from gemma3 -p in $1"; return 1; }
    read -r P_N P_S G_N G_S < <(echo "$line" | awk '{ gsub(/[,;]/, ""); printf "%d %.9f %d %.9f\n", $2, ($4 > 0 ? $2 / $4 : 0), $7, ($9 > 0 ? $7 / $9 : 0) }')
}

# positive X: true if the number X is > 0.
positive() { awk "BEGIN { exit !($1 > 0) }"; }

# prefill_base MODEL: sets PF_BASE, gemma3's prompt time of `-p "" -n 0` (<bos> only: one
# forward pass with the weights' page faults); the better of two.
prefill_base() {
    PF_BASE=""
    for _ in 1 2; do
        run_timed "$logs/prefill-1.log" "$bin" "$1" -p "" -n 0 || return 1
        stderr_rates "$logs/prefill-1.log" || return 1
        if [ -z "$PF_BASE" ] || awk "BEGIN { exit !($P_S < $PF_BASE) }"; then PF_BASE=$P_S; fi
    done
}

# prefill_tps MODEL T: sets PF_TPS (prefill tok/s, the best of REPEAT runs; empty if no
# run gave a usable time) and PF_N (prompt tokens, <bos> included, as gemma3 counted them)
# for a prompt of about T tokens.
prefill_tps() {
    local r tps
    PF_TPS=""
    prompt_text "$1" "$2" || return 1
    for ((r = 0; r < REPEAT; r++)); do
        run_timed "$logs/prefill-$2.log" "$bin" "$1" -p "$(cat "$work/text-$2.txt")" -n 0 || return 1
        stderr_rates "$logs/prefill-$2.log" || return 1
        PF_N=$P_N
        # Not longer than the <bos>-only pass: the machine's load changed in between.
        positive "$P_S - $PF_BASE" || { say "  prefill $2: no slower than <bos> alone (noise)"; continue; }
        tps=$(calc "\"%.6f\", ($PF_N - 1) / ($P_S - $PF_BASE)")
        if [ -z "$PF_TPS" ] || awk "BEGIN { exit !($tps > $PF_TPS) }"; then PF_TPS=$tps; fi
    done
}

# decode MODEL WBYTES SAMPLING...: REPEAT runs of -n $DECODE with the given sampling
# options (same options, same seed: every run generates the same tokens), each between
# two bandwidth probes: probe, run, probe, run, probe. A run's limit is the better of
# the probes right before and after it / WBYTES: the memory's speed drifts within
# seconds, and two probes around all the runs bracketed a run's moment poorly. A run
# during which the hypervisor gave other guests (steal) over 1 % of the CPU time the run
# had (wall time x CPUs) is "disturbed": on this project's VM such runs were the slow ones
# (q4_0: 79-81 tok/s with 110-160 ms of steal, 88-90 with none, in one series). Sets,
# for the median run by share of its limit (of an even number, the lower of the middle
# two) among the undisturbed runs, or among all if every run was disturbed: DEC_N (tokens
# generated), DEC_TPS, DEC_BW (GB/s) and DEC_LIM (tok/s); DEC_MED, the mean of the
# probes' medians; DEC_DISTURBED, how many runs were disturbed. (The best share would
# pick the runs the probes misjudged: one bf16 run read 101 % of a probe's best.)
decode() {
    local model=$1 wbytes=$2 r forwards prev tps bw ratio med_sum=0 probes=0 runs="" calm="" pick steal tag; shift 2
    DEC_TPS=""
    DEC_DISTURBED=0
    bandwidth "probe" || return 1
    prev=$BW_BEST; med_sum=$BW_MEDIAN; probes=1
    for ((r = 0; r < REPEAT; r++)); do
        local steal0 steal1
        steal0=$(steal_ms)
        run_timed "$logs/decode.log" "$bin" "$model" -p "$PROMPT" -n "$DECODE" "$@" || return 1
        steal1=$(steal_ms)
        stderr_rates "$logs/decode.log" || return 1
        bandwidth "probe" || return 1
        med_sum=$(calc "\"%.4f\", $med_sum + $BW_MEDIAN"); probes=$((probes + 1))
        bw=$(calc "\"%.2f\", ($prev > $BW_BEST ? $prev : $BW_BEST)")
        prev=$BW_BEST
        DEC_N=$G_N
        # N generated tokens take N - 1 forward passes; a run cut short by a stop token
        # fed back all it generated.
        if [ "$G_N" -ge "$DECODE" ]; then forwards=$((G_N - 1)); else forwards=$G_N; fi
        if [ "$forwards" -le 0 ] || ! positive "$G_S"; then continue; fi
        tps=$(calc "\"%.6f\", $forwards / $G_S")
        ratio=$(calc "\"%.6f\", $tps * $wbytes / ($bw * 1e9)")
        steal=$((steal1 - steal0)); tag=""
        if awk "BEGIN { exit !($steal > 0.01 * $T_WALL * 1000 * $(nproc)) }"; then
            tag=", disturbed"; DEC_DISTURBED=$((DEC_DISTURBED + 1))
        else
            calm="$calm$ratio $tps $bw
"
        fi
        say "  run $((r + 1)): $(fmt_tps "$tps") tok/s, bandwidth $bw GB/s: $(calc "\"%.1f%%\", 100 * $ratio") of the limit (steal $steal ms in $(calc "\"%.1f\", $T_WALL") s$tag)"
        runs="$runs$ratio $tps $bw
"
    done
    DEC_MED=$(calc "\"%.2f\", $med_sum / $probes")
    [ -n "$runs" ] || return 0
    [ -n "$calm" ] && runs=$calm
    pick=$(printf '%s' "$runs" | sort -n -k 1,1 | awk '{ line[NR] = $0 } END { print line[int((NR + 1) / 2)] }')
    read -r ratio DEC_TPS DEC_BW <<<"$pick"
    DEC_LIM=$(calc "\"%.6f\", $DEC_BW * 1e9 / $wbytes")
}

# page_in FILE: reads FILE into the page cache afresh, so no run pays for the disk, and sets
# HUGE_SHARE to the share of it that a mapping gets in 2 MiB pages. Decode streams every
# weight once per token: in 4 KiB pages that is a TLB miss (a page-table walk) every 4 KiB,
# where the probe's array has 2 MiB pages. How the kernel caches a file depends on its
# history: read from disk, or written in aligned 4 MiB pieces as the exporters write, it
# sits in 2 MiB folios, but pages cached other ways (or kept through memory pressure) may
# be small, and it cannot merge them (MADV_COLLAPSE does not take such files). Seen here:
# a q4_0 file reused from an earlier bench mapped 32 % in 2 MiB pages, 94 % once read back
# from disk, and a q4_0 file in 4 KiB pages decoded 3-7 % slower than one in 2 MiB pages
# with the memory at ~80 GB/s (0-3 % at ~57; q8_0 about the same either way, alternated
# token by token in one process). So the file is dropped from the cache (dd iflag=nocache,
# which leaves pages that another process maps or that are not yet written) and read back,
# as after a reboot, and the share is measured (python3: mmap, MADV_HUGEPAGE, touch,
# /proc/self/smaps_rollup) and reported: "n/a" where the system does not say.
page_in() {
    dd if="$1" iflag=nocache count=0 status=none 2>/dev/null || true
    cat "$1" >/dev/null
    HUGE_SHARE=$(huge_share "$1") || HUGE_SHARE="n/a"
}
huge_share() {
    python3 - "$1" 2>/dev/null <<'PY'
import mmap, os, sys
size = os.path.getsize(sys.argv[1])
with open(sys.argv[1], "rb") as f:
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    m.madvise(mmap.MADV_HUGEPAGE)
    touched = sum(m[i] for i in range(0, size, 4096))
    with open("/proc/self/smaps_rollup") as r:
        kb = [int(l.split()[1]) for l in r if l.startswith("FilePmdMapped:")]
    m.close()
print("%.0f %%" % (100 * kb[0] * 1024 / size) if kb else "n/a")
PY
}

# short_row FMT TEXT: a table row that only says why this format has no numbers.
short_row() {
    local row="| $1 | $2 |" t
    for t in $PREFILL x x x x x; do row="$row |"; done   # 7 + k columns, 2 written
    echo "$row" >>"$rows"
}

fmt_tps() { [ -n "$1" ] && calc "\"%.\" ($1 < 10 ? 2 : 1) \"f\", $1" || echo "n/a"; }
fmt_gb() { calc "\"%.2f GB\", $1 / 1e9"; }

# ---- the checkpoint ---------------------------------------------------------------
tok=tests/data/tokenizer.json
if [ ! -f "$tok" ]; then
    say "fetching the Gemma 3 tokenizer (needed for -p): bash tests/fetch_tokenizer.sh"
    bash tests/fetch_tokenizer.sh >&2 || die "no $tok: gemma3 -p needs a tokenizer in the model file"
fi
ckpt=$BENCH_DIR/$preset/checkpoint
gen_cmd="python3 tools/make_checkpoint.py $ckpt --preset $preset --fast-random --seed 1 --tokenizer $tok"
# The stamp holds the command, written only after the generator succeeded: a half-written
# checkpoint (interrupted run) or one made with other options is made again.
if [ "$(cat "$ckpt/.bench-stamp" 2>/dev/null)" != "$gen_cmd" ]; then
    say "writing the random $preset checkpoint: $gen_cmd"
    rm -rf "$ckpt"
    $gen_cmd >&2 || die "the checkpoint generator failed"
    echo "$gen_cmd" >"$ckpt/.bench-stamp"
else
    say "reusing the $preset checkpoint in $ckpt"
fi

# make_gguf GGUF TYPE: writes (or reuses) the checkpoint as a GGUF of tools/make_gguf.py's
# TYPE; redone when the checkpoint or the writer is newer.
make_gguf() {
    if [ -f "$1" ] && [ ! "$ckpt/.bench-stamp" -nt "$1" ] && [ ! tools/make_gguf.py -nt "$1" ] &&
        [ ! tools/gguf_quantize.c -nt "$1" ]; then
        say "reusing $1"
        return 0
    fi
    say "writing $1: python3 tools/make_gguf.py $ckpt $1 --type $2"
    python3 tools/make_gguf.py "$ckpt" "$1" --type "$2" -q 2>"$work/make_gguf.log"
}

# ---- one format ---------------------------------------------------------------------
# bench_format FMT: exports (or reuses) the file and appends one table row to $rows.
# Every step checks its own result: a failure ends this format's row, not the run.
bench_format() {
    local fmt=$1 out=$BENCH_DIR/$preset/model-$1.bin wbytes fsize t cell
    local cells="" label dec src=$ckpt dtype=$1
    if [ "$fmt" = q4_k_m ]; then
        # A GGUF as llama-quantize makes one, exported with its blocks kept.
        src=$BENCH_DIR/$preset/model-q4_k_m.gguf dtype=gguf
        make_gguf "$src" q4_k_m || { short_row "$fmt" "tools/make_gguf.py failed: $(tail -n 1 "$work/make_gguf.log" | tr '|' '/')"; return 0; }
    fi
    if [ ! -f "$out" ] || [ export.py -nt "$out" ] || [ "$src" -nt "$out" ] || [ "$ckpt/.bench-stamp" -nt "$out" ]; then
        say "exporting $fmt: python3 export.py $src $out --dtype $dtype"
        if ! python3 export.py "$src" "$out.tmp" --dtype "$dtype" -q 2>"$work/export-$fmt.log"; then
            rm -f "$out.tmp"
            say "export to $fmt failed, skipping it: $(tail -n 1 "$work/export-$fmt.log")"
            short_row "$fmt" "export failed: $(tail -n 1 "$work/export-$fmt.log" | tr '|' '/')"
            return 0
        fi
        mv -f "$out.tmp" "$out"
        # Write the new file out to disk now rather than during the measurements.
        sync "$out" 2>/dev/null || sync
    else
        say "reusing $out"
    fi
    wbytes=$(weight_bytes "$out") || { short_row "$fmt" "cannot read the tensor directory of $out"; return 0; }
    fsize=$(wc -c <"$out")
    PEAK_RSS=0
    MAJFLT=0
    logs=$work/$fmt
    mkdir -p "$logs"

    page_in "$out"
    say "  $fmt: $HUGE_SHARE of the file maps in 2 MiB pages"
    hlist="$hlist $fmt $HUGE_SHARE,"

    say "$fmt: prefill (<bos> alone, then ${PREFILL// /, } tokens; best of $REPEAT)"
    prefill_base "$out" || { short_row "$fmt" "gemma3 failed (prefill, <bos> only)"; return 0; }
    say "  <bos> alone: $(calc "\"%.3f\", $PF_BASE") s"
    for t in $PREFILL; do
        prefill_tps "$out" "$t" || { short_row "$fmt" "gemma3 failed (prefill, $t tokens)"; return 0; }
        cell=$(fmt_tps "$PF_TPS")
        [ "$PF_N" = "$t" ] || cell="$cell ($PF_N tok)"   # the text re-encoded to another count
        say "  prefill $PF_N tokens: $(fmt_tps "$PF_TPS") tok/s"
        cells="$cells $cell |"
    done

    say "$fmt: decode $DECODE tokens, $REPEAT run(s), each between two bandwidth probes"
    label=""
    decode "$out" "$wbytes" -t 0 || { short_row "$fmt" "gemma3 failed (decode, or tools/membw)"; return 0; }
    if [ "$DEC_N" -lt "$DECODE" ]; then
        say "  greedy stopped after $DEC_N tokens (random model); again with -t 1 -s 1"
        local n_greedy=$DEC_N tps_greedy=$DEC_TPS bw_greedy=$DEC_BW lim_greedy=$DEC_LIM med_greedy=$DEC_MED dist_greedy=$DEC_DISTURBED
        decode "$out" "$wbytes" -t 1 -s 1 || { short_row "$fmt" "gemma3 failed (decode, or tools/membw)"; return 0; }
        if [ "$DEC_N" -gt "$n_greedy" ]; then label=", sampled"
        else DEC_N=$n_greedy; DEC_TPS=$tps_greedy; DEC_BW=$bw_greedy; DEC_LIM=$lim_greedy; DEC_MED=$med_greedy; DEC_DISTURBED=$dist_greedy; fi
    fi
    say "  decode: $DEC_N tokens, $(fmt_tps "$DEC_TPS") tok/s"

    local pct bwcell="n/a" limcell="n/a"
    dec=$(fmt_tps "$DEC_TPS")
    if [ "$DEC_N" -lt "$DECODE" ] || [ -n "$label" ]; then dec="$dec ($DEC_N tok$label)"; fi
    if [ -n "$DEC_TPS" ]; then
        pct=$(calc "\"%.0f%%\", 100 * $DEC_TPS / $DEC_LIM")
        bwcell=$(calc "\"%.1f / %.1f\", $DEC_BW, $DEC_MED"); limcell=$(fmt_tps "$DEC_LIM")
    else pct="n/a"; fi
    echo "| $fmt | $(fmt_gb "$fsize") | $(calc "\"%.2f GB\", $PEAK_RSS * 1024 / 1e9") |$cells $dec |" \
         "$bwcell | $limcell | $pct |" >>"$rows"
    if [ "$DEC_DISTURBED" -gt 0 ]; then
        if [ "$DEC_DISTURBED" -ge "$REPEAT" ]; then
            notes="$notes
$fmt: every decode run lost over 1 % of its CPU time to the hypervisor (steal); the median is of all of them."
        else
            notes="$notes
$fmt: $DEC_DISTURBED of $REPEAT decode runs lost over 1 % of their CPU time to the hypervisor (steal) and are left out of the median."
        fi
    fi
    wlist="$wlist $fmt $(fmt_gb "$wbytes"),"
    peak_row "$fmt" "$out" "$cells"
    [ "$FILL_CONTEXT" -gt 0 ] && fill_context "$fmt" "$out"
    case " $LONG_FORMATS " in *" $fmt "*) long_prefill "$fmt" "$out" ;; esac
    if [ "$MAJFLT" -gt 1000 ]; then
        say "  warning: $MAJFLT major page faults: parts of the model were read from disk"
        notes="$notes
Warning: the $fmt runs had $MAJFLT major page faults (model pages read from disk, not memory: memory pressure?); its numbers are pessimistic."
    fi
    measured=$((measured + 1))
}

# peak_row FMT FILE CELLS: a row of the peak table: FMT's prefill rates (CELLS, as in the
# main table) as shares of its arithmetic's peak.
peak_row() {
    local macs pk kind row="" c tps
    macs=$(matmul_macs "$2") || return 0
    read -r pk kind < <(peak_of "$1") || true
    [ -n "${pk:-}" ] || { echo "| $1 | no peak measured | | |" >>"$peak_rows"; return 0; }
    for c in $(echo "$3" | tr -d ' ' | tr '|' ' '); do
        tps=${c%%(*}
        case "$tps" in ''|n/a) row="$row n/a |" ;; *) row="$row $(calc "\"%.1f %%\", 100 * $tps * $macs / ($pk * 1e9)") |" ;; esac
    done
    echo "| $1 | $kind | $pk | $(calc "\"%.1f M\", $macs / 1e6") |$row" >>"$peak_rows"
}

# fill_context FMT FILE: one run with -c FILL_CONTEXT and a prompt that fills it but for 8
# tokens, generating 2 more: every KV cache page is written. Appends a row to $fill_rows.
fill_context() {
    local t=$((FILL_CONTEXT - 7)) saved=$PEAK_RSS rss
    say "$1: prompt of $((t - 1)) tokens with -c $FILL_CONTEXT (whole context in use)"
    prompt_text "$2" "$t" || { echo "| $1 | $FILL_CONTEXT | cannot make the prompt | | |" >>"$fill_rows"; return 0; }
    PEAK_RSS=0
    if run_timed "$logs/fill.log" "$bin" "$2" -c "$FILL_CONTEXT" -f "$work/text-$t.txt" -n 2 -t 0 &&
        stderr_rates "$logs/fill.log"; then
        rss=$PEAK_RSS
        say "  $P_N prompt tokens, $(fmt_tps "$(calc "\"%.6f\", $P_N / $P_S")") tok/s, peak RSS $(calc "\"%.3f GB\", $rss * 1024 / 1e9")"
        echo "| $1 | $FILL_CONTEXT | $P_N + $G_N | $(fmt_tps "$(calc "\"%.6f\", $P_N / $P_S")") | $(calc "\"%.3f GB\", $rss * 1024 / 1e9") |" >>"$fill_rows"
    else
        echo "| $1 | $FILL_CONTEXT | gemma3 failed: $(tail -n 1 "$logs/fill.log" | tr '|' '/') | | |" >>"$fill_rows"
    fi
    PEAK_RSS=$saved # the main table's peak RSS stays that of the prefill and decode runs
    return 0
}

# long_prefill FMT FILE: one prefill run per LONG_PREFILL length (-c length + 8, the prompt
# in a file), its rate as prefill_tps computes it (less the <bos>-only pass of PF_BASE).
# Appends a row per length to $long_rows.
long_prefill() {
    local t first="" tps saved=$PEAK_RSS
    for t in $LONG_PREFILL; do
        say "$1: long prefill, $t tokens (one run, -c $((t + 8)))"
        if ! prompt_text "$2" "$t"; then
            echo "| $1 | $t | cannot make the prompt | |" >>"$long_rows"; continue
        fi
        if run_timed "$logs/long-$t.log" "$bin" "$2" -c "$((t + 8))" -f "$work/text-$t.txt" -n 0 &&
            stderr_rates "$logs/long-$t.log" && positive "$P_S - $PF_BASE"; then
            tps=$(calc "\"%.6f\", ($P_N - 1) / ($P_S - $PF_BASE)")
            [ -n "$first" ] || first=$tps
            say "  $P_N tokens: $(fmt_tps "$tps") tok/s"
            echo "| $1 | $P_N | $(fmt_tps "$tps") | $(calc "\"%.0f %%\", 100 * $tps / $first") |" >>"$long_rows"
        else
            echo "| $1 | $t | gemma3 failed: $(tail -n 1 "$logs/long-$t.log" | tr '|' '/') | |" >>"$long_rows"
        fi
    done
    PEAK_RSS=$saved # the main table's peak RSS stays that of the prefill and decode runs
    return 0
}

# ---- run, then the table ---------------------------------------------------------------
# Other work on the machine skews every number: the load average goes in the header.
load0=$(cut -d ' ' -f 1-3 /proc/loadavg 2>/dev/null || echo "?")
rows=$work/rows.md
fill_rows=$work/fill-rows.md
long_rows=$work/long-rows.md
peak_rows=$work/peak-rows.md
: >"$rows"
: >"$peak_rows"
say "arithmetic peak: $peak (each kind of multiply-add, all threads)"
"$peak" >"$work/peak.txt" 2>"$work/peak.err" || say "tools/peak.c failed: $(tail -n 1 "$work/peak.err")"
sed 's/^/  /' "$work/peak.txt" >&2
: >"$fill_rows"
: >"$long_rows"
wlist=""
hlist=""
notes=""
measured=0
for fmt in $FORMATS; do
    bench_format "$fmt"
done

threads=${OMP_NUM_THREADS:-"unset (all $(nproc) cores)"}
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1)
rev=$(git rev-parse --short HEAD 2>/dev/null || echo "?")
git diff --quiet HEAD -- gemma3.c tokenizer.c kernels_x86.c 2>/dev/null || rev="$rev + local changes"
[ "$GEMMA3" = ./gemma3 ] || rev="$GEMMA3, tree $rev"

hdr_prefill=""
for t in $PREFILL; do hdr_prefill="$hdr_prefill prefill $t tok/s |"; done
{
    echo "Machine: $(nproc) CPUs, ${cpu:-unknown CPU}, OMP_NUM_THREADS=$threads, load average $load0 at the start; gemma3 $rev ($build)$membw_note."
    echo "Model: random Gemma 3 $preset checkpoint (tools/make_checkpoint.py --seed 1); decode: $DECODE tokens after a ${#PROMPT}-character prompt; $REPEAT run(s) of each measurement (prefill: the fastest; decode: the median by share of its limit)."
    echo
    echo "| format | file size | peak RSS |$hdr_prefill decode tok/s | bandwidth GB/s (run / median) | limit tok/s | % of limit |"
    echo "|---|---:|---:|$(for t in $PREFILL; do printf -- '---:|'; done)---:|---:|---:|---:|"
    cat "$rows"
    echo
    [ "$measured" = 0 ] ||
    echo "Limit = the decode run's bandwidth (the better of tools/membw.c's best right before and right after it) / weights read per token (sum of the tensor sizes:${wlist%,}); of $REPEAT run(s), the median by that share is shown. Median: the mean of all the format's probes' medians."
    case " $FORMATS " in *" q4_k_m "*)
        echo "q4_k_m: the checkpoint as a Q4_K_M GGUF (tools/make_gguf.py: llama.cpp's mix of types and its reference quantizers), exported with its blocks kept (export.py --dtype gguf)." ;;
    esac
    echo "Peak RSS ($rss_tool) includes the touched pages of the mmap'd model file. Each file is read into the page cache afresh before its runs; the share of it that maps in 2 MiB pages (as the probe's array):${hlist%,}.$notes"
    if [ -s "$peak_rows" ]; then
        echo
        echo "Prefill as a share of the arithmetic peak (tools/peak.c, all threads, measured once before the formats: $(sed 's/^peak: //; s/ multiply-adds\/s.*//' "$work/peak.txt" | tr '\n' ';' | sed 's/;$//; s/;/; /g')). Multiply-adds per token: one per weight of the layers' matrices (q, k, v, o, gate, up, down); attention's own products, which grow with the position, are not counted."
        echo
        echo "| format | arithmetic | peak G multiply-adds/s | multiply-adds per token |$(for t in $PREFILL; do printf ' prefill %s: %% of peak |' "$t"; done)"
        echo "|---|---|---:|---:|$(for t in $PREFILL; do printf -- '---:|'; done)"
        cat "$peak_rows"
    fi
    if [ -s "$long_rows" ]; then
        echo
        echo "Prefill by prompt length (LONG_FORMATS): one run each, -c the length + 8; the last column is the rate as a share of the first length's."
        echo
        echo "| format | prompt tokens | prefill tok/s | vs $(set -- $LONG_PREFILL; echo "$1") tokens |"
        echo "|---|---:|---:|---:|"
        cat "$long_rows"
    fi
    if [ -s "$fill_rows" ]; then
        echo
        echo "Whole context in use (FILL_CONTEXT): one run each, the prompt filling -c but for 8 tokens, then 2 generated."
        echo
        echo "| format | context (-c) | tokens (prompt + generated) | prefill tok/s (whole prompt) | peak RSS |"
        echo "|---|---:|---:|---:|---:|"
        cat "$fill_rows"
    fi
} | tee "$BENCH_DIR/$preset/last.md"
# Keep this run's logs (commands, timings, gemma3's output) next to the table.
rm -rf "$BENCH_DIR/$preset/logs" && cp -r "$work" "$BENCH_DIR/$preset/logs" && say "logs: $BENCH_DIR/$preset/logs/"
[ "$measured" -gt 0 ] || die "no format could be measured (see above)"
