#!/usr/bin/env python3
"""Checks of the benchmarks' GGUF writer (tools/make_gguf.py, tools/gguf_quantize.c), run by
test_gguf.sh in its venv (gguf-py 0.19.0, numpy): the blocks against gguf-py's quantizers
(bit for bit for the types it quantizes; within the format's error for Q4_K and Q6_K, which
it only reads), llama.cpp's Q4_K_M mix, and a whole file read back by gguf-py.
Prints "ok - ..." / "not ok - ..." lines and ends with "N passed, N failed"."""

import json
import os
import subprocess
import sys

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFReader
from gguf.quants import dequantize, quantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = os.path.join(ROOT, "tests", "build", "make_gguf")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_gguf  # noqa: E402

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


def run_quantize(path, src, rows, cols, qtype, offset=0):
    return subprocess.run([QUANT, path, str(offset), src, str(rows), str(cols), qtype], capture_output=True)


def rows_under_test(rng, cols):
    """Rows that reach each path of the quantizers: gaussian at a weight's scale, heavy
    tails, all zero, all positive (min > 0), tiny (float16 subnormal scales), constant,
    one outlier among zeros."""
    r = [rng.normal(0, 0.03, cols), rng.standard_t(3, cols), np.zeros(cols), rng.uniform(0.5, 2, cols),
         rng.normal(0, 1e-6, cols), np.full(cols, -0.25), np.zeros(cols)]
    r[6][cols // 3] = 3.0
    # bf16-representable, as checkpoints are, so the bf16 source path can hold them too
    x = np.array(r, dtype=np.float32)
    return (x.view(np.uint32) & 0xffff0000).view(np.float32)


def test_blocks():
    rng = np.random.default_rng(7)
    rows, cols = 7, 512
    x = rows_under_test(rng, cols)
    f32 = os.path.join(W, "rows.f32")
    bf16 = os.path.join(W, "rows.bf16")
    x.tofile(f32)
    (x.view(np.uint32) >> 16).astype(np.uint16).tofile(bf16)
    exact = {"F32": lambda: x.tobytes(), "F16": lambda: x.astype(np.float16).tobytes(),
             "BF16": lambda: quantize(x, T.BF16).tobytes(), "Q8_0": lambda: quantize(x, T.Q8_0).tobytes(),
             "Q4_0": lambda: quantize(x, T.Q4_0).tobytes(), "Q5_0": lambda: quantize(x, T.Q5_0).tobytes()}
    for name, want in exact.items():
        r = run_quantize(f32, "f32", rows, cols, name)
        check(r.returncode == 0 and r.stdout == want(), f"gguf_quantize {name} == gguf-py's quantize, bit for bit",
              r.stderr.decode())
    # Q4_K / Q6_K: gguf-py only dequantizes them. Each sub-block's codes span its range in
    # 15 (63) steps, and its scale is rounded to 6 (8) bits of the block's largest: the error
    # stays within about a step, far below the values' spread.
    for name, qt, rel in (("Q4_K", T.Q4_K, 0.12), ("Q6_K", T.Q6_K, 0.03)):
        r = run_quantize(f32, "f32", rows, cols, name)
        if not check(r.returncode == 0 and len(r.stdout) == rows * cols // 256 * (144 if name == "Q4_K" else 210),
                     f"gguf_quantize {name}: {rows} rows of {cols // 256} blocks", r.stderr.decode()):
            continue
        y = dequantize(np.frombuffer(r.stdout, dtype=np.uint8).reshape(rows, -1), qt)
        for i, what in enumerate(("gaussian", "heavy-tailed", "zero", "positive", "tiny", "constant", "outlier")):
            if what == "tiny":  # the super-block scales are float16: ~1e-6 values are below them
                check(np.all(np.isfinite(y[i])), f"gguf_quantize {name}, tiny row: finite")
                continue
            err = np.sqrt(np.mean((y[i] - x[i]) ** 2))
            scale = np.sqrt(np.mean(x[i] ** 2))
            ok = err <= rel * scale if scale > 0 else not y[i].any()
            check(ok and np.all(np.isfinite(y[i])), f"gguf_quantize {name}, {what} row: rms error {err:.3g} <= {rel} x rms {scale:.3g}")
    for name in ("Q8_0", "Q4_K", "Q6_K", "F16"):
        a, b = run_quantize(f32, "f32", rows, cols, name), run_quantize(bf16, "bf16", rows, cols, name)
        check(a.returncode == 0 and a.stdout == b.stdout, f"gguf_quantize {name}: bf16 source == the same values in f32")
    # one row from an offset: the second row alone
    r = run_quantize(f32, "f32", 1, cols, "Q4_0", offset=cols * 4)
    check(r.stdout == quantize(x[1:2], T.Q4_0).tobytes(), "gguf_quantize reads its rows from OFFSET")
    for args, what in (([f32, "0", "f32", "1", "320", "Q4_K"], "COLS not a multiple of 256 for Q4_K"),
                       ([f32, "0", "f32", str(rows + 1), str(cols), "Q8_0"], "the file ends inside the tensor"),
                       ([f32, "0", "f32", "1", str(cols), "Q3_K"], "a type it does not write"),
                       ([f32, "0", "f64", "1", str(cols), "Q8_0"], "an unknown source type"),
                       ([f32, "-4", "f32", "1", str(cols), "Q8_0"], "a negative offset")):
        r = subprocess.run([QUANT] + args, capture_output=True)
        lines = r.stderr.decode().strip().splitlines()
        check(r.returncode == 1 and len(lines) == 1 and lines[0].startswith("gguf_quantize: "),
              f"gguf_quantize refuses {what} in one line", r.stderr.decode())


def test_mix():
    # The published Gemma 3 270M Q4_K_M (18 layers, hidden 640, FFN 2048): attn_v is Q8_0
    # (Q6_K falling back) in layers 0, 1, 4, 7, 10, 13, 15, 16, 17 and Q5_0 elsewhere; ffn_down
    # Q6_K in those layers, Q4_K elsewhere; attn_output Q4_K; q, k, gate, up Q5_0; the tied
    # token embedding Q8_0.
    more = {0, 1, 4, 7, 10, 13, 15, 16, 17}
    got = {i: (make_gguf.tensor_type("attn_v", i, 18, 640, "q4_k_m"), make_gguf.tensor_type("ffn_down", i, 18, 2048, "q4_k_m"))
           for i in range(18)}
    want = {i: ("Q8_0", "Q6_K") if i in more else ("Q5_0", "Q4_K") for i in range(18)}
    check(got == want, "q4_k_m: attn_v and ffn_down types per layer as in the published 270M file", str(got))
    others = [make_gguf.tensor_type(n, 3, 18, c, "q4_k_m") for n, c in
              (("attn_output", 1024), ("attn_q", 640), ("attn_k", 640), ("ffn_gate", 640), ("ffn_up", 640), ("token_embd", 640))]
    check(others == ["Q4_K", "Q5_0", "Q5_0", "Q5_0", "Q5_0", "Q8_0"], "q4_k_m: the other matrices of the 270M", str(others))
    check(make_gguf.tensor_type("token_embd", -1, 18, 1024, "q4_k_m") == "Q6_K", "q4_k_m: a token embedding of 1024 columns is Q6_K")
    check([make_gguf.tensor_type("token_embd", -1, 26, 1152, m) for m in ("q4_0", "q8_0", "bf16")] == ["Q8_0", "Q8_0", "BF16"],
          "q4_0 / q8_0 / bf16: the tied embedding as llama-quantize types it")


def test_file():
    ckpt = os.path.join(W, "ckpt")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_checkpoint.py"), ckpt, "--preset", "tiny",
                        "--hidden", "256", "--inter", "512", "--heads", "2", "--kv-heads", "1", "--head-dim", "128",
                        "--layers", "8", "--vocab", "320", "--seed", "3"], capture_output=True)
    if not check(r.returncode == 0, "make_checkpoint: a random checkpoint with 256-wide rows", r.stderr.decode()[-300:]):
        return
    out = os.path.join(W, "tiny-q4_k_m.gguf")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_gguf.py"), ckpt, out, "-q"], capture_output=True)
    if not check(r.returncode == 0 and os.path.exists(out) and not os.path.exists(out + ".tmp"),
                 "make_gguf.py writes the Q4_K_M file", r.stderr.decode()):
        return
    g = GGUFReader(out)
    meta = {k: f.contents() for k, f in g.fields.items() if not k.startswith("GGUF.")}
    check(meta.get("gemma3.block_count") == 8 and meta.get("gemma3.embedding_length") == 256
          and meta.get("gemma3.feed_forward_length") == 512 and meta.get("gemma3.attention.key_length") == 128
          and meta.get("general.file_type") == 15, "the gemma3.* metadata from config.json", str(meta)[:300])
    # the checkpoint's values, by GGUF name
    with open(os.path.join(ckpt, "model.safetensors"), "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        base = 8 + n
        data = f.read()
    values = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        v = (np.frombuffer(data[a:b], dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
        values[make_gguf.gguf_name_of(name[len("model."):])[0]] = v
    check(set(values) == {t.name for t in g.tensors}, "every text tensor of the checkpoint, none other")
    types = {t.name: t.tensor_type.name for t in g.tensors}
    seen = set(types.values())
    check(seen == {"F32", "Q4_K", "Q6_K"}, "types: F32 norms, Q4_K and Q6_K matrices (rows of 256: no fallback)", str(seen))
    bad = []
    for t in g.tensors:
        want = values[t.name]
        layer = int(t.name.split(".")[1]) if t.name.startswith("blk.") else -1
        short = t.name.split(".")[-2]
        if want.ndim == 1:
            ok = t.tensor_type == T.F32 and np.array_equal(np.asarray(t.data), 1.0 + want)
        else:
            ok = (t.tensor_type.name == make_gguf.tensor_type(short, layer, 8, want.shape[1], "q4_k_m")
                  and list(map(int, t.shape)) == [want.shape[1], want.shape[0]])
            y = dequantize(t.data, t.tensor_type).reshape(want.shape)
            ok = ok and np.sqrt(np.mean((y - want) ** 2)) <= 0.12 * np.sqrt(np.mean(want ** 2))
        if not ok or t.data_offset % 32:
            bad.append(t.name)
    check(not bad, "each tensor: its type, ne0 = columns, norms 1 + w exactly, matrices within Q4_K's error, aligned",
          ", ".join(bad[:5]))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_gguf.py"), os.path.join(W, "nothing"), out + "2"],
                       capture_output=True)
    check(r.returncode == 1 and r.stderr.decode().count("\n") == 1 and not os.path.exists(out + "2"),
          "make_gguf.py: a missing checkpoint is one line, no output", r.stderr.decode())


def test_tokenizer():
    path = os.path.join(ROOT, "tests", "data", "tokenizer.json")
    if not os.path.exists(path):
        print("# no tests/data/tokenizer.json: tokenizer checks skipped")
        return
    pieces, scores, types, special = make_gguf.tokenizer_arrays(path, 262144)
    check(special == {"bos": 2, "eos": 1, "unk": 3, "pad": 0}, "tokenizer: <bos> 2, <eos> 1, <unk> 3, <pad> 0", str(special))
    check(types.count(6) == 256 and all(types[238 + b] == 6 and pieces[238 + b] == "<0x%02X>" % b for b in range(256)),
          "tokenizer: the 256 byte pieces <0x00>..<0xFF> at 238..493 are type 6")
    check(types[106] == 3 and pieces[106] == "<end_of_turn>" and types[107] == 4 and pieces[107] == "\n",
          "tokenizer: <end_of_turn> a control token, the added newline user-defined")
    normal = [s for s, t in zip(scores, types) if t == 1]
    # 262,144 less 6,414 added tokens (tokenizer.json's 6,415 less <image_soft_token>, id
    # 262,144) and 256 bytes: 255,474, as many normal pieces as the published GGUFs hold
    check(len(normal) == 262144 - 6414 - 256 and all(a > b for a, b in zip(normal, normal[1:])),
          "tokenizer: the normal pieces score in id order, strictly decreasing (as Gemma's SentencePiece scores)")


os.makedirs(W, exist_ok=True)
r = subprocess.run(["make", "-s", "-C", ROOT, "tools/gguf_quantize"], capture_output=True)
QUANT = os.path.join(ROOT, "tools", "gguf_quantize")
if check(r.returncode == 0, "make tools/gguf_quantize", r.stderr.decode()):
    test_blocks()
    test_mix()
    test_file()
    test_tokenizer()
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
