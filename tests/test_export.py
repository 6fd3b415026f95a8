#!/usr/bin/env python3
"""export.py's own guarantees, beyond reading GGUF files (tests/test_gguf.py does that):

    tests/test_gguf.sh        (runs tests/test_gguf.py, then this, in the venv with gguf and numpy)

  - special token ids: every id export.py writes is one gemma3's loader accepts (an id the
    loader would reject is refused with one line; the largest id it accepts loads);
  - tokenizer arrays of the wrong element type: one line, no traceback; a tokenizer.json
    the loader would refuse (an empty added token, a merge that does not hold) is refused;
  - the BPE merges derived from a GGUF vocabulary: those of the definition (every split,
    ranked), on random vocabularies; probe vocabularies of long pieces in bounded time and
    memory;
  - a NaN or infinity in a source tensor (safetensors f32 / bf16 / f16, every GGUF type, also
    kept as it is by --dtype gguf) is refused naming the tensor and the value's index, and so
    is an f32 value that rounds to infinity in bf16;
  - outputs: a symlink's target is written (the link stays), a FIFO is streamed into, an
    input, the program or a file that is not a gemma3.c model is never replaced (unless
    --force, for the last), two runs to one output do not mix;
  - SIGINT, SIGTERM and SIGHUP at every step (reading, dequantizing, writing, gemma3
    --quantize) leave no temporary file and no child process, exit 128 + signal; SIGKILL
    leaves what the README says, and the next run removes it.

Prints one line per check ("ok - ..." / "not ok - ...") and ends with "N passed, N failed".
Work files go to tests/build/export/.
"""
import array
import json
import os
import random
import struct
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import numpy as np
from gguf import GGMLQuantizationType as T

from gguf import GGUFReader
from gguf.quants import dequantize

from test_gguf import BLOCK, HALF_FIELDS, QUANT_TYPES, make_gguf, small_vocab

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


def tokenizer_json():
    """tokenizer.json sections gemma3's loader would refuse are refused at export."""
    base = {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 4, "b": 5, "ab": 6}, "merges": ["a b"]}}
    for what, tok, needle in (
            ("an empty added token", dict(base, added_tokens=[{"id": 9, "content": "", "special": True}]),
             "added token 9 is empty"),
            ("a merge whose result an added token took", dict(base, added_tokens=[{"id": 6, "content": "<x>"}]),
             "merge 'a' + 'b': the pieces of ids 4, 5, 6 are 'a', 'b', '<x>'"),
            ("a merge with an empty part", {"model": {"type": "BPE", "vocab": {"": 3, "b": 5}, "merges": [" b"]}},
             "merge '' + 'b'"),
            ("one id for two pieces", {"model": {"type": "BPE", "vocab": {"a": 4, "b": 5, "ab": 6, "x": 4},
                                                  "merges": ["a b"]}}, "merge 'a' + 'b'")):
        expect_refused(f"tokenizer.json with {what}", hf_dir("hf-tok", tok), needle)


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


def reference_merges(pieces, scores, ttypes):
    """The merges by their definition (transformers' generate_merges, as derive_merges's
    docstring states it): every split of every piece into two pieces, ranked by score
    (highest first), left length, right length (longest first), then the piece's id."""
    vocab = {}
    for i in range(len(pieces) - 1, -1, -1):
        vocab[pieces[i]] = i
    cands = []
    for i, p in enumerate(pieces):
        score = 0.0 if ttypes[i] in (3, 4) else scores[i]
        for k in range(1, len(p)):
            if p[:k] in vocab and p[k:] in vocab:
                cands.append((-score, -k, -(len(p) - k), i, vocab[p[:k]], vocab[p[k:]], vocab[p]))
    cands.sort()
    return [x for c in cands for x in c[4:]]


def merges():
    sys.path.insert(0, ROOT)
    import export as E
    rnd = np.random.default_rng(5)
    same = 0
    for _ in range(300):
        n = int(rnd.integers(1, 60))
        alphabet = "ab\u2581c"[:int(rnd.integers(1, 5))]
        pieces = ["".join(rnd.choice(list(alphabet), int(rnd.choice([0, 1, 1, 2, 3, 4, 6, 9])))) for _ in range(n)]
        scores = [float(rnd.choice([0.0, -0.0, -1.0, -2.0, 1.5, -float(i), np.inf, -np.inf])) for i in range(n)]
        ttypes = [int(rnd.choice([1, 1, 1, 2, 3, 4, 6])) for _ in range(n)]
        vocab = {}
        for i in range(n - 1, -1, -1):
            vocab[pieces[i]] = i
        same += list(E.derive_merges(pieces, vocab, scores, ttypes)) == reference_merges(pieces, scores, ttypes)
    check(same == 300, f"derived merges equal the definition's on {same} of 300 random vocabularies "
          "(duplicates, empty pieces, equal scores, control types)")
    # probes: runs a, aa, ... (every split a merge: as many merges as characters) and long
    # random pieces of every length (a split tried at each length took time quadratic in
    # the characters)
    for kind, n, secs, mb in (("runs", 2000, 30, 250), ("long", 6000, 10, 250)):
        code = ("import random, resource, sys, time\n"
                f"sys.path.insert(0, {ROOT!r})\n"
                "import export\n"
                f"n = {n}\n"
                "rnd = random.Random(0)\n"
                f"p = ['a' * k for k in range(1, n + 1)] if {kind!r} == 'runs' else "
                "['a', 'b'] + [''.join(rnd.choice('ab') for _ in range(k)) for k in range(2, n + 1)]\n"
                "t = time.time()\n"
                "m = export.derive_merges(p, {x: i for i, x in enumerate(p)}, [0.0] * len(p), [1] * len(p))\n"
                "print(len(m) // 3, list(m[:3]), round(time.time() - t, 1), "
                "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n")
        rc, out, err = run(sys.executable, "-c", code)
        f = out.decode().replace("[", "").replace("]", "").replace(",", "").split()
        chars = sum(range(1, n + 1))
        want = [n * (n - 1) // 2, n - 2, 0, n - 1] if kind == "runs" else None
        ok = rc == 0 and len(f) == 6 and float(f[4]) < secs and int(f[5]) < mb and (
            [int(x) for x in f[:4]] == want if want else int(f[0]) < 10)
        check(ok, f"probe vocabulary of {kind} ({n} pieces, {chars / 1e6:.1f} M characters): merges derived in under "
              f"{secs} s and {mb} MB", f"{out.decode().strip()} (merges, first merge, s, MB) {err.strip()[-300:]}")
    # the tokenizer section is built per piece: one added token of id 2^24 - 1 (ids between
    # it and the vocabulary are empty) costs 84 MB of section, not a Python step per id; and
    # it is the section of the definition (per id) on sparse random vocabularies
    rnd = random.Random(5)
    same = 0
    for _ in range(100):
        ids = rnd.sample(range(300), rnd.randint(1, 80))
        pieces = {i: rnd.choice(["a", "bc", "\u00e9", "<x>", "\u4e16"]) * rnd.randint(1, 3) for i in ids}
        types = {i: rnd.randint(0, 3) for i in ids}
        added = ids[:2]
        sec, _ = E.tokenizer_section(pieces, types, added, array.array("I", [0, 0, 0]))
        n = max(pieces) + 1
        blob = b"".join(pieces.get(i, "").encode() for i in range(n))
        offs = [sum(len(pieces.get(j, "").encode()) for j in range(i)) for i in range(n + 1)]
        ref = struct.pack(f"<4I{n + 1}I3I{len(added)}I", n, 1, len(added), 0, *offs, 0, 0, 0, *added) + bytes(types.get(i, 0) for i in range(n)) + blob
        same += bytes(sec) == ref
    check(same == 100, f"tokenizer section per piece == per id on {same} of 100 sparse random vocabularies")
    code = ("import array, resource, sys, time\n"
            f"sys.path.insert(0, {ROOT!r})\n"
            "import export\n"
            "t = time.time()\n"
            "sec, _ = export.tokenizer_section({0: 'a', (1 << 24) - 1: '<x>'}, {}, [(1 << 24) - 1], array.array('I'))\n"
            "print(len(sec), round(time.time() - t, 2), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n")
    rc, out, err = run(sys.executable, "-c", code)
    f = out.decode().split()
    check(rc == 0 and len(f) == 3 and float(f[1]) < 10 and int(f[2]) < 600,
          "a tokenizer with one added token of id 2^24 - 1: its section built in under 10 s and 600 MB",
          f"{out.decode().strip()} (bytes, s, MB) {err.strip()[-300:]}")


def patch_safetensors(src_dir, dst, tensor, index, raw):
    """A copy of a checkpoint directory with value `index` of `tensor` replaced by raw bytes."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src_dir, dst)
    path = os.path.join(dst, "model.safetensors")
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        info = json.loads(f.read(n))[tensor]
        f.seek(8 + n + info["data_offsets"][0] + index * len(raw))
        f.write(raw)
    return dst


def nan_inf():
    """Refused at export time, naming the tensor and the value, for every source type."""
    ckpt = {}
    for dt in ("f32", "f16"):
        ckpt[dt] = os.path.join(W, f"ck-{dt}")
        rc, _, err = run(sys.executable, "tools/make_checkpoint.py", ckpt[dt], "--preset", "tiny", "--dtype", dt, "--seed", "3")
        check(rc == 0, f"make a {dt} checkpoint", err.strip()[-300:])
    ckpt["bf16"] = TINY
    up = "model.layers.2.mlp.up_proj.weight"
    for dt, index, raw, word in (("bf16", 7, struct.pack("<H", 0x7FC0), "is NaN"),
                                 ("bf16", 0, struct.pack("<H", 0xFF80), "is -infinity"),
                                 ("f32", 5, struct.pack("<f", float("inf")), "is infinity"),
                                 ("f16", 9, struct.pack("<H", 0x7E00), "is NaN"),
                                 ("f16", 4095, struct.pack("<H", 0xFC00), "is -infinity")):
        d = patch_safetensors(ckpt[dt], os.path.join(W, "nan-hf"), up, index, raw)
        for out_dtype in ("f32", "bf16", "q8_0"):
            expect_refused(f"value {word[3:]} in a {dt} safetensors, --dtype {out_dtype}", d,
                           f"tensor 'layers.2.mlp.up_proj.weight': value {index} {word}", "--dtype", out_dtype)
    d = patch_safetensors(TINY, os.path.join(W, "nan-hf"), "model.norm.weight", 63, struct.pack("<H", 0x7F80))
    expect_refused("an infinity in a norm", d, "tensor 'norm.weight': value 63 is infinity")
    d = patch_safetensors(ckpt["f32"], os.path.join(W, "nan-hf"), up, 11, struct.pack("<f", 3.4e38))
    expect_refused("an f32 value above bf16's range, --dtype bf16", d,
                   "tensor 'layers.2.mlp.up_proj.weight': value 11 (3.4e+38) rounds to infinity in bf16", "--dtype", "bf16")
    rc, _, err = export(d, os.path.join(W, "big.bin"), "--dtype", "f32")
    check(rc == 0, "... which --dtype f32 keeps", err.strip())

    # GGUF: every type, a NaN or infinity in blk.0.ffn_up.weight where the reference has its first
    g = os.path.join(W, "nan.gguf")
    for q in QUANT_TYPES:
        make_gguf(g, T.Q8_0, layers=1, types={"blk.0.ffn_up.weight": q}, seed=int(q) + 20)
        t = next(t for t in GGUFReader(g).tensors if t.name == "blk.0.ffn_up.weight")
        off = int(t.data_offset)
        if q in (T.F32, T.F16, T.BF16):
            edits = [(off + 37 * {T.F32: 4, T.F16: 2, T.BF16: 2}[q],
                      {T.F32: struct.pack("<f", float("-inf")), T.F16: struct.pack("<H", 0x7C00),
                       T.BF16: struct.pack("<H", 0x7FC1)}[q])]
        else:
            b3 = off + 3 * BLOCK[q][1]  # block 3's scale becomes a NaN (or an infinity)
            if HALF_FIELDS[q]:
                edits = [(b3 + HALF_FIELDS[q][0], struct.pack("<H", 0x7E00))]
            elif q == T.MXFP4:
                edits = [(b3, bytes([0xFF]))]  # E8M0 255: 2^128, an infinity
            elif q == T.NVFP4:
                continue  # its UE4M3 scales are all finite (0x7f reads as 0), its values too
            elif q == T.IQ1_M:  # the half d in the top nibbles of bytes 49, 51, 53, 55
                with open(g, "rb") as f:
                    f.seek(b3 + 49)
                    sc = f.read(7)
                edits = [(b3 + 49 + 2 * k, bytes([(sc[2 * k] & 0x0F) | ((0x7E00 >> (4 * k)) & 0xF) << 4]))
                         for k in range(4)]
            else:
                check(False, f"{q.name}: no scale to make a NaN of")
                continue
        with open(g, "r+b") as f:
            for pos, raw in edits:
                f.seek(pos)
                f.write(raw)
        t = next(t for t in GGUFReader(g).tensors if t.name == "blk.0.ffn_up.weight")
        v = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        bad = np.flatnonzero(~np.isfinite(v))
        if not check(bad.size > 0, f"{q.name}: the reference has a NaN or infinity"):
            continue
        i = int(bad[0])
        word = "NaN" if np.isnan(v[i]) else "-infinity" if v[i] < 0 else "infinity"
        expect_refused(f"GGUF {q.name}, value {i} {word}", g,
                       f"tensor blk.0.ffn_up.weight: gguf_dequant: value {i} is {word}", "--dtype",
                       "bf16" if q in (T.Q4_K, T.F16) else "f32")
        # --dtype gguf copies the tensor's own bytes, but only once its values are checked
        expect_refused(f"GGUF {q.name}, value {i} {word}, kept", g,
                       f"tensor blk.0.ffn_up.weight: gguf_dequant: value {i} is {word}", "--dtype", "gguf")
    make_gguf(g, T.F32, layers=1, seed=9)
    t = next(t for t in GGUFReader(g).tensors if t.name == "blk.0.attn_q.weight")
    with open(g, "r+b") as f:
        f.seek(int(t.data_offset) + 4 * 6)
        f.write(struct.pack("<f", -3.4e38))
    expect_refused("GGUF F32 above bf16's range, --dtype bf16", g,
                   "tensor blk.0.attn_q.weight: gguf_dequant: value 6 (-3.4e+38) rounds to infinity in bf16", "--dtype", "bf16")
    rc, _, err = export(g, os.path.join(W, "big.bin"), "--dtype", "f32")
    check(rc == 0, "... which --dtype f32 keeps", err.strip())


def listing(d):
    return sorted(os.listdir(d))


def outputs():
    """Where the output goes: never replacing what the user did not ask to replace."""
    d = os.path.join(W, "out")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    ref = os.path.join(W, "ref-f32.bin")
    rc, _, err = export(TINY, ref, "--dtype", "f32")
    if not check(rc == 0, "outputs: a plain f32 export", err.strip()):
        return
    want = open(ref, "rb").read()
    # a symlink: its target is replaced, the link stays
    target, link = os.path.join(d, "target.bin"), os.path.join(d, "link.bin")
    shutil.copy(ref, target)
    os.symlink("target.bin", link)
    rc, _, err = export(TINY, link, "--dtype", "bf16")
    check(rc == 0 and os.path.islink(link) and os.readlink(link) == "target.bin" and open(target, "rb").read()[:4] == b"GM3C"
          and open(target, "rb").read() != want and listing(d) == ["link.bin", "target.bin"],
          "a symlink as the output: its target written, the link kept", f"rc {rc} {err.strip()} {listing(d)}")
    dangling = os.path.join(d, "dangling.bin")
    os.symlink("new.bin", dangling)
    rc, _, err = export(TINY, dangling, "--dtype", "q8_0")
    check(rc == 0 and os.path.islink(dangling) and open(os.path.join(d, "new.bin"), "rb").read(4) == b"GM3C"
          and listing(d) == ["dangling.bin", "link.bin", "new.bin", "target.bin"],
          "a symlink to a new name, q8_0: the file made where it points, the link kept", f"rc {rc} {err.strip()} {listing(d)}")
    # a FIFO: streamed into, never replaced
    fifo = os.path.join(d, "fifo")
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    rc, _, err = export(TINY, fifo, "--dtype", "f32")
    reader.join(60)
    check(rc == 0 and got == [want] and stat.S_ISFIFO(os.lstat(fifo).st_mode),
          "a FIFO as the output: the export streamed into it, byte for byte the file's, the FIFO kept",
          f"rc {rc} {err.strip()} {[len(g) for g in got]}")
    reader = threading.Thread(target=lambda: open(fifo, "rb").read(1000))
    reader.start()
    rc, _, err = export(TINY, fifo, "--dtype", "f32")
    reader.join(60)
    check(rc == 1 and err.strip() == f"export.py: error: {fifo}: Broken pipe" and stat.S_ISFIFO(os.lstat(fifo).st_mode),
          "a FIFO whose reader stops early: one line naming it, exit 1", f"rc {rc} {err.strip()!r}")
    rc, got, err = export(TINY, "/dev/stdout", "--dtype", "f32")  # our stdout: a pipe
    check(rc == 0 and got == want, "/dev/stdout on a pipe as the output: the export streamed into it",
          f"rc {rc} {err.strip()} {len(got)} bytes")
    rc, _, err = export(TINY, fifo, "--dtype", "q4_0")
    check(rc == 1 and "is a FIFO: a q4_0 export needs a regular file" in err and stat.S_ISFIFO(os.lstat(fifo).st_mode),
          "a FIFO as a q4_0 output: refused with one line", err.strip())
    sock_path = os.path.join(d, "sock")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(sock_path)
    rc, _, err = export(TINY, sock_path)
    sock.close()
    check(rc == 1 and "is a socket" in err and stat.S_ISSOCK(os.lstat(sock_path).st_mode), "a socket as the output: refused",
          err.strip())
    # an existing file that is not a gemma3.c model: refused, unless --force; an empty one is replaced
    text = os.path.join(d, "notes.txt")
    with open(text, "w") as f:
        f.write("my notes\n")
    rc, _, err = export(TINY, text)
    check(rc == 1 and "notes.txt exists and is not a gemma3.c model file (no GM3C magic): refusing to replace it "
          "(--force replaces it)" in err and open(text).read() == "my notes\n" and not any(".notes" in f for f in listing(d)),
          "an existing file that is not a model: refused, untouched", err.strip())
    rc, _, err = export(TINY, text, "--force")
    check(rc == 0 and open(text, "rb").read(4) == b"GM3C", "... replaced with --force", err.strip())
    empty = os.path.join(d, "empty.bin")
    open(empty, "w").close()
    rc, _, err = export(TINY, empty)
    check(rc == 0 and open(empty, "rb").read(4) == b"GM3C", "an empty existing file: replaced", err.strip())
    rc, out, _ = run(PY, "export.py", "--help")
    check(b"--force" in out, "--help documents --force")
    # an input or the program: refused even with --force
    g = os.path.join(d, "in.gguf")
    make_gguf(g, T.F32, layers=1, seed=2)
    before = open(g, "rb").read()
    for what, src, out_path, needle in (
            ("the GGUF itself", g, g, "is the input"),
            ("the GGUF through a symlink", g, os.path.join(d, "gguf-link"), "is the input"),
            ("the GGUF through a hard link", g, os.path.join(d, "gguf-hard"), "is the input"),
            ("a file of the Hugging Face directory", TINY, os.path.join(TINY, "config.json"), "is the input"),
            ("the gemma3 binary", g, os.path.join(ROOT, "gemma3"), "one of export.py's own program files"),
            ("export.py itself", g, os.path.join(ROOT, "export.py"), "one of export.py's own program files"),
            ("tools/gguf_dequant", g, os.path.join(ROOT, "tools", "gguf_dequant"), "one of export.py's own program files"),
            ("tools/mlx_dequant", g, os.path.join(ROOT, "tools", "mlx_dequant"), "one of export.py's own program files")):
        if out_path.endswith("gguf-link") and not os.path.lexists(out_path):
            os.symlink(g, out_path)
        if out_path.endswith("gguf-hard") and not os.path.exists(out_path):
            os.link(g, out_path)
        sums = {p: open(p, "rb").read() for p in (out_path, g)}
        rc, _, err = export(src, out_path, "--force", "--dtype", "q8_0")
        check(rc == 1 and needle in err and "refusing to overwrite" in err and len(err.strip().splitlines()) == 1
              and all(open(p, "rb").read() == b for p, b in sums.items()),
              f"the output is {what}: refused with --force too, nothing written", err.strip())
    check(open(g, "rb").read() == before, "the GGUF input is unchanged")
    mm = os.path.join(d, "mmproj.gguf")  # any file: the output check comes before reading it
    with open(mm, "wb") as f:
        f.write(b"GGUF-not-really")
    rc, _, err = export(g, mm, "--force", "--mmproj", mm)
    check(rc == 1 and "is the input" in err and "refusing to overwrite" in err and open(mm, "rb").read() == b"GGUF-not-really",
          "the output is the --mmproj file: refused with --force too, nothing written", err.strip())


def held_lock(path):
    """A process holding the lock on path (as a running export holds its temporary file)."""
    code = ("import fcntl, os, sys, time\n"
            f"fd = os.open({path!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    p.stdout.readline()
    return p


# A wrapper that runs export.main() with one step patched to send a signal at it: to the
# process itself (MODE self), or to print "ready" and wait for the test's (MODE wait).
# Every child export.py starts is printed as "child PID".
HOOK = r"""
import os, subprocess, sys, time
sys.path.insert(0, os.getcwd())
import export
step, sig, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fired = [False]

def fire():
    if fired[0]:
        return
    fired[0] = True
    if mode == "self":
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler runs here
    else:
        print("ready", flush=True)
        time.sleep(60)

class Popen(subprocess.Popen):
    def __init__(self, args, *a, **k):
        super().__init__(args, *a, **k)
        print(f"child {self.pid}", flush=True)

    def communicate(self, *a, **k):
        if step.startswith("quantize") and "--quantize" in self.args:
            time.sleep(0.1)  # (quantize-slow: the engine has begun writing its output)
            fire()
        return super().communicate(*a, **k)
export.subprocess.Popen = Popen

if step == "quantize-slow":  # an engine that writes some of its output, then takes its time
    engine = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), "slow-engine.py")
    with open(engine, "w") as f:
        f.write(f"#!{sys.executable}\n"
                "import os, sys, time\n"
                "sys.stdout.buffer.write(bytes(1000))\n"
                "sys.stdout.flush()\n"
                "time.sleep(30)\n")
    os.chmod(engine, 0o755)
    orig_build = export.build_with_make
    export.build_with_make = lambda target, *a, **k: engine if target == 'gemma3' else orig_build(target, *a, **k)

if step == "read":  # the tokenizer, before any tensor
    orig_tok = export.pack_tokenizer if "--hf" in sys.argv else export.gguf_tokenizer
    def tok(*a):
        fire()
        return orig_tok(*a)
    export.pack_tokenizer = export.gguf_tokenizer = tok
if step == "dequantize":
    orig_read = export.Dequantizer.read
    def read(self, nbytes, name):
        for chunk in orig_read(self, nbytes, name):
            yield chunk
            fire()
    export.Dequantizer.read = read
if step == "write":
    orig_write = export.ChunkedWriter.write
    n = [0]
    def write(self, data):
        n[0] += 1
        if n[0] == 20:
            fire()
        return orig_write(self, data)
    export.ChunkedWriter.write = write
sys.argv = ["export.py"] + [a for a in sys.argv[4:] if a != "--hf"]
export.main()
"""


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pids, seconds=30):
    end = time.time() + seconds
    while time.time() < end and any(alive(p) for p in pids):
        time.sleep(0.05)


def signals():
    """SIGINT, SIGTERM, SIGHUP at each step: exit 128 + signal, no file left, no child left."""
    d = os.path.join(W, "sig")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    hook = os.path.join(W, "hook.py")
    with open(hook, "w") as f:
        f.write(HOOK)
    g = os.path.join(W, "sig.gguf")
    make_gguf(g, T.Q8_0, layers=2, seed=4, sane=True)  # values q8_0 can hold
    tok = hf_dir("hf-sig", {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 4, "b": 5, "ab": 6}, "merges": ["a b"]},
                            "added_tokens": [{"id": 1, "content": "<eos>", "special": True}]})
    out = os.path.join(d, "m.bin")
    cases = [("read", "--hf", tok, "f32"), ("read", "", g, "q8_0"), ("dequantize", "", g, "f32"),
             ("dequantize", "", g, "q4_0"), ("write", "--hf", tok, "bf16"), ("write", "", g, "q8_0"),
             ("quantize", "--hf", tok, "q8_0"), ("quantize", "", g, "q4_0"), ("quantize-slow", "--hf", tok, "q8_0"),
             ("quantize-slow", "", g, "q4_0")]
    for i, (step, hf, src, dtype) in enumerate(cases):
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if (i + sig) % 2 and sig != signal.SIGTERM:
                continue  # SIGTERM at every step; SIGINT and SIGHUP at every other one
            mode = "wait" if (i + sig) % 3 == 0 else "self"
            args = [sys.executable, hook, step, str(int(sig)), mode] + ([hf] if hf else []) + [src, out, "-q", "--dtype", dtype]
            t0 = time.time()
            p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            children = []
            if mode == "wait":
                for line in p.stdout:
                    if line.startswith("child "):
                        children.append(int(line.split()[1]))
                    if line.strip() == "ready":
                        p.send_signal(sig)
                        break
            try:
                rest, err = p.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                rest, err = p.communicate()
            children += [int(ln.split()[1]) for ln in rest.splitlines() if ln.startswith("child ")]
            took = time.time() - t0  # (quantize-slow's engine would take 30 s)
            wait_gone(children, 5)
            left = listing(d)
            what = f"{signal.Signals(sig).name} {'from outside' if mode == 'wait' else 'to itself'} while it {step}s " \
                   f"({'Hugging Face' if hf else 'GGUF'} -> {dtype})"
            check(p.returncode == 128 + sig and err.strip() == f"export.py: interrupted by {signal.Signals(sig).name}"
                  and not left and not [c for c in children if alive(c)] and took < 20,
                  f"{what}: exit {128 + sig} at once, one line, no file and no child process left",
                  f"rc {p.returncode} after {took:.1f} s, stderr {err.strip()[-300:]!r}, left {left}, "
                  f"children alive {[c for c in children if alive(c)]}")

    # SIGKILL: an export leaves its one temporary file at any step (in step 2 the f32 / bf16
    # file has no name left: gemma3 reads it by descriptor); the next run of the command removes it
    for step, src, dtype, most in (("write", g, "f32", 1), ("quantize", g, "q8_0", 1), ("quantize", tok, "q4_0", 1)):
        args = [sys.executable, hook, step, str(int(signal.SIGKILL)), "self"] + (["--hf"] if src == tok else []) + \
               [src, out, "-q", "--dtype", dtype]
        r = subprocess.run(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
        wait_gone([int(ln.split()[1]) for ln in r.stdout.splitlines() if ln.startswith("child ")])
        left = listing(d)
        check(r.returncode == -signal.SIGKILL and 1 <= len(left) <= most and all(n.startswith(".m.bin.gemma3-export.")
                                                                                for n in left),
              f"SIGKILL while it {step}s ({dtype}): at most {most} temporary file(s) left, named .m.bin.gemma3-export.*",
              f"rc {r.returncode}, left {left}")
        rc, _, err = export(src, out, "--dtype", dtype)
        check(rc == 0 and listing(d) == ["m.bin"], f"... the next run of the command removes them", f"{err.strip()} {listing(d)}")
        os.remove(out)

    # two runs to the same output at once: the second is refused, the first's files untouched
    held = held_lock(os.path.join(d, ".m.bin" + ".gemma3-export.tmp"))
    rc, _, err = export(g, out, "--dtype", "f32")
    check(rc == 1 and "another export.py is writing" in err and listing(d) == [".m.bin.gemma3-export.tmp"],
          "an export to an output another run is writing: refused, its temporary file left to it", err.strip())
    held.kill()
    held.wait()
    rc, _, err = export(g, out, "--dtype", "f32")
    check(rc == 0 and listing(d) == ["m.bin"], "... and once that run has gone, the export goes on", err.strip())


def main():
    os.makedirs(W, exist_ok=True)
    if subprocess.run(["make", "-s", "gemma3", "tools/gguf_dequant", "tools/mlx_dequant"], cwd=ROOT,
                      stdout=subprocess.DEVNULL).returncode:
        check(False, "make gemma3 tools/gguf_dequant tools/mlx_dequant")
    else:
        special_ids()
        tokenizer_arrays()
        tokenizer_json()
        merges()
        nan_inf()
        outputs()
        signals()
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
