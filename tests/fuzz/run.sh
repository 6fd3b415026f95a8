#!/usr/bin/env bash
# The C fuzzers (libFuzzer + ASan + UBSan, clang), one after another:
#
#   bash tests/fuzz/run.sh SECONDS [HARNESS...]   fuzz each for SECONDS (make fuzz)
#   bash tests/fuzz/run.sh --replay               run every committed input once, no libFuzzer
#
# HARNESS: tokenizer, tokinit, chat, loader, pnm (default: all). Corpora grow in
# tests/build/fuzz/corpus-HARNESS (kept between runs); the seeds are tests/fuzz/HARNESS/ and
# what this script generates into tests/build/fuzz/seeds-HARNESS (the tiny model and
# tokenizer sections, from export.py). A finding is saved as tests/build/fuzz/HARNESS-crash-*
# (or -leak-, -timeout-, -oom-); to keep it as a regression, minimize it
# (fuzz_HARNESS -minimize_crash=1 -runs=10000 FILE) and copy it into tests/fuzz/regress/HARNESS/.
# One line per harness: executions and findings; exits 1 if anything was found.
#
# --replay builds each harness with tests/fuzz/replay.c and $CC (no sanitizers needed,
# any compiler) and runs it on tests/fuzz/HARNESS/ and tests/fuzz/regress/HARNESS/ (the
# tokenizer harness only when tests/data/tokenizer.json is there). test_all runs it.
set -uo pipefail
cd "$(dirname "$0")/../.."
B=tests/build/fuzz
mkdir -p "$B"
ALL="tokenizer tokinit chat loader pnm"

# The inputs that are generated rather than committed: the real tokenizer's section, the
# tiny model in four dtypes, with a tiny image path and as two GGUFs' kept blocks, the tiny
# tokenizer's section and a variant without byte pieces.
seeds() {
    if [ "$1" = tokenizer ] && [ ! -s "$B/tokenizer.sec" ]; then
        bash tests/fetch_tokenizer.sh > "$B/fetch.log" 2>&1 || { cat "$B/fetch.log"; return 1; }
        python3 -c "import sys; sys.path.insert(0, '.'); import export
sec, _ = export.pack_tokenizer('tests/data/tokenizer.json'); open('$B/tokenizer.sec', 'wb').write(sec)" || return 1
    fi
    if [ "$1" = loader ] && [ ! -s "$B/seeds-loader/kept-untied.bin" ]; then
        mkdir -p "$B/seeds-loader"
        python3 tools/make_checkpoint.py "$B/tiny-hf" --vocab 18 --hidden 32 --inter 32 --layers 2 --heads 2 \
            --kv-heads 1 --head-dim 16 --qpas 16 --window 4 --pattern 2 --max-pos 64 --dtype f32 \
            --tokenizer tests/fuzz/tiny-tokenizer.json --seed 1 > /dev/null || return 1
        for d in f32 bf16 q8_0 q4_0; do python3 export.py "$B/tiny-hf" "$B/seeds-loader/tiny-$d.bin" --dtype $d -q || return 1; done
        python3 tools/make_checkpoint.py "$B/tiny-mm" --vocab 18 --hidden 32 --inter 32 --layers 2 --heads 2 \
            --kv-heads 1 --head-dim 16 --qpas 16 --window 4 --pattern 2 --max-pos 64 --layout nested \
            --vision 14,7,16,32,1,2,4 --tokenizer tests/fuzz/tiny-tokenizer.json --seed 1 > /dev/null || return 1
        python3 export.py "$B/tiny-mm" "$B/seeds-loader/tiny-mm-bf16.bin" --dtype bf16 -q || return 1
        # GGUF blocks kept (dtypes 256 + t: Q4_0, Q8_0 as ggml stores them), tied and untied
        python3 export.py tests/fuzz/gguf/tiny.gguf "$B/seeds-loader/kept-tied.bin" --dtype gguf -q || return 1
        python3 export.py tests/fuzz/gguf/tiny-untied.gguf "$B/seeds-loader/kept-untied.bin" --dtype gguf -q || return 1
    fi
    if [ "$1" = tokinit ] && [ ! -s "$B/seeds-tokinit/nobytes.sec" ]; then
        mkdir -p "$B/seeds-tokinit"
        python3 - "$B" <<'PY' || return 1
import json, sys
sys.path.insert(0, '.')
import export
b = sys.argv[1]
open(b + '/seeds-tokinit/tiny.sec', 'wb').write(export.pack_tokenizer('tests/fuzz/tiny-tokenizer.json')[0])
tok = json.load(open('tests/fuzz/tiny-tokenizer.json'))
for p in ['<unk>', '<0x41>', '<0xC3>', '<0xA9>', '<0xE2>']:
    del tok['model']['vocab'][p]
tok['added_tokens'] = [a for a in tok['added_tokens'] if a['content'] in tok['model']['vocab']]
json.dump(tok, open(b + '/nobytes.json', 'w'))
open(b + '/seeds-tokinit/nobytes.sec', 'wb').write(export.pack_tokenizer(b + '/nobytes.json')[0])
PY
    fi
    return 0
}

# fuzz_chat and fuzz_loader use only gemma3.h (gemma3.c beside them); the other two
# #include gemma3.c to reach the tokenizer's internals.
sources() { case $1 in chat|loader) echo "tests/fuzz/fuzz_$1.c gemma3.c" ;; *) echo "tests/fuzz/fuzz_$1.c" ;; esac; }
maxlen() { case $1 in loader) echo 65536 ;; *) echo 4096 ;; esac; }

if [ "${1:-}" = --replay ]; then
    CC=${CC:-cc}
    rc=0
    for h in $ALL; do
        dirs=""
        # the loader's generated seeds too (the tiny model in every dtype, GGUF blocks kept)
        if [ "$h" = loader ] && ! seeds loader; then echo "  replay $h: cannot make the seeds"; rc=1; continue; fi
        for d in "tests/fuzz/$h" "tests/fuzz/regress/$h" "$B/seeds-$h"; do [ -d "$d" ] && dirs="$dirs $d"; done
        if [ "$h" = tokenizer ] && [ ! -s "$B/tokenizer.sec" ]; then
            [ -s tests/data/tokenizer.json ] && seeds tokenizer || { echo "  replay $h: skipped (no tests/data/tokenizer.json)"; continue; }
        fi
        # with ASan + UBSan where the compiler has them (a finding may be undefined behaviour only)
        san="-fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all"
        echo 'int main(void) { return 0; }' > "$B/san.c"
        $CC $san -o "$B/san" "$B/san.c" > /dev/null 2>&1 && "$B/san" || san=
        # shellcheck disable=SC2046,SC2086
        if ! $CC -std=c99 -O1 -g $san -DGEMMA3_NO_MAIN -o "$B/replay_$h" $(sources $h) tests/fuzz/replay.c -lm > "$B/replay_$h.log" 2>&1; then
            echo "  replay $h: build failed"; cat "$B/replay_$h.log"; rc=1; continue
        fi
        # shellcheck disable=SC2086
        if out=$("$B/replay_$h" $dirs 2>&1); then echo "  replay $h: ${out##*replay: }"
        else echo "  replay $h: FAILED"; echo "$out" | tail -5; rc=1; fi
    done
    exit $rc
fi

secs=${1:-600}
shift || true
harnesses=${*:-$ALL}
if ! command -v "${FUZZ_CC:-clang}" > /dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
        apt-get install -y -q clang > "$B/apt.log" 2>&1 || { tail -5 "$B/apt.log"; echo "fuzz: cannot install clang"; exit 1; }
    else
        echo "fuzz: needs clang with libFuzzer (Debian: apt-get install clang)"; exit 1
    fi
fi
found=0
for h in $harnesses; do
    seeds "$h" || { echo "fuzz $h: cannot make the seeds"; found=1; continue; }
    # shellcheck disable=SC2046
    ${FUZZ_CC:-clang} -std=c99 -Wall -Wextra -pedantic -g -O1 -DGEMMA3_NO_MAIN -fsanitize=fuzzer,address,undefined \
        -fno-sanitize-recover=all -fno-omit-frame-pointer -o "$B/fuzz_$h" $(sources $h) -lm > "$B/build_$h.log" 2>&1 \
        || { cat "$B/build_$h.log"; echo "fuzz $h: build failed"; found=1; continue; }
    mkdir -p "$B/corpus-$h"
    seeddirs=""
    for d in "tests/fuzz/$h" "tests/fuzz/regress/$h" "$B/seeds-$h"; do [ -d "$d" ] && seeddirs="$seeddirs $d"; done
    rm -f "$B/$h"-crash-* "$B/$h"-leak-* "$B/$h"-timeout-* "$B/$h"-oom-* "$B/$h"-slow-unit-*
    start=$SECONDS
    # shellcheck disable=SC2086
    "$B/fuzz_$h" -max_total_time="$secs" -max_len="$(maxlen $h)" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$B/$h-" "$B/corpus-$h" $seeddirs > "$B/$h.log" 2>&1
    status=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$B/$h.log" | grep -o '[0-9]*$' | tail -1)
    findings=$(ls "$B/$h"-crash-* "$B/$h"-leak-* "$B/$h"-timeout-* "$B/$h"-oom-* 2> /dev/null)
    n=$(echo -n "$findings" | grep -c . || true)
    if [ "$status" != 0 ] && [ "$n" = 0 ]; then n=1; findings="(exit $status, see $B/$h.log)"; fi
    echo "fuzz $h: ${execs:-?} executions in $((SECONDS - start)) s, $n findings $(echo $findings)"
    [ "$n" = 0 ] || { grep -m3 -E 'ERROR|SUMMARY|fuzz_' "$B/$h.log" | sed 's/^/    /'; found=1; }
done
exit $found
