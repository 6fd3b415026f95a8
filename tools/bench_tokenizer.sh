#!/usr/bin/env bash
# Tokenizer encode throughput, in MB/s, on a large mixed text (not a test: numbers vary
# with the machine and its load). Usage: bash tools/bench_tokenizer.sh [MB]  (default 32)
#
# The text mixes the tokenizer fixture cases (many scripts, emoji, added tokens, runs of
# spaces and newlines), this repository's C and Python sources, and its Markdown, repeated
# up to the size asked for. One gemma3 --encode call encodes all of it as one input;
# the time of an empty input (model load + tokenizer set-up) is subtracted.
set -euo pipefail
cd "$(dirname "$0")/.."
mb=${1:-32}
model=tests/build/tok-model.bin
work=tests/build/bench-tok
mkdir -p "$work"
[ -x ./gemma3 ] || make gemma3
if [ ! -f "$model" ]; then
  bash tests/fetch_tokenizer.sh >/dev/null
  python3 tools/make_checkpoint.py tests/build/tok-model --vocab 262144 --hidden 32 --inter 64 --layers 3 \
    --heads 2 --kv-heads 1 --head-dim 16 --qpas 16 --window 6 --pattern 3 --max-pos 4096 \
    --tokenizer tests/data/tokenizer.json --fast-random --seed 9 >/dev/null
  python3 export.py tests/build/tok-model "$model" --dtype bf16 -q
fi
python3 - "$work/text.txt" "$mb" <<'PY'
import json, sys, glob
parts = [json.loads(l)["text"] for l in open("tests/fixtures/tokenizer/cases.jsonl", encoding="utf-8")]
for pattern in ("*.c", "*.py", "*.md", "tests/*.c", "tools/*.py"):
    for path in sorted(glob.glob(pattern)):
        parts.append(open(path, encoding="utf-8").read())
unit = "\n".join(parts).encode("utf-8")
want = int(float(sys.argv[2]) * 1e6)
with open(sys.argv[1], "wb") as f:
    f.write((unit * (want // len(unit) + 1))[:want].decode("utf-8", "ignore").encode("utf-8"))
PY
bytes=$(wc -c < "$work/text.txt")
t() { local s e; s=$(date +%s.%N); "$@"; e=$(date +%s.%N); echo "($e - $s)"; }
base=$(t sh -c "./gemma3 $model --encode < /dev/null > /dev/null")
full=$(t sh -c "./gemma3 $model --encode < $work/text.txt > $work/ids.txt")
ids=$(wc -w < "$work/ids.txt")
python3 -c "
b, base, full, ids = $bytes, $base, $full, $ids
dt = max(full - base, 1e-9)
print(f'encode: {b/1e6:.1f} MB -> {ids} tokens in {dt:.2f} s (+{base:.2f} s load): {b/1e6/dt:.1f} MB/s, {ids/dt/1e6:.2f} M tokens/s, one thread')
"
