#!/usr/bin/env bash
# Ctrl-C during a --chat reply stops that reply and the chat goes on: two messages, each
# interrupted while its reply streams (SIGINT, as a terminal sends it), then end of input.
# gemma3 must answer both, say " [stopped]" twice and exit 0; a third SIGINT at the prompt
# is then not needed. Usage: bash tests/test_chat_interrupt.sh MODEL.bin (with a tokenizer
# and a context of at least 2048, so that no reply ends on its own before the signal).
set -u
model=$1
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; exec 3>&- 2>/dev/null; rm -rf "$work"' EXIT
fail() { echo "not ok: $*"; echo "--- stderr:"; cat "$work/err"; exit 1; }

# wait_for CMD...: poll up to 60 s for CMD to succeed
wait_for() {
    for _ in $(seq 1 1200); do "$@" && return 0; sleep 0.05; done
    return 1
}
bytes_out() { [ "$(wc -c < "$work/out")" -gt "$1" ]; }
stopped() { [ "$(grep -o '\[stopped\]' "$work/err" | wc -l)" -ge "$1" ]; }

set -m # job control: the background gemma3 gets SIGINT, as a foreground program would
mkfifo "$work/in"
# gemma3 leaves SIGINT ignored if it starts so (a background job of a script, as this may
# run in CI): start it with SIGINT at its default, as a terminal would
python3 -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])' \
    ./gemma3 "$model" --chat -n 100000 -c 2048 -t 1 -k 0 -s 5 < "$work/in" > "$work/out" 2> "$work/err" &
pid=$!
exec 3> "$work/in"

echo "Tell me a long story" >&3
wait_for bytes_out 0 || fail "no reply began"
kill -INT "$pid"
wait_for stopped 1 || fail "the first reply did not stop on SIGINT"
kill -0 "$pid" 2>/dev/null || fail "gemma3 ended at the first SIGINT"
first=$(wc -c < "$work/out")

echo "And another one" >&3
wait_for bytes_out "$first" || fail "no second reply after an interrupted one"
kill -INT "$pid"
wait_for stopped 2 || fail "the second reply did not stop on SIGINT"

exec 3>&- # end of input
wait "$pid"
rc=$?
pid=
[ "$rc" -eq 0 ] || fail "exit status $rc, wanted 0"
lines=$(wc -l < "$work/out")
[ "$lines" -ge 2 ] || fail "$lines lines of replies, wanted 2"
echo "ok: two replies stopped by SIGINT, the chat went on, exit 0"
