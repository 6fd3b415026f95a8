#!/usr/bin/env python3
"""export.py's own guarantees, beyond reading GGUF files (tests/test_gguf.py does that):

    tests/test_gguf.sh        (runs tests/test_gguf.py, then this, in the venv with gguf and numpy)

  - special token ids: every id export.py writes is one gemma3's loader accepts (an id the
    loader would reject is refused with one line; the largest id it accepts loads);
  - tokenizer arrays of the wrong element type: one line, no traceback.

Prints one line per check ("ok - ..." / "not ok - ...") and ends with "N passed, N failed".
Work files go to tests/build/export/.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from gguf import GGMLQuantizationType as T

from test_gguf import make_gguf, small_vocab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = os.path.join(ROOT, "tests", "build", "export")
TINY = os.path.join(ROOT, "tests", "fixtures", "tiny")
PY = os.environ.get("EXPORT_PYTHON", "python3")  # the python that runs export.py (standard library only)
passed = failed = 0


def check(cond, what, detail=""):
    global passed, failed
    if cond:
        passed += 1
        print(f"ok - {what}")
    else:
        failed += 1
        print(f"not ok - {what}" + (f": {detail}" if detail else ""))
    return cond


def run(*args, stdin=None, timeout=300):
    r = subprocess.run(list(args), cwd=ROOT, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout)
    return r.returncode, r.stdout, r.stderr.decode("utf-8", "replace")


def export(src, out, *extra):
    return run(PY, "export.py", src, out, "-q", *extra)


def expect_refused(what, src, needle, *extra):
    """export.py src -> a fresh output: exit 1, one line holding needle, no traceback, no output."""
    out = os.path.join(W, "refused.bin")
    if os.path.exists(out):
        os.remove(out)
    rc, _, err = export(src, out, *extra)
    lines = err.strip().splitlines()
    left = [f for f in os.listdir(W) if f.startswith(".refused.bin") or f == "refused.bin"]
    return check(rc == 1 and len(lines) == 1 and "Traceback" not in err and needle in err and not left,
                 f"{what}: refused with one line naming it", f"rc {rc}, stderr {err.strip()[:300]!r}, left {left}")


def loads(model, what):
    """gemma3 opens the model (--logits on two ids)."""
    ids = os.path.join(W, "two-ids.txt")
    with open(ids, "w") as f:
        f.write("2 3\n")
    rc, _, err = run("./gemma3", model, "--logits", ids, os.path.join(W, "two-ids.f32"))
    return check(rc == 0, f"{what}: gemma3 loads the export", err.strip()[:300])


def hf_dir(name, tokenizer):
    """fixtures/tiny (vocabulary of 512) with a tokenizer.json of our own."""
    d = os.path.join(W, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for f in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(TINY, f), os.path.join(d, f))
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f)
    return d


# ----------------------------------------------------------------------------

def special_ids():
    """Both ways: an id the loader rejects is refused, the largest it accepts loads."""
    g = os.path.join(W, "ids.gguf")
    # the vocabulary names <start_of_turn> 290 and <end_of_turn> 291
    make_gguf(g, T.F32, vocab=291, layers=1, seed=2)
    expect_refused("GGUF, <end_of_turn> 291 in a vocabulary of 291", g, "<end_of_turn> token id 291 (the tokenizer's)")
    make_gguf(g, T.F32, vocab=292, layers=1, seed=2)
    b = os.path.join(W, "ids.bin")
    rc, _, err = export(g, b, "--dtype", "f32")
    if check(rc == 0, "GGUF, <end_of_turn> 291 in a vocabulary of 292: exported", err.strip()):
        loads(b, "<end_of_turn> 291 of 292")
    # no tokenizer: Gemma 3's ids 1, 106, 105
    make_gguf(g, T.F32, vocab=106, layers=1, tokenizer=False, seed=2)
    expect_refused("GGUF without a tokenizer, vocabulary of 106", g, "<end_of_turn> token id 106 (Gemma 3's)")
    make_gguf(g, T.F32, vocab=107, layers=1, tokenizer=False, seed=2)
    rc, _, err = export(g, b, "--dtype", "f32")
    if check(rc == 0, "GGUF without a tokenizer, vocabulary of 107: exported", err.strip()):
        loads(b, "Gemma 3's ids in a vocabulary of 107")
    make_gguf(g, T.F32, vocab=300, layers=1, tokenizer=False, seed=2,
              kv={"tokenizer.ggml.eos_token_id": ("u32", 300)})
    expect_refused("GGUF, tokenizer.ggml.eos_token_id 300 in a vocabulary of 300", g, "<eos> token id 300")
    # Hugging Face: tokenizer.json's added tokens
    base = {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 4, "b": 5, "ab": 6}, "merges": ["a b"]}}
    for sot, ok in ((512, False), (511, True)):
        tok = dict(base, added_tokens=[{"id": 1, "content": "<eos>", "special": True},
                                       {"id": 2, "content": "<bos>", "special": True},
                                       {"id": 7, "content": "<end_of_turn>", "special": True},
                                       {"id": sot, "content": "<start_of_turn>", "special": True}])
        d = hf_dir("hf-ids", tok)
        if not ok:
            expect_refused(f"tokenizer.json, <start_of_turn> {sot} in a vocabulary of 512", d,
                           "<start_of_turn> token id 512 (the tokenizer's)")
        else:
            rc, _, err = export(d, b, "--dtype", "f32")
            if check(rc == 0, f"tokenizer.json, <start_of_turn> {sot} in a vocabulary of 512: exported", err.strip()):
                loads(b, f"<start_of_turn> {sot} of 512")


def tokenizer_arrays():
    """Arrays of the wrong element type, length right: one line naming the array and entry."""
    g = os.path.join(W, "arrays.gguf")
    toks, scores, types = small_vocab(512)
    for key, arr, needle in (("scores", [str(s) for s in scores], "tokenizer.ggml.scores[0] is '0.0', not a finite number"),
                             ("scores", scores[:5] + [float("nan")] + scores[6:], "tokenizer.ggml.scores[5] is nan"),
                             ("token_type", [float(t) for t in types], "tokenizer.ggml.token_type[0] is 3.0, not an integer"),
                             ("token_type", [str(t) for t in types], "tokenizer.ggml.token_type[0] is '3', not an integer"),
                             ("tokens", list(range(512)), "tokenizer.ggml.tokens[0] is 0, not a string")):
        arrays = {"tokens": toks, "scores": scores, "token_type": types}
        arrays[key] = arr
        kv = {"tokenizer.ggml.model": ("str", "llama")}
        kv.update({f"tokenizer.ggml.{k}": ("array", v) for k, v in arrays.items()})
        make_gguf(g, T.F32, layers=1, tokenizer=False, kv=kv, seed=2)
        expect_refused(f"tokenizer.ggml.{key} holding {type(arr[-1]).__name__}s", g, needle)


def main():
    os.makedirs(W, exist_ok=True)
    if subprocess.run(["make", "-s", "gemma3", "tools/gguf_dequant"], cwd=ROOT, stdout=subprocess.DEVNULL).returncode:
        check(False, "make gemma3 tools/gguf_dequant")
    else:
        special_ids()
        tokenizer_arrays()
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
