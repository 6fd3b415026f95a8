#!/usr/bin/env bash
# tests/test_cli_files.sh: what gemma3 writes and reads, on files made in a temp dir.
#
#   bash tests/test_cli_files.sh MODEL.bin [TOKMODEL.bin]
#
# Outputs (--quantize, --logits, --dump-hidden): a symlink is followed and stays a link, a
# FIFO is streamed and a reader that leaves is a reported write error, an output that is an
# input or the other output is refused before anything is written, --quantize replaces only
# model files, SIGINT / SIGTERM / SIGHUP remove the .partial files and exit 128 + the signal,
# a SIGKILLed run's .partial is replaced by the next run. Inputs: endless ones (a FIFO fed
# by `yes`) stop at the 64 MiB limit with one line naming it, a read error and out of memory
# say so. MODEL.bin: any model (tiny-f32.bin); TOKMODEL.bin: one with a tokenizer, for the
# text inputs (skipped without it). Never touches a device node: FIFOs and files in a fresh
# tests/build/cli.XXXXXX, removed when every check passed. Prints "ok - ..." / "not ok - ..."
# and ends with "N passed, N failed" (and "N skipped"); exits 1 if any check failed.

# shellcheck disable=SC2016 # bash -c '...' _ ARGS on purpose
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
model=$1
tokmodel=${2:-}
ids=tests/fixtures/tiny/tokens.txt
mkdir -p tests/build
W=$(mktemp -d tests/build/cli.XXXXXX) || exit 2
pass=0 fail=0 skipped=0
pids=() writers=()
ok() { echo "ok - $1"; pass=$((pass + 1)); }
nok() { echo "not ok - $1"; fail=$((fail + 1)); }
check() { # description command...
    local d="$1"; shift
    if "$@" > "$W/check.log" 2>&1; then ok "$d"; else nok "$d"; sed 's/^/#   /' "$W/check.log" | head -5; fi
}
finish() {
    local p
    for p in ${pids[@]+"${pids[@]}"} ${writers[@]+"${writers[@]}"}; do kill -9 "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    pids=() writers=()
    if [ "$fail" -eq 0 ]; then rm -rf "$W"; else echo "# work files kept in $W"; fi
}
trap finish EXIT

# R NAME CMD...: run, exit status in $rc, stderr in $W/NAME.err
R() {
    local n=$1; shift
    rc=0
    timeout 120 "$@" > "$W/$n.out" 2> "$W/$n.err" || rc=$?
}
# one_line NAME NEEDLE: exit status 1 and exactly one line on stderr, holding NEEDLE
one_line() { [ "$rc" -eq 1 ] && [ "$(wc -l < "$W/$1.err")" -eq 1 ] && grep -qF -- "$2" "$W/$1.err"; }
refused() { # description NAME NEEDLE
    if one_line "$2" "$3"; then ok "$1"; else nok "$1 (exit $rc)"; sed 's/^/#   /' "$W/$2.err" | head -3; fi
}

# --- outputs ---------------------------------------------------------------------------
./gemma3 "$model" --logits "$ids" "$W/ref.f32" --dump-hidden "$W/ref.hid" || { nok "reference --logits run"; exit 1; }
./gemma3 "$model" --quantize q8_0 "$W/ref-q8.bin" || { nok "reference --quantize run"; exit 1; }

echo old > "$W/target.f32"
chmod 600 "$W/target.f32"
ln -s target.f32 "$W/link.f32"
R link ./gemma3 "$model" --logits "$ids" "$W/link.f32"
check "--logits onto a symlink: the target is written, the link stays a link" \
    bash -c '[ "$1" -eq 0 ] && [ -L "$2/link.f32" ] && [ "$(readlink "$2/link.f32")" = target.f32 ] &&
        cmp "$2/target.f32" "$2/ref.f32" && ! ls "$2" | grep -q partial' _ "$rc" "$W"
check "the replaced target keeps its mode (600)" bash -c '[ "$(stat -c %a "$1")" = 600 ]' _ "$W/target.f32"

mkdir "$W/sub"
ln -s sub/new.f32 "$W/dangling"
R dangling ./gemma3 "$model" --logits "$ids" "$W/x.f32" --dump-hidden "$W/dangling"
check "--dump-hidden onto a link to a new file: the file is made, the link stays" \
    bash -c '[ "$1" -eq 0 ] && [ -L "$2/dangling" ] && cmp "$2/sub/new.f32" "$2/ref.hid" && cmp "$2/x.f32" "$2/ref.f32"' _ "$rc" "$W"

mkfifo "$W/fifo"
cat "$W/fifo" > "$W/from-fifo" &
R fifo ./gemma3 "$model" --logits "$ids" "$W/fifo"
wait $!
check "--logits into a FIFO: streamed, the FIFO stays a FIFO" \
    bash -c '[ "$1" -eq 0 ] && [ -p "$2/fifo" ] && cmp "$2/from-fifo" "$2/ref.f32"' _ "$rc" "$W"
cat "$W/fifo" > "$W/from-fifo" &
R qfifo ./gemma3 "$model" --quantize q8_0 "$W/fifo"
wait $!
check "--quantize into a FIFO: the same bytes as into a file" \
    bash -c '[ "$1" -eq 0 ] && [ -p "$2/fifo" ] && cmp "$2/from-fifo" "$2/ref-q8.bin"' _ "$rc" "$W"
# - is stdout, a stream (what export.py's quantizing step writes into its temporary file)
R qdash ./gemma3 "$model" --quantize q8_0 -
check "--quantize q8_0 -: the model on stdout, the same bytes as into a file" \
    bash -c '[ "$1" -eq 0 ] && cmp "$2/qdash.out" "$2/ref-q8.bin" && [ ! -e "$2/-" ]' _ "$rc" "$W"
R ldash ./gemma3 "$model" --logits "$ids" - --dump-hidden "$W/dash.hid"
check "--logits IDS - --dump-hidden FILE: logits on stdout, the dump in its file" \
    bash -c '[ "$1" -eq 0 ] && cmp "$2/ldash.out" "$2/ref.f32" && cmp "$2/dash.hid" "$2/ref.hid"' _ "$rc" "$W"
R topdash ./gemma3 "$model" --logits "$ids" - --top 3
refused "--logits IDS - with --top (both on stdout)" topdash "--top prints on stdout: give --logits a file, not -"
R twodash ./gemma3 "$model" --logits "$ids" - --dump-hidden -
refused "--logits - --dump-hidden -" twodash "--logits and --dump-hidden both write -"
cp "$model" "$W/m-out.bin"
rc=0
timeout 60 ./gemma3 "$W/m-out.bin" --quantize q8_0 - >> "$W/m-out.bin" 2> "$W/appendself.err" || rc=$?
refused "--quantize - appended to the model itself" appendself "- is the model file itself"
check "... and the model is left whole" cmp "$W/m-out.bin" "$model"
head -c 100 "$W/fifo" > /dev/null &
R epipe ./gemma3 "$model" --logits "$ids" "$W/fifo"
wait $!
refused "--logits into a FIFO whose reader leaves: a write error, reported" epipe "cannot write $W/fifo: Broken pipe"

# outputs that are inputs, or each other, are refused before anything is written
cp "$ids" "$W/ids.txt"
cp "$model" "$W/m.bin"
ln "$W/m.bin" "$W/m-hard.bin"
ln -s ids.txt "$W/ids-link"
R same1 ./gemma3 "$W/m.bin" --logits "$W/ids.txt" "$W/ids.txt"
refused "--logits IDS IDS" same1 "$W/ids.txt is the token file itself"
R same2 ./gemma3 "$W/m.bin" --logits "$W/ids.txt" "$W/out.f32" --dump-hidden "$W/ids-link"
refused "--dump-hidden onto a link to the token file" same2 "$W/ids-link is the token file itself"
R same3 ./gemma3 "$W/m.bin" --quantize q8_0 "$W/m-hard.bin"
refused "--quantize onto a hard link of the model" same3 "$W/m-hard.bin is the model file itself"
R same4 ./gemma3 "$W/m.bin" --logits "$W/ids.txt" "$W/new.f32" --dump-hidden "$W/sub/../new.f32"
refused "--logits X --dump-hidden X (a new file, named two ways)" same4 "--logits and --dump-hidden both write $W/sub/../new.f32"
R same5 ./gemma3 "$W/m.bin" --logits "$W/ids.txt" "$W/fifo" --dump-hidden "$W/fifo"
refused "--logits FIFO --dump-hidden FIFO" same5 "--logits and --dump-hidden both write"
R same6 ./gemma3 "$W/m.bin" --logits "$W/ids.txt" "$W/new.f32" --dump-hidden "$W/new.f32.partial"
refused "--dump-hidden onto --logits' .partial" same6 "$W/new.f32.partial is where $W/new.f32 is written until it is whole"
cp "$model" "$W/q.bin.partial"
R same7 ./gemma3 "$W/q.bin.partial" --quantize q8_0 "$W/q.bin"
refused "--quantize OUT of the model OUT.partial" same7 "$W/q.bin.partial, where $W/q.bin is written first, is the model file itself"
printf 'P6\n2 2\n255\nabcdefghijkl' > "$W/img.ppm"
R same8 ./gemma3 "$W/m.bin" --logits "$W/ids.txt" "$W/img.ppm" --image "$W/img.ppm"
refused "--logits onto its --image file" same8 "$W/img.ppm is the image file itself"
check "... the image left whole" bash -c '[ "$(cat "$1")" = "$(printf "P6\n2 2\n255\nabcdefghijkl")" ]' _ "$W/img.ppm"
check "the refused runs wrote nothing and left the inputs whole" \
    bash -c 'cmp "$1/ids.txt" "$2" && cmp "$1/m.bin" "$3" && cmp "$1/q.bin.partial" "$3" && [ -p "$1/fifo" ] &&
        [ ! -e "$1/new.f32" ] && [ ! -e "$1/q.bin" ] && [ ! -e "$1/out.f32" ] && ! ls "$1" | grep -q "f32.partial"' \
    _ "$W" "$ids" "$model"
rm "$W/q.bin.partial"

# --quantize replaces a model file, nothing else
echo "my notes" > "$W/notes.txt"
R notmodel ./gemma3 "$model" --quantize q4_0 "$W/notes.txt"
refused "--quantize over a file that is not a model" notmodel "$W/notes.txt exists and is not a gemma3.c model file (no GM3C magic)"
ln -s notes.txt "$W/notes-link"
R notmodel2 ./gemma3 "$model" --quantize q4_0 "$W/notes-link"
refused "--quantize over a link to such a file" notmodel2 "$W/notes-link exists and is not a gemma3.c model file"
R isdir ./gemma3 "$model" --quantize q4_0 "$W/sub"
refused "--quantize onto a directory" isdir "$W/sub is a directory"
cp "$W/ref-q8.bin" "$W/requant.bin"
R requant ./gemma3 "$model" --quantize q4_0 "$W/requant.bin"
check "--quantize over a model file replaces it; the notes stay" \
    bash -c '[ "$1" -eq 0 ] && ! cmp -s "$2/requant.bin" "$2/ref-q8.bin" && [ "$(cat "$2/notes.txt")" = "my notes" ]' _ "$rc" "$W"

# a stale .partial (from a SIGKILLed run) is removed first; one that is a link is not followed
echo precious > "$W/precious"
ln -s precious "$W/stale.f32.partial"
R stale ./gemma3 "$model" --logits "$ids" "$W/stale.f32"
check "a stale OUT.partial link is replaced, not followed" \
    bash -c '[ "$1" -eq 0 ] && [ "$(cat "$2/precious")" = precious ] && cmp "$2/stale.f32" "$2/ref.f32" &&
        [ ! -e "$2/stale.f32.partial" ] && [ ! -L "$2/stale.f32.partial" ]' _ "$rc" "$W"

# --- signals ---------------------------------------------------------------------------
# gemma3 is held up writing to a FIFO whose reader does not read (`sleep` holds it open)
# while its other output is a .partial; then it gets the signal. Started with SIGINT at its
# default (a script's background jobs ignore it, and gemma3 keeps an ignored signal so).
dfl=(python3 -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])')
# stalled SIGNAL WANT_RC PARTIAL GEMMA3_ARGS...: start gemma3, wait for PARTIAL, signal it
stalled() {
    local sig=$1 want=$2 partial=$3 pid reader i
    shift 3
    rm -f "$W"/*.partial "$W/o.f32" "$W/o.hid"
    sleep 300 < "$W/fifo" &
    reader=$!
    "${dfl[@]}" ./gemma3 "$@" 2> "$W/sig.err" &
    pid=$!
    pids=("$reader" "$pid")
    for i in $(seq 1 600); do [ -e "$partial" ] && break; sleep 0.05; done
    sleep 0.2 # (it is stalled on the FIFO now, or about to be)
    if [ "$sig" = ready ]; then return 0; fi
    kill -"$sig" "$pid"
    rc=0
    wait "$pid" || rc=$?
    kill "$reader" 2>/dev/null
    wait "$reader" 2>/dev/null
    pids=()
    [ "$rc" -eq "$want" ] && [ ! -e "$partial" ] && [ -z "$(ls "$W" | grep 'partial$')" ]
}
check "SIGTERM during --logits: its .partial removed, exit 143" \
    stalled TERM 143 "$W/o.f32.partial" "$model" --logits "$ids" "$W/o.f32" --dump-hidden "$W/fifo"
check "SIGINT during --dump-hidden: its .partial removed, exit 130" \
    stalled INT 130 "$W/o.hid.partial" "$model" --logits "$ids" "$W/fifo" --dump-hidden "$W/o.hid"
check "SIGHUP during --logits: exit 129, nothing left" \
    stalled HUP 129 "$W/o.f32.partial" "$model" --logits "$ids" "$W/o.f32" --dump-hidden "$W/fifo"
# --quantize: a model of 1M zero embedding rows (a sparse file) takes long enough to catch
python3 - "$model" "$W/big.bin" 1000000 <<'PY' || nok "cannot make the sparse model"
import struct, sys
src, dst, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3])
b = bytearray(open(src, "rb").read())
n, dir_off, dim = struct.unpack_from("<I", b, 88)[0], struct.unpack_from("<Q", b, 112)[0], struct.unpack_from("<I", b, 20)[0]
end, size = (len(b) + 63) // 64 * 64, vocab * dim * 4
for e in range(dir_off, dir_off + 104 * n, 104):  # the embedding moves to the end, with vocab rows
    if b[e:e + 64].rstrip(b"\0") == b"embed_tokens.weight":
        struct.pack_into("<IIQQ", b, e + 72, vocab, dim, 0, 0)
        struct.pack_into("<QQ", b, e + 88, end, size)
struct.pack_into("<I", b, 16, vocab)
struct.pack_into("<Q", b, 8, end + size)
with open(dst, "wb") as f:
    f.write(b)
    f.truncate(end + size)
PY
quantize_signalled() { # SIGNAL WANT_RC
    local pid i
    rm -f "$W/bq.bin" "$W/bq.bin.partial"
    "${dfl[@]}" ./gemma3 "$W/big.bin" --quantize q8_0 "$W/bq.bin" 2> "$W/sig.err" &
    pid=$!
    pids=("$pid")
    for i in $(seq 1 2000); do [ -e "$W/bq.bin.partial" ] && break; sleep 0.01; done
    kill -"$1" "$pid"
    rc=0
    wait "$pid" || rc=$?
    pids=()
    [ "$rc" -eq "$2" ] && [ ! -e "$W/bq.bin.partial" ] && [ ! -e "$W/bq.bin" ]
}
check "SIGINT during --quantize: OUT.partial removed, exit 130" quantize_signalled INT 130
check "SIGTERM during --quantize: OUT.partial removed, exit 143" quantize_signalled TERM 143
# SIGKILL: at most one temp file, OUT.partial, which the same command run again replaces.
# Both outputs are files here (--dump-hidden's is written with no name until --logits' is
# in place: Linux's O_TMPFILE); the run is held up by --top's table on a FIFO nobody reads.
rm -f "$W"/*.partial "$W/o.f32" "$W/o.hid"
sleep 300 < "$W/fifo" &
reader=$!
./gemma3 "$model" --logits "$ids" "$W/o.f32" --dump-hidden "$W/o.hid" --top 512 > "$W/fifo" 2> "$W/kill.err" &
pid=$!
pids=("$reader" "$pid")
for i in $(seq 1 600); do [ -e "$W/o.f32.partial" ] && break; sleep 0.05; done
sleep 0.3 # (stalled on the FIFO now: its 40 positions' tables are far more than a pipe holds)
partials_before=$(ls "$W" | grep -c partial)
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
kill "$reader" 2>/dev/null
wait "$reader" 2>/dev/null
pids=()
if [ "$(uname -s)" = Linux ]; then
    check "SIGKILL with two file outputs leaves one temp file, OUT.partial" \
        bash -c '[ "$2" -eq 1 ] && [ "$(ls "$1" | grep -c partial)" -eq 1 ] && [ -e "$1/o.f32.partial" ]' _ "$W" "$partials_before"
else
    echo "# SIGKILL with two file outputs: $(ls "$W" | grep -c partial) temp files (one is Linux's O_TMPFILE)"
fi
R again ./gemma3 "$model" --logits "$ids" "$W/o.f32" --dump-hidden "$W/o.hid"
check "the same command again replaces it: whole outputs, no .partial" \
    bash -c '[ "$1" -eq 0 ] && cmp "$2/o.f32" "$2/ref.f32" && cmp "$2/o.hid" "$2/ref.hid" && ! ls "$2" | grep -q partial' _ "$rc" "$W"

# --- inputs ----------------------------------------------------------------------------
# an endless input: `yes` into a FIFO, until gemma3 stops reading it (SIGPIPE ends `yes`)
endless() { # FIFO [TEXT]
    rm -f "$1"
    mkfifo "$1"
    yes "${2:-y}" > "$1" 2>/dev/null &
    writers+=("$!")
}
endless "$W/endless-ids" 2
R ids_limit ./gemma3 "$model" --logits "$W/endless-ids" "$W/never.f32"
refused "--logits token file without end: stops at the limit" ids_limit "$W/endless-ids is larger than 64 MiB, the limit for a text input"
endless "$W/endless"
R f_limit ./gemma3 "$model" -f "$W/endless" -n 1
refused "-f without end: stops at the limit" f_limit "prompt file $W/endless is larger than 64 MiB, the limit for a text input"
R f_dir ./gemma3 "$model" -f "$W/sub" -n 1
refused "-f of a directory: the read error says why" f_dir "cannot read prompt file $W/sub: Is a directory"
if [ -n "$tokmodel" ] && [ -f "$tokmodel" ]; then
    endless "$W/endless"
    R ppl_limit ./gemma3 "$tokmodel" --perplexity "$W/endless"
    refused "--perplexity text without end: stops at the limit" ppl_limit "text file $W/endless is larger than 64 MiB"
    endless "$W/endless"
    R enc_limit bash -c './gemma3 "$1" --encode < "$2"' _ "$tokmodel" "$W/endless"
    refused "--encode of stdin without end: stops at the limit" enc_limit "stdin is larger than 64 MiB"
    endless "$W/endless" 7
    R dec_limit bash -c './gemma3 "$1" --decode < "$2"' _ "$tokmodel" "$W/endless"
    refused "--decode of stdin without end: stops at the limit" dec_limit "stdin is larger than 64 MiB"
    R chat_limit bash -c 'yes | tr -d "\n" | ./gemma3 "$1" --chat -n 1' _ "$tokmodel"
    refused "--chat line without end: stops at the limit" chat_limit "stdin: line 1 is longer than 64 MiB, the limit for a message"
    R chat_limit2 bash -c '{ echo Hi; yes | tr -d "\n"; } | ./gemma3 "$1" --chat -n 1 -t 0' _ "$tokmodel"
    check "--chat: the line past the limit is named, after the replies before it" \
        bash -c '[ "$1" -eq 1 ] && grep -q "line 2 is longer than 64 MiB" "$2" && [ -s "$3" ]' _ "$rc" "$W/chat_limit2.err" "$W/chat_limit2.out"
    # out of memory: a 48 MB text under a 150 MB address-space limit (an ASan build, which
    # reserves terabytes of address space, instead fails allocations over 100 MB, with a
    # warning line of its own that is not ours)
    yes 'the quick brown fox' | head -c 48000000 > "$W/big.txt"
    limit='ulimit -v 150000'
    if nm ./gemma3 2>/dev/null | grep __asan_init > /dev/null; then
        limit='export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}allocator_may_return_null=1:max_allocation_size_mb=100"'
    fi
    R oom bash -c "$limit"'; ./gemma3 "$1" --perplexity "$2" 2>&1 >/dev/null | grep -v "^==.*WARNING: AddressSanitizer" >&2
        exit "${PIPESTATUS[0]}"' _ "$tokmodel" "$W/big.txt"
    refused "--perplexity out of memory says so" oom "out of memory"
else
    echo "# skip: text inputs (no model with a tokenizer)"; skipped=$((skipped + 1))
fi

if [ "$skipped" -gt 0 ]; then echo "$pass passed, $fail failed, $skipped skipped"; else echo "$pass passed, $fail failed"; fi
[ "$fail" -eq 0 ]
