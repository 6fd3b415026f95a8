#!/usr/bin/env python3
"""Make tests/fixtures/gguf-iq: i-quant, ternary and mixed-recipe GGUFs written by
llama.cpp's own llama-quantize, with reference logits.

    tests/data/venv-gguf/bin/python tools/make_gguf_iq_fixtures.py LLAMA_CPP_DIR [OUT_DIR]

LLAMA_CPP_DIR is a llama.cpp source tree with llama-quantize and llama-imatrix built in
build/bin (the fixtures' README says how); its commit comes from git, or from a file COMMIT
in it when the tree is no git checkout (as when extracted with git archive). Runs in the venv of tests/test_gguf.sh (gguf-py
0.19.0 and numpy). Steps, in a work directory (tests/build/gguf-iq-work):
  1. base.gguf: a random Gemma 3 (hidden 256, 2 layers, 4 heads of 64, one KV head, FFN
     256, 320 tokens), every matrix F32 with rows of 256 values, so that every tensor can be
     any 256-value block type; norms stored as 1 + w, as llama.cpp's converter does;
  2. imatrix.gguf: llama-imatrix over tests/real/pride-and-prejudice-ch1.txt;
  3. each type of TYPES: llama-quantize --imatrix imatrix.gguf base.gguf TYPE.gguf TYPE
     (llama.cpp's own recipe: it picks each tensor's type, mixing them as in the files it
     publishes);
  4. TYPE.logits.f32: tests/ref_gguf.py's float32 forward over gguf-py's dequantized
     weights, on the ids of tokens.txt;
  5. a check of gguf-py against ggml's own C: llama-quantize --allow-requantize TYPE.gguf to
     F32 (ggml's dequantize_row_*) must give gguf-py's values bit for bit.
Then writes OUT_DIR/README.md with the llama.cpp commit, the commands and every file's types.
"""
import collections
import hashlib
import os
import subprocess
import sys

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFReader, GGUFWriter
from gguf.quants import dequantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_gguf import small_vocab  # noqa: E402  (the SentencePiece-style vocabulary of the GGUF tests)

TYPES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M",
         "TQ1_0", "TQ2_0"]
DIM, FFN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB, WINDOW = 256, 256, 4, 1, 64, 1, 320, 8
TOKENS = [2, 272, 276, 262, 264, 290, 268, 280, 70, 101, 291, 281, 300, 1, 285, 266]


def run(cmd, log):
    print("+", " ".join(cmd), flush=True)
    with open(log, "ab") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def write_base(path, seed=31):
    """The random F32 model: weights ~ N(0, 1/sqrt(columns)), embedding ~ N(0, 1/sqrt(DIM)),
    norms 1 + N(0, 0.1)."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, "gemma3")
    for k, v in (("context_length", 512), ("embedding_length", DIM), ("block_count", LAYERS),
                 ("feed_forward_length", FFN), ("attention.head_count", HEADS),
                 ("attention.head_count_kv", KV_HEADS), ("attention.key_length", HEAD_DIM),
                 ("attention.value_length", HEAD_DIM), ("attention.sliding_window", WINDOW)):
        w.add_uint32("gemma3." + k, v)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32("gemma3.rope.freq_base", 1e6)
    toks, scores, types = small_vocab(VOCAB)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", toks)
    w.add_array("tokenizer.ggml.scores", scores)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_uint32("tokenizer.ggml.bos_token_id", 2)
    w.add_uint32("tokenizer.ggml.eos_token_id", 1)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 3)
    w.add_uint32("tokenizer.ggml.padding_token_id", 0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (1 + rng.standard_normal(n) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", (rng.standard_normal((VOCAB, DIM)) / np.sqrt(DIM)).astype(np.float32))
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(DIM))
        w.add_tensor(p + "attn_q.weight", mat(q, DIM))
        w.add_tensor(p + "attn_k.weight", mat(kv, DIM))
        w.add_tensor(p + "attn_v.weight", mat(kv, DIM))
        w.add_tensor(p + "attn_q_norm.weight", norm(HEAD_DIM))
        w.add_tensor(p + "attn_k_norm.weight", norm(HEAD_DIM))
        w.add_tensor(p + "attn_output.weight", mat(DIM, q))
        w.add_tensor(p + "post_attention_norm.weight", norm(DIM))
        w.add_tensor(p + "ffn_norm.weight", norm(DIM))
        w.add_tensor(p + "ffn_gate.weight", mat(FFN, DIM))
        w.add_tensor(p + "ffn_up.weight", mat(FFN, DIM))
        w.add_tensor(p + "ffn_down.weight", mat(DIM, FFN))
        w.add_tensor(p + "post_ffw_norm.weight", norm(DIM))
    w.add_tensor("output_norm.weight", norm(DIM))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def type_summary(path):
    """'IQ2_XXS x10, Q4_K x2, ...' over the matrices of a GGUF (norms are F32)."""
    c = collections.Counter(T(t.tensor_type).name for t in GGUFReader(path).tensors if len(t.shape) == 2)
    return ", ".join(f"{n} ×{k}" for n, k in sorted(c.items(), key=lambda x: (-x[1], x[0])))


def ggml_vs_gguf_py(quantized, dequantized):
    """'bit for bit' if ggml's F32 (llama-quantize to F32) equals gguf-py's dequantization of
    every tensor, else the largest difference."""
    ours = {t.name: t for t in GGUFReader(dequantized).tensors}
    worst = 0.0
    for t in GGUFReader(quantized).tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        b = np.asarray(ours[t.name].data).reshape(-1)
        if ours[t.name].tensor_type != T.F32 or a.size != b.size:
            return f"{t.name}: not an F32 of the same size"
        if not np.array_equal(a.view(np.uint32), b.view(np.uint32)):
            worst = max(worst, float(np.abs(a - b).max()))
    return "bit for bit" if worst == 0 else f"max |diff| {worst:.3g}"


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    llama = os.path.abspath(sys.argv[1])
    out = os.path.abspath(sys.argv[2]) if len(sys.argv) == 3 else os.path.join(ROOT, "tests", "fixtures", "gguf-iq")
    bin_dir = os.path.join(llama, "build", "bin")
    work = os.path.join(ROOT, "tests", "build", "gguf-iq-work")
    os.makedirs(work, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    log = os.path.join(work, "llama.log")
    if os.path.exists(log):
        os.remove(log)
    base, imatrix = os.path.join(work, "base.gguf"), os.path.join(work, "imatrix.gguf")
    write_base(base)
    text = os.path.join(ROOT, "tests", "real", "pride-and-prejudice-ch1.txt")
    imatrix_cmd = [os.path.join(bin_dir, "llama-imatrix"), "-m", base, "-f", text, "-o", imatrix, "-c", "128",
                   "--chunks", "16", "-t", "1", "--no-ppl", "--seed", "1"]
    run(imatrix_cmd, log)
    tokens = os.path.join(out, "tokens.txt")
    with open(tokens, "w") as f:
        f.write(" ".join(map(str, TOKENS)) + "\n")
    rows = []
    for t in TYPES:
        g = os.path.join(out, f"{t}.gguf")
        run([os.path.join(bin_dir, "llama-quantize"), "--imatrix", imatrix, base, g, t, "1"], log)
        lg = os.path.join(out, f"{t}.logits.f32")
        subprocess.run([sys.executable, os.path.join(ROOT, "tests", "ref_gguf.py"), g, "--tokens", tokens, "--out", lg],
                       check=True)
        f32 = os.path.join(work, f"{t}-f32.gguf")
        run([os.path.join(bin_dir, "llama-quantize"), "--allow-requantize", g, f32, "F32", "1"], log)
        rows.append(f"| {t}.gguf | {os.path.getsize(g):,} | {type_summary(g)} | {ggml_vs_gguf_py(g, f32)} |")
    r = subprocess.run(["git", "-C", llama, "rev-parse", "HEAD"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if r.returncode == 0:
        commit = r.stdout.decode().strip()
    else:
        with open(os.path.join(llama, "COMMIT")) as f:
            commit = f.read().strip()
    with open(base, "rb") as f:
        base_sha = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(README.format(commit=commit, dims=f"hidden {DIM}, {LAYERS} layer{'s' if LAYERS > 1 else ''}, {HEADS} heads "
                              f"of {HEAD_DIM} ({KV_HEADS} KV), FFN {FFN}, {VOCAB} tokens, window {WINDOW}", vocab=VOCAB,
                              imatrix=" ".join(os.path.basename(c) if c.startswith(ROOT) or c.startswith(llama) else c
                                               for c in imatrix_cmd),
                              base_sha=base_sha, rows="\n".join(rows), tokens=" ".join(map(str, TOKENS))))
    print(f"wrote {len(TYPES)} GGUFs, their logits and README.md to {out}")


README = """\
# gguf-iq: GGUFs written by llama.cpp's llama-quantize

Made by `tools/make_gguf_iq_fixtures.py` (run it to make them again; it gives the same bytes)
with llama.cpp commit `{commit}` (the mirror ngxson/llama.cpp), built with

    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF \\
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF
    cmake --build build --target llama-quantize llama-imatrix

(on Intel machines with AMX, add `-mno-amx-tile -mno-amx-int8 -mno-amx-bf16` to
CMAKE_C_FLAGS and CMAKE_CXX_FLAGS: its AMX path crashed here).

1. `base.gguf` (not kept; sha256 `{base_sha}`): a random Gemma 3, {dims},
   written by gguf-py. Every matrix is F32 with rows of 256 values, so that any tensor can
   take any 256-value block type.
2. The importance matrix the 1- and 2-bit types need (the text is tests/real/'s):

       {imatrix}

3. Each file below, with the recipe llama.cpp itself picks (it mixes tensor types, as in the
   files it publishes; at this size its IQ2_S recipe writes no IQ2_S tensor, IQ2_M's does):

       llama-quantize --imatrix imatrix.gguf base.gguf TYPE.gguf TYPE 1

4. `TYPE.logits.f32`: a float32 numpy forward over gguf-py's dequantized weights, float32 LE
   [16][{vocab}], on the ids of `tokens.txt` ({tokens}):

       tests/ref_gguf.py TYPE.gguf --tokens tokens.txt --out TYPE.logits.f32

5. The last column of the table checks gguf-py, the reference, against ggml's own C
   (`dequantize_row_*`): every tensor of `llama-quantize --allow-requantize TYPE.gguf
   TYPE-f32.gguf F32 1` against `gguf.quants.dequantize`.

`make test` (tests/test_gguf.py) exports each file to f32, checks every value against gguf-py
bit for bit, and runs `gemma3 --logits` against the reference: within 1e-4 of max|logit|,
every argmax equal.

| File | Bytes | Matrices by type | ggml's F32 vs gguf-py's |
|---|---|---|---|
{rows}
"""

if __name__ == "__main__":
    main()
