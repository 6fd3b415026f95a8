#!/usr/bin/env python3
"""GGUF import tests: export.py MODEL.gguf against gguf-py, the reference.

    tests/test_gguf.sh                      (makes the venv with gguf and numpy, then runs this)
    PYTHON tests/test_gguf.py [--real MODEL.gguf TOKENIZER.json]

Writes small synthetic Gemma 3 GGUF files with gguf-py's GGUFWriter (random blocks of every
supported type, scales kept finite), exports them with export.py and checks:
  - the f32 export holds bit for bit the float32 values of gguf.quants.dequantize (norms:
    that minus 1, in float32), for every type, GGUF v2 and v3, tied and untied output;
  - the header: every hyper-parameter from the gemma3.* metadata, llama.cpp's defaults
    where a key is absent, the 27B attention-scale rule, Ollama's per-layer pattern;
  - --dtype gguf of every type: each matrix's bytes kept, and ./gemma3 --logits on it within
    1e-3 of max|logit| of the same file's f32 export (F16, BF16: 1e-4; BF16 1e-2 where
    ./gemma3 rounds x to bf16, on a CPU with AVX512_BF16);
  - bf16 / q8_0 / q4_0 exports, and ./gemma3 --logits and --encode on a small vocabulary
    (ids checked against an independent SentencePiece BPE written here);
  - bad files: one line on stderr, exit status 1, no traceback, no output file left.
With --real (or a real GGUF at $GEMMA3_GGUF / tests/data/gemma-3-270m-q4_k_m.gguf together
with tests/data/tokenizer.json): the tokenizer rebuilt from the GGUF against tokenizer.json
(merges in order, pieces, added tokens) and the 421 cases of tests/fixtures/tokenizer.

Prints one line per check ("ok - ..." / "not ok - ...") and ends with "N passed, N failed".
"""
import json
import os
import struct
import subprocess
import sys

import numpy as np
from gguf import GGUFReader, GGUFWriter, GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = os.path.join(ROOT, "tests", "build", "gguf")
PY = os.environ.get("EXPORT_PYTHON", "python3")  # the python that runs export.py (standard library only)


def cpu_has_bf16_dot():
    """Whether this CPU has AVX512_BF16 (Linux's /proc/cpuinfo flags; False where unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in f)
    except OSError:
        return False


# Whether ./gemma3 rounds x to bf16 for bf16 weights (the AVX512_BF16 tiles): test_all.c says
# (GEMMA3_BF16_DOT=0/1, from how it was built); alone, what make's default -march=native build does.
BF16_ROUNDS = int(os.environ["GEMMA3_BF16_DOT"]) if os.environ.get("GEMMA3_BF16_DOT") else cpu_has_bf16_dot()

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


def run(*args, stdin=None):
    r = subprocess.run(list(args), cwd=ROOT, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return r.returncode, r.stdout, r.stderr.decode("utf-8", "replace")


def export(src, out, *extra):
    return run(PY, "export.py", src, out, "-q", *extra)


# ----------------------------------------------------------------------------
# synthetic GGUF files

D, F, H, KV, HD, L = 256, 512, 2, 1, 128, 3  # K-quant rows must be multiples of 256
# the i-quants, ternary and FP4 types: grids and sign tables (gguf_blocks.c) besides scales
GRID_TYPES = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M, T.TQ1_0, T.TQ2_0, T.MXFP4,
              T.NVFP4]
QUANT_TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K,
               T.Q6_K, T.IQ4_NL, T.IQ4_XS] + GRID_TYPES
# Byte offsets of the half-precision fields (d, dmin, m) in each block (ggml-common.h).
# IQ1_M's d is spread over four nibbles (iq1m_finite_d); MXFP4 and NVFP4 have no half.
HALF_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.Q2_K: [80, 82],
               T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.IQ4_NL: [0], T.IQ4_XS: [0],
               T.IQ2_XXS: [0], T.IQ2_XS: [0], T.IQ2_S: [0], T.IQ3_XXS: [0], T.IQ3_S: [0], T.IQ1_S: [0],
               T.IQ1_M: [], T.TQ1_0: [52], T.TQ2_0: [64], T.MXFP4: [], T.NVFP4: [], T.Q8_K: []}
BLOCK = {T.Q4_0: (32, 18), T.Q4_1: (32, 20), T.Q5_0: (32, 22), T.Q5_1: (32, 24), T.Q8_0: (32, 34),
         T.Q2_K: (256, 84), T.Q3_K: (256, 110), T.Q4_K: (256, 144), T.Q5_K: (256, 176), T.Q6_K: (256, 210),
         T.IQ4_NL: (32, 18), T.IQ4_XS: (256, 136), T.IQ2_XXS: (256, 66), T.IQ2_XS: (256, 74), T.IQ2_S: (256, 82),
         T.IQ3_XXS: (256, 98), T.IQ3_S: (256, 110), T.IQ1_S: (256, 50), T.IQ1_M: (256, 56), T.TQ1_0: (256, 54),
         T.TQ2_0: (256, 66), T.MXFP4: (32, 17), T.NVFP4: (64, 36), T.Q8_K: (256, 292)}


def finite_halves(rng, n):
    """Random half-precision bit patterns, every finite one possible (subnormals, zeros)."""
    h = rng.integers(0, 1 << 16, n, dtype=np.uint32).astype(np.uint16)
    return np.where((h & 0x7C00) == 0x7C00, h & 0x83FF, h).astype(np.uint16)


def tensor_data(rng, qtype, rows, cols, all_patterns=False, sane=False):
    """(array, raw_shape or None) for GGUFWriter.add_tensor: random values of qtype. sane:
    normal weights quantized by gguf-py (a model that computes finite logits), else
    random blocks."""
    if sane and qtype not in (T.F32, T.F16):
        try:
            return quantize((rng.standard_normal((rows, cols)) * 0.05).astype(np.float32), qtype), None
        except NotImplementedError:  # gguf-py has no quantizer for the k- and i-quants
            return sane_blocks(rng, qtype, rows, cols), None
    if qtype == T.F32:
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32), None
    if qtype == T.F16:
        if all_patterns:  # every finite half-precision bit pattern, subnormals included (NaN, inf: test_export.py)
            h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
            h = h[(h & 0x7C00) != 0x7C00]
            return np.resize(h, rows * cols).view(np.float16).reshape(rows, cols), None
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float16), None
    if qtype == T.BF16:  # random bf16 bit patterns, the finite ones (an all-ones exponent loses a bit)
        h = rng.integers(0, 1 << 16, rows * cols, dtype=np.uint32).astype(np.uint16)
        h = np.where((h & 0x7F80) == 0x7F80, h & 0xFF7F, h).astype(np.uint16)
        return h.view(np.uint8).reshape(rows, cols * 2), None
    bv, bb = BLOCK[qtype]
    nb = rows * cols // bv
    raw = rng.integers(0, 256, (nb, bb), dtype=np.uint32).astype(np.uint8)
    for off in HALF_FIELDS[qtype]:
        raw[:, off:off + 2] = finite_halves(rng, nb).view(np.uint8).reshape(nb, 2)
    if qtype == T.IQ1_M:
        iq1m_finite_d(raw, finite_halves(rng, nb))
    if qtype == T.MXFP4:  # E8M0 253..255 make infinities (refused by export.py: test_export.py)
        raw[:, 0] %= 253
    if all_patterns and qtype in GRID_TYPES:
        every_entry(raw, qtype)
    return raw.reshape(rows, cols // bv * bb), None


def iq1m_finite_d(raw, h):
    """IQ1_M blocks: put the half d = h in the top nibbles of the four scale words (bytes
    49, 51, 53, 55: d's bits 0-3, 4-7, 8-11, 12-15)."""
    for k in range(4):
        nib = ((h >> (4 * k)) & 0xF).astype(np.uint8)
        raw[:, 49 + 2 * k] = (raw[:, 49 + 2 * k] & 0x0F) | (nib << 4)


def every_entry(raw, qtype):
    """Overwrite the index fields of the blocks raw (n, bytes) so that, in order, they use
    every grid point, every 7-bit sign index, every scale and delta sign (IQ1), every byte
    value (TQ1_0, TQ2_0), every E8M0 exponent and FP4 code (MXFP4), every E4M3 scale (NVFP4).
    Layouts from ggml-common.h; the values then come from gguf-py's grids and tables."""
    n = raw.shape[0]
    i = np.arange(n).reshape(n, 1)
    if qtype in (T.IQ2_XXS, T.IQ3_XXS):  # a u32 per 32 values: 4 sign indices, scale in bits 28-31
        m = (i * 8 + np.arange(8)).astype(np.uint32)  # group number
        aux = sum(((4 * m + k) % 128) << (7 * k) for k in range(4)) | (m % 16) << 28
        if qtype == T.IQ2_XXS:  # per group: 4 grid index bytes, then aux
            for g in range(8):
                raw[:, 2 + 8 * g:6 + 8 * g] = (4 * m[:, g:g + 1] + np.arange(4)) % 256
                raw[:, 6 + 8 * g:10 + 8 * g] = aux[:, g:g + 1].astype("<u4").view(np.uint8)
        else:  # qs[64] (a grid index per 4 values), then the 8 aux words
            raw[:, 2:66] = (i * 64 + np.arange(64)) % 256
            raw[:, 66:98] = aux.astype("<u4").view(np.uint8)
    elif qtype == T.IQ2_XS:  # 32 u16: grid index bits 0-8, sign index bits 9-15
        m = i * 32 + np.arange(32)
        raw[:, 2:66] = ((m % 512) | ((m // 3) % 128) << 9).astype("<u2").view(np.uint8)
        raw[:, 66:74] = (i * 8 + np.arange(8)) % 256  # every pair of 4-bit scales
    elif qtype == T.IQ2_S:  # qs[32] low 8 bits, qh[8] high 2 bits (4 indices a byte)
        m = (i * 32 + np.arange(32)) % 1024
        raw[:, 2:34] = m & 255
        raw[:, 66:74] = sum((m[:, k::4] >> 8) << (2 * k) for k in range(4))
        raw[:, 74:82] = (i * 8 + np.arange(8)) % 256
    elif qtype == T.IQ3_S:  # qs[64] low 8 bits, qh[8] the ninth bit (8 indices a byte)
        m = (i * 64 + np.arange(64)) % 512
        raw[:, 2:66] = m & 255
        raw[:, 66:74] = sum((m[:, k::8] >> 8) << k for k in range(8))
        raw[:, 106:110] = (i * 4 + np.arange(4)) % 256
    elif qtype == T.IQ1_S:  # qs[32] low 8 bits; a u16 per 32 values: 4 x 3 high bits, scale, delta sign
        m = (i * 32 + np.arange(32)) % 2048
        raw[:, 2:34] = m & 255
        g = i * 8 + np.arange(8)
        qh = sum((m[:, k::4] >> 8) << (3 * k) for k in range(4)) | (g % 8) << 12 | ((g // 8) % 2) << 15
        raw[:, 34:50] = qh.astype("<u2").view(np.uint8)
    elif qtype == T.IQ1_M:  # qs[32] low 8 bits; qh[16]: a nibble per index, 3 high bits and the delta sign
        m = (i * 32 + np.arange(32)) % 2048
        raw[:, 0:32] = m & 255
        nib = (m >> 8) | ((i * 32 + np.arange(32)) // 3 % 2) << 3
        raw[:, 32:48] = nib[:, 0::2] | nib[:, 1::2] << 4
    elif qtype in (T.TQ1_0, T.TQ2_0):  # every byte value in every position
        w = 52 if qtype == T.TQ1_0 else 64
        raw[:, :w] = (i * 7 + np.arange(w)) % 256
    elif qtype == T.MXFP4:  # e = every exponent that keeps the values finite (0..252); every code
        raw[:, 0] = np.arange(n) % 253
        raw[:, 1:17] = (i * 16 + np.arange(16)) % 256
    elif qtype == T.NVFP4:  # every scale byte
        raw[:, 0:4] = (i * 4 + np.arange(4)) % 256


def sane_blocks(rng, qtype, rows, cols):
    """Random blocks of qtype whose values are of a model's size (at most 0.15): random
    bytes, their half-precision fields (d, dmin, m) 1 first, then each block's all scaled
    by one random +-[0.5, 1) * 0.15 / max|value| (the values are linear in them)."""
    bv, bb = BLOCK[qtype]
    nb = rows * cols // bv
    raw = rng.integers(0, 256, (nb, bb), dtype=np.uint32).astype(np.uint8)
    if qtype == T.MXFP4:  # no half: an E8M0 scale of 2^-6 gives values up to 6 / 64
        raw[:, 0] = 121
    if qtype == T.NVFP4:  # four E4M3 scales of 2^-5: values up to 6 / 32
        raw[:, 0:4] = 0x10
    offs = HALF_FIELDS[qtype]
    for off in offs:
        raw[:, off:off + 2] = np.full(nb, 1.0, np.float16).view(np.uint8).reshape(nb, 2)
    if qtype == T.IQ1_M:
        iq1m_finite_d(raw, np.full(nb, 1.0, np.float16).view(np.uint16))
    top = np.abs(dequantize(raw, qtype).reshape(nb, bv)).max(axis=1)
    c = rng.uniform(0.5, 1.0, nb) * rng.choice([-1.0, 1.0], nb) * 0.15 / np.maximum(top, 1e-3)
    for off in offs:
        raw[:, off:off + 2] = c.astype(np.float16).view(np.uint8).reshape(nb, 2)
    if qtype == T.IQ1_M:
        iq1m_finite_d(raw, c.astype(np.float16).view(np.uint16))
    return raw.reshape(rows, cols // bv * bb)


def small_vocab(n):
    """A SentencePiece-style vocabulary: specials, the 256 byte pieces, a few words with
    scores, then <unusedN> control pieces up to n."""
    toks = ["<pad>", "<eos>", "<bos>", "<unk>"]
    types = [3, 3, 3, 2]
    scores = [0.0, 0.0, 0.0, 0.0]
    for b in range(256):
        toks.append(f"<0x{b:02X}>")
        types.append(6)
        scores.append(0.0)
    words = ["▁", "e", "l", "o", "h", "a", "b", "r", "t", "▁t", "he", "ll", "▁the", "▁th", "hell", "hello", "▁hello",
             "ab", "▁a", "▁ab", "ra", "bra", "abra", "er", "▁h", "lo", "el", "th", "é", "▁é", "<start_of_turn>",
             "<end_of_turn>", "  "]
    for k, w in enumerate(words):
        toks.append(w)
        types.append(3 if w.startswith("<") else 4 if w == "  " else 1)
        scores.append(-1000.0 if w.startswith("<") or w == "  " else -float(k))
    while len(toks) < n:
        toks.append(f"<unused{len(toks)}>")
        types.append(3)
        scores.append(-1000.0)
    return toks, scores, types


def make_gguf(path, qtype=T.Q8_0, *, version=3, vocab=512, layers=L, dim=D, ffn=F, heads=H, kv_heads=KV, head_dim=HD,
              norm_type=T.F32, output=None, kv=None, drop=(), shapes=None, types=None, all_patterns=False, seed=1,
              tokenizer=True, arch="gemma3", extra_tensors=(), sane=False):
    """Write a gemma3 GGUF with the given tensor type. output: None (tied), "same" (an
    output.weight equal to token_embd) or "other" (a different one). kv: metadata to add
    or (value None) leave out. Returns {gguf name: qtype}."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, arch)
    meta = {
        "gemma3.context_length": ("u32", 4096), "gemma3.embedding_length": ("u32", dim),
        "gemma3.block_count": ("u32", layers), "gemma3.feed_forward_length": ("u32", ffn),
        "gemma3.attention.head_count": ("u32", heads), "gemma3.attention.head_count_kv": ("u32", kv_heads),
        "gemma3.attention.key_length": ("u32", head_dim), "gemma3.attention.value_length": ("u32", head_dim),
        "gemma3.attention.layer_norm_rms_epsilon": ("f32", 1e-6), "gemma3.rope.freq_base": ("f32", 1e6),
        "gemma3.attention.sliding_window": ("u32", 16),
    }
    meta.update(kv or {})
    add = {"u32": w.add_uint32, "i32": w.add_int32, "f32": w.add_float32, "str": w.add_string, "array": w.add_array}
    for k, v in meta.items():
        if v is not None:
            add[v[0]](k, v[1])
    if tokenizer:
        toks, scores, ttypes = small_vocab(vocab)
        w.add_string("tokenizer.ggml.model", "llama")
        w.add_array("tokenizer.ggml.tokens", toks)
        w.add_array("tokenizer.ggml.scores", scores)
        w.add_array("tokenizer.ggml.token_type", ttypes)
        w.add_uint32("tokenizer.ggml.bos_token_id", 2)
        w.add_uint32("tokenizer.ggml.eos_token_id", 1)
    Q = heads * head_dim
    K = kv_heads * head_dim
    names = [("token_embd.weight", [vocab, dim])]
    for i in range(layers):
        p = f"blk.{i}."
        names += [(p + "attn_norm.weight", [dim]), (p + "attn_q.weight", [Q, dim]), (p + "attn_k.weight", [K, dim]),
                  (p + "attn_v.weight", [K, dim]), (p + "attn_output.weight", [dim, Q]),
                  (p + "attn_q_norm.weight", [head_dim]), (p + "attn_k_norm.weight", [head_dim]),
                  (p + "post_attention_norm.weight", [dim]), (p + "ffn_norm.weight", [dim]),
                  (p + "ffn_gate.weight", [ffn, dim]), (p + "ffn_up.weight", [ffn, dim]), (p + "ffn_down.weight", [dim, ffn]),
                  (p + "post_ffw_norm.weight", [dim])]
    names.append(("output_norm.weight", [dim]))
    if output:
        names.append(("output.weight", [vocab, dim]))
    names += list(extra_tensors)
    written, emb = {}, None  # emb: token_embd's data, for an output.weight that repeats it
    for name, shape in names:
        if name in drop:
            continue
        shape = (shapes or {}).get(name, shape)
        t = (types or {}).get(name, norm_type if len(shape) == 1 else qtype)
        if len(shape) == 1:  # stored as 1 + w
            arr = (1 + rng.standard_normal(shape[0]) * 0.1).astype(np.float32)
            if t == T.F16:
                arr = arr.astype(np.float16)
            w.add_tensor(name, arr)
        elif name == "output.weight" and output == "same":
            arr, raw = emb
            w.add_tensor(name, arr, raw_dtype=None if t in (T.F32, T.F16) else t)
        else:
            arr, raw = tensor_data(rng, t, shape[0], shape[1], all_patterns and name == "token_embd.weight", sane)
            if name == "token_embd.weight":
                emb = (arr, raw)
            w.add_tensor(name, arr, raw_dtype=None if t in (T.F32, T.F16) else t)
        written[name] = t
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if version != 3:
        with open(path, "r+b") as f:
            f.seek(4)
            f.write(struct.pack("<I", version))
    return written


# ----------------------------------------------------------------------------
# reading our model files (FORMAT.md)

def read_model(path):
    with open(path, "rb") as f:
        b = f.read()
    h = {}
    (h["magic"], h["version"], h["size"], h["vocab"], h["dim"], h["ffn"], h["layers"], h["heads"], h["kv_heads"],
     h["head_dim"], h["window"], h["ctx"], h["bos"], h["eos"], h["eot"], h["sot"], h["qpas"], h["eps"], h["theta"],
     h["local_theta"], h["factor"], n_t, _, tok_off, tok_size, dir_off, _) = struct.unpack_from("<4sIQ13I5f2I4Q", b)
    h["is_global"] = list(b[128:128 + h["layers"]])
    tensors = {}
    for i in range(n_t):
        name, dt, nd, s0, s1, s2, s3, off, nb = struct.unpack_from("<64sII4IQQ", b, dir_off + 104 * i)
        tensors[name.rstrip(b"\0").decode()] = (dt, [s0, s1, s2, s3][:nd], b[off:off + nb])
    h["tokenizer"] = b[tok_off:tok_off + tok_size] if tok_off else b""
    return h, tensors


OURS = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def our_name(g):
    if g == "token_embd.weight":
        return "embed_tokens.weight"
    if g == "output_norm.weight":
        return "norm.weight"
    _, i, part, _ = g.split(".")
    return f"layers.{i}.{OURS[part]}.weight"


def reference_values(gguf_path):
    """{our name: float32 array} from gguf-py: dequantize, and norms minus 1 in float32."""
    out = {}
    for t in GGUFReader(gguf_path).tensors:
        with np.errstate(over="ignore"):  # MXFP4: 2^127 * 6 is inf, in C as in numpy
            v = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(-1)
        if len(t.shape) == 1:
            v = v - np.float32(1)
        out["lm_head.weight" if t.name == "output.weight" else our_name(t.name)] = v
    if "lm_head.weight" in out and bits_equal(out["lm_head.weight"], out["embed_tokens.weight"]):
        del out["lm_head.weight"]  # the same table again: the export stays tied
    return out


def bits_equal(a, b):
    return a.size == b.size and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def to_bf16_bits(v):
    """float32 -> bf16 as export.py rounds: to nearest even, NaN kept a quiet NaN."""
    u = v.view(np.uint32).astype(np.uint64)
    nan = ((u & 0x7F800000) == 0x7F800000) & ((u & 0x7FFFFF) != 0)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    return np.where(nan, (u >> 16) | 0x40, r).astype(np.uint16)


def compare_export(gguf_path, bin_path, what):
    """Every tensor of the f32 export bit-identical to gguf-py's values."""
    ref = reference_values(gguf_path)
    _, tensors = read_model(bin_path)
    bad = []
    for name, v in ref.items():
        dt, _, raw = tensors[name]
        got = np.frombuffer(raw, dtype="<f4")
        if dt != 0 or not bits_equal(got, v):
            n = int(np.sum(got.view(np.uint32) != v.view(np.uint32))) if got.size == v.size else -1
            bad.append(f"{name} ({n} values differ)")
    return check(not bad and len(tensors) == len(ref), what, ", ".join(bad[:3]))


# ----------------------------------------------------------------------------
# an independent SentencePiece BPE (llama.cpp's llm_tokenizer_spm): repeatedly merge the
# adjacent pair whose concatenation is a piece with the highest score (leftmost on ties);
# characters without a piece become their <0xNN> byte pieces

def spm_encode(text, toks, scores, types):
    ids = {t.replace(" ", "▁"): i for i, t in reversed(list(enumerate(toks)))}
    score = {i: (0.0 if types[i] in (3, 4) else scores[i]) for i in range(len(toks))}
    user = sorted((t.replace(" ", "▁") for t, ty in zip(toks, types) if ty in (3, 4)), key=len, reverse=True)
    out, i, seg = [], 0, ""

    def flush(seg):
        syms = list(seg.replace(" ", "▁"))
        while True:
            best = None
            for k in range(len(syms) - 1):
                m = syms[k] + syms[k + 1]
                if m in ids and (best is None or score[ids[m]] > best[0]):
                    best = (score[ids[m]], k)
            if best is None:
                break
            k = best[1]
            syms[k:k + 2] = [syms[k] + syms[k + 1]]
        for s in syms:
            if s in ids:
                out.append(ids[s])
            else:
                out.extend(ids[f"<0x{b:02X}>"] for b in s.encode())

    while i < len(text):
        hit = next((u for u in user if text.startswith(u, i)), None)
        if hit:
            flush(seg)
            seg = ""
            out.append(ids[hit])
            i += len(hit)
        else:
            seg += text[i]
            i += 1
    flush(seg)
    return out


def expect_error(what, gguf_path, needle, *extra):
    out = os.path.join(W, "bad.bin")
    if os.path.exists(out):
        os.remove(out)
    rc, _, err = export(gguf_path, out, *extra)
    lines = err.strip().splitlines()
    leftovers = [f for f in os.listdir(W) if f.startswith(".bad.bin")]
    check(rc == 1 and len(lines) == 1 and "Traceback" not in err and needle in err and not os.path.exists(out)
          and not leftovers, f"bad GGUF, {what}: one line naming it, exit 1, no output",
          f"rc {rc}, stderr {err.strip()[:300]!r}, leftovers {leftovers}")


def corrupt(src, dst, edits=(), truncate=None):
    with open(src, "rb") as f:
        b = bytearray(f.read())
    for off, data in edits:
        b[off:off + len(data)] = data
    if truncate is not None:
        b = b[:truncate]
    with open(dst, "wb") as f:
        f.write(b)
    return dst


def field_offset(path, key):
    """Byte offset of a metadata value (after its key and type), from gguf-py's reader."""
    r = GGUFReader(path)
    f = r.fields[key]
    return int(f.offset), f


def header_checks(h, want, what):
    bad = {k: (h[k], v) for k, v in want.items() if (abs(h[k] - v) > 1e-6 * abs(v) if isinstance(v, float) else h[k] != v)}
    check(not bad, f"{what}: header", f"{bad}")


# ----------------------------------------------------------------------------

def main():
    os.makedirs(W, exist_ok=True)
    if subprocess.run(["make", "-s", "gemma3", "tools/gguf_dequant"], cwd=ROOT, stdout=subprocess.DEVNULL).returncode:
        check(False, "make gemma3 tools/gguf_dequant")
        return
    real = None
    if len(sys.argv) == 4 and sys.argv[1] == "--real":
        real = (sys.argv[2], sys.argv[3])

    # 1. every type, GGUF v3 (and F16 with every finite bit pattern, norms in F16 too; the grid
    # types with every grid point, sign index and scale in token_embd, random blocks elsewhere)
    for q in QUANT_TYPES:
        g = os.path.join(W, f"t-{q.name}.gguf")
        b = os.path.join(W, f"t-{q.name}.bin")
        every = q in (T.F16, T.BF16) or q in GRID_TYPES
        make_gguf(g, q, all_patterns=every, norm_type=T.F16 if q == T.F16 else T.F32, seed=int(q) + 7)
        rc, _, err = export(g, b, "--dtype", "f32")
        if check(rc == 0, f"{q.name}: export", err.strip()):
            compare_export(g, b, f"{q.name}: f32 export bit-identical to gguf.quants.dequantize"
                           + (" (every grid entry, sign and scale)" if q in GRID_TYPES else ""))
    # the grid types in GGUF v2 too, other random blocks
    for q in GRID_TYPES:
        g = os.path.join(W, f"t2-{q.name}.gguf")
        make_gguf(g, q, version=2, seed=int(q) + 70)
        rc, _, err = export(g, os.path.join(W, f"t2-{q.name}.bin"), "--dtype", "f32")
        if check(rc == 0, f"{q.name}, GGUF v2: export", err.strip()):
            compare_export(g, os.path.join(W, f"t2-{q.name}.bin"), f"{q.name}, GGUF v2: f32 export bit-identical")
    # a file mixing types per tensor, as llama.cpp's IQ2_M / IQ3_XS / Q4_K_L recipes do
    g = os.path.join(W, "mixed.gguf")
    mix = {"token_embd.weight": T.Q8_0, "blk.0.attn_q.weight": T.IQ2_S, "blk.0.attn_k.weight": T.IQ3_S,
           "blk.0.attn_v.weight": T.Q4_K, "blk.0.ffn_down.weight": T.IQ3_XXS, "blk.1.ffn_gate.weight": T.IQ1_M,
           "blk.1.ffn_up.weight": T.IQ2_XXS, "blk.2.attn_output.weight": T.Q6_K, "blk.2.ffn_up.weight": T.MXFP4}
    make_gguf(g, T.IQ2_XS, types=mix, seed=21)
    rc, _, err = export(g, os.path.join(W, "mixed.bin"), "--dtype", "f32")
    if check(rc == 0, "a file mixing types per tensor (IQ2_XS, IQ2_S, IQ3_S, Q4_K, ...): export", err.strip()):
        compare_export(g, os.path.join(W, "mixed.bin"), "mixed types: f32 export bit-identical")
    # files written by llama.cpp's own llama-quantize (tests/fixtures/gguf-iq, made by
    # tools/make_gguf_iq_fixtures.py): values bit for bit, logits against tests/ref_gguf.py's
    fx = os.path.join(ROOT, "tests", "fixtures", "gguf-iq")
    seen = set()
    for f in sorted(n for n in os.listdir(fx) if n.endswith(".gguf")):
        g, stem = os.path.join(fx, f), f[:-len(".gguf")]
        b, lg = os.path.join(W, f"lq-{stem}.bin"), os.path.join(W, f"lq-{stem}.f32")
        seen |= {T(t.tensor_type).name for t in GGUFReader(g).tensors}
        rc, _, err = export(g, b, "--dtype", "f32")
        if not check(rc == 0, f"llama-quantize {stem}: export", err.strip()):
            continue
        compare_export(g, b, f"llama-quantize {stem}: f32 export bit-identical to gguf.quants.dequantize")
        rc, _, err = run("./gemma3", b, "--logits", os.path.join(fx, "tokens.txt"), lg)
        ref = np.fromfile(os.path.join(fx, f"{stem}.logits.f32"), "<f4")
        got = np.fromfile(lg, "<f4") if rc == 0 else np.zeros(0, np.float32)
        same = got.size == ref.size and ref.size % 320 == 0
        rel = float(np.abs(got - ref).max() / np.abs(ref).max()) if same else float("inf")
        same = same and np.array_equal(got.reshape(-1, 320).argmax(1), ref.reshape(-1, 320).argmax(1))
        check(rel <= 1e-4 and same, f"llama-quantize {stem}: gemma3 --logits within 1e-4 of max|logit| of "
              f"tests/ref_gguf.py's ({rel:.1e}), every argmax equal", err.strip())
    want = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "TQ1_0", "TQ2_0"}
    check(want <= seen, f"the llama-quantize files hold every type of {sorted(want)}", f"missing {sorted(want - seen)}")
    # the i-quant grids at the end of gguf_blocks.c are what tools/gguf_tables.py writes from gguf-py
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gguf_tables.py")], stdout=subprocess.PIPE)
    with open(os.path.join(ROOT, "gguf_blocks.c"), "rb") as f:
        src = f.read()
    data = src[src.find(b"/* ---- data: the i-quant grids"):]
    check(r.returncode == 0 and r.stdout == data, "gguf_blocks.c's grids are what tools/gguf_tables.py writes from gguf-py")

    # 2. the header from the metadata; GGUF v2; untied but identical output
    g = os.path.join(W, "v2.gguf")
    make_gguf(g, T.Q4_K, version=2, output="same", seed=3)
    check(GGUFReader(g).fields["GGUF.version"].contents() == 2, "v2 file written")
    rc, _, err = export(g, os.path.join(W, "v2.bin"), "--dtype", "f32")
    if check(rc == 0, "GGUF v2, output.weight identical to token_embd: export", err.strip()):
        compare_export(g, os.path.join(W, "v2.bin"), "GGUF v2: f32 export bit-identical")
        h, t = read_model(os.path.join(W, "v2.bin"))
        header_checks(h, {"vocab": 512, "dim": D, "ffn": F, "layers": L, "heads": H, "kv_heads": KV, "head_dim": HD,
                          "window": 16, "ctx": 4096, "qpas": float(HD), "eps": 1e-6, "theta": 1e6, "local_theta": 1e4,
                          "factor": 1.0, "bos": 2, "eos": 1, "eot": 291, "sot": 290, "is_global": [0, 0, 0]},
                      "defaults (pattern 6, local base 10000, qpas = head_dim)")
        check("output.weight" not in t and len(t) == 2 + 13 * L, "untied output.weight equal to the table: tied")
    g2 = os.path.join(W, "v2-tied.gguf")
    make_gguf(g2, T.Q4_K, version=2, seed=3)
    export(g2, os.path.join(W, "v2-tied.bin"), "--dtype", "f32")
    check(open(os.path.join(W, "v2.bin"), "rb").read() == open(os.path.join(W, "v2-tied.bin"), "rb").read(),
          "same model with and without an identical output.weight: identical exports")
    # an untied classifier: output.weight becomes lm_head.weight, and gemma3 uses it
    g = os.path.join(W, "untied.gguf")
    make_gguf(g, T.Q8_0, output="other", sane=True, seed=12)
    ub = os.path.join(W, "untied.bin")
    rc, _, err = export(g, ub, "--dtype", "f32")
    if check(rc == 0, "output.weight different from token_embd (untied): export", err.strip()):
        compare_export(g, ub, "untied: f32 export bit-identical, lm_head.weight included")
        h, t = read_model(ub)
        check("lm_head.weight" in t and len(t) == 3 + 13 * L, "untied: the file has lm_head.weight")
        with open(os.path.join(W, "untied-ids.txt"), "w") as f:
            f.write("2 300 301 302 5\n")
        rc, _, err = run("./gemma3", ub, "--logits", os.path.join(W, "untied-ids.txt"), os.path.join(W, "untied.f32"),
                         "--dump-hidden", os.path.join(W, "untied-hidden.f32"))
        if check(rc == 0, "untied: ./gemma3 --logits --dump-hidden", err.strip()):
            lg = np.fromfile(os.path.join(W, "untied.f32"), "<f4").reshape(5, -1)
            hid = np.fromfile(os.path.join(W, "untied-hidden.f32"), "<f4").reshape(5, L + 1, D)[:, L].astype(np.float64)
            w = np.frombuffer(t["norm.weight"][2], "<f4").astype(np.float64)
            x = hid / np.sqrt(np.mean(hid * hid, axis=1, keepdims=True) + h["eps"]) * (1 + w)
            head = np.frombuffer(t["lm_head.weight"][2], "<f4").reshape(-1, D).astype(np.float64)
            emb = np.frombuffer(t["embed_tokens.weight"][2], "<f4").reshape(-1, D).astype(np.float64)
            err_head, err_emb = np.abs(lg - x @ head.T).max(), np.abs(lg - x @ emb.T).max()
            scale = np.abs(lg).max()
            check(err_head <= 1e-4 * scale and err_emb > 1e-2 * scale,
                  f"untied: logits are final_norm(h) . lm_head (max|diff| {err_head:.2g} of {scale:.3g}), "
                  f"not the embedding's ({err_emb:.2g})")

    # Ollama's keys (per-layer pattern flags, rope.local.freq_base), rope scaling, and
    # llama.cpp's defaults for absent keys
    g = os.path.join(W, "ollama.gguf")
    w_meta = {"gemma3.rope.freq_base": None, "gemma3.attention.head_count_kv": None, "gemma3.attention.key_length": None,
              "gemma3.attention.value_length": None}
    make_gguf(g, T.Q8_0, layers=4, head_dim=D // H, kv_heads=H, kv=dict(w_meta, **{
        "gemma3.attention.sliding_window_pattern": ("array", [True, False, True, False]),
        "gemma3.rope.local.freq_base": ("f32", 20000.0), "gemma3.rope.scaling.type": ("str", "linear"),
        "gemma3.rope.scaling.factor": ("f32", 8.0)}), seed=5)
    rc, _, err = export(g, os.path.join(W, "ollama.bin"), "--dtype", "f32")
    if check(rc == 0, "Ollama-style metadata: export", err.strip()):
        h, _ = read_model(os.path.join(W, "ollama.bin"))
        header_checks(h, {"heads": H, "kv_heads": H, "head_dim": D // H, "qpas": float(D // H), "theta": 1e4,
                          "local_theta": 2e4, "factor": 8.0, "is_global": [0, 1, 0, 1]},
                      "pattern flags, local base, linear factor 8, absent freq_base -> 10000, kv heads -> heads, "
                      "key_length -> dim/heads")
    # special ids: the pieces' own ids when the vocabulary has them (above: 290, 291);
    # else tokenizer.ggml.*_token_id; else Gemma 3's 2, 1, 106, 105
    for kv, want in (({}, {"bos": 2, "eos": 1, "eot": 106, "sot": 105}),
                     ({"tokenizer.ggml.bos_token_id": ("u32", 5), "tokenizer.ggml.eos_token_id": ("u32", 6),
                       "tokenizer.ggml.eot_token_id": ("u32", 7)}, {"bos": 5, "eos": 6, "eot": 7, "sot": 105})):
        make_gguf(g, T.Q8_0, tokenizer=False, kv=kv, seed=5)
        rc, _, err = export(g, os.path.join(W, "ids.bin"), "--dtype", "f32")
        if check(rc == 0, "no tokenizer: export", err.strip()):
            h, _ = read_model(os.path.join(W, "ids.bin"))
            header_checks(h, dict(want, tokenizer=b""), f"no tokenizer, keys {sorted(kv)}: special ids")
    # the 27B shape (62 blocks): scale 1/sqrt(n_embd / n_head), not 1/sqrt(head_dim)
    g = os.path.join(W, "27b-shape.gguf")
    make_gguf(g, T.F32, layers=62, dim=64, ffn=64, heads=4, kv_heads=2, head_dim=32, vocab=300,
              kv={"gemma3.attention.sliding_window_pattern": ("u32", 3)}, seed=6)
    rc, _, err = export(g, os.path.join(W, "27b-shape.bin"), "--dtype", "f32")
    if check(rc == 0, "62-block file: export", err.strip()):
        h, _ = read_model(os.path.join(W, "27b-shape.bin"))
        header_checks(h, {"qpas": 16.0, "head_dim": 32, "is_global": [1 if i % 3 == 2 else 0 for i in range(62)]},
                      "62 blocks: query_pre_attn_scalar = n_embd / n_head = 16; sliding_window_pattern 3")
    g = os.path.join(W, "noffn.gguf")
    make_gguf(g, T.Q8_0, kv={"gemma3.feed_forward_length": None}, seed=8)
    rc, _, err = export(g, os.path.join(W, "noffn.bin"), "--dtype", "f32")
    if check(rc == 0, "no feed_forward_length key: export", err.strip()):
        h, _ = read_model(os.path.join(W, "noffn.bin"))
        header_checks(h, {"ffn": F}, "no feed_forward_length key: the gate matrix's rows")
    g = os.path.join(W, "gpt2tok.gguf")
    make_gguf(g, T.Q8_0, tokenizer=False, kv={"tokenizer.ggml.model": ("str", "gpt2"),
                                            "tokenizer.ggml.tokens": ("array", ["a", "b", "ab"])}, seed=8)
    rc, _, err = export(g, os.path.join(W, "gpt2tok.bin"), "--dtype", "f32")
    if check(rc == 0 and "warning" in err, "a non-SentencePiece tokenizer: exported with a warning", err.strip()):
        h, _ = read_model(os.path.join(W, "gpt2tok.bin"))
        check(h["tokenizer"] == b"", "a non-SentencePiece tokenizer: no tokenizer section")
    g = os.path.join(W, "noswa.gguf")
    make_gguf(g, T.Q8_0, kv={"gemma3.attention.sliding_window": None}, seed=8)
    rc, _, err = export(g, os.path.join(W, "noswa.bin"), "--dtype", "f32")
    if check(rc == 0, "no sliding_window key: export", err.strip()):
        h, _ = read_model(os.path.join(W, "noswa.bin"))
        header_checks(h, {"is_global": [1] * L}, "no sliding_window key: every layer global (llama.cpp)")

    # 2b. --dtype gguf: each matrix's blocks copied as they are; the engine multiplies them
    # by x as two int8 terms (x rounded to int8 blocks of 32, then what that left out, also
    # int8: about 15 bits, each value within 1/(2 * 127 * 254) of its block's largest), F16
    # in float. Its logits against the same file's f32 export, which multiplies the same
    # values in float: 1e-4 of max|logit| here, bound 1e-3 (with one int8 term, 0.5 - 1.4 %);
    # F16 (float activations): only the order of the sums differs, bound 1e-4. BF16 the same,
    # except where ./gemma3 rounds x to bf16 (BF16_ROUNDS): 0.3 % here, bound 1e-2.
    ids = os.path.join(W, "ids.txt")
    with open(ids, "w") as f:
        f.write("2 300 301 302 5 290 291 292 293\n")
    for q in QUANT_TYPES:
        g = os.path.join(W, f"keep-{q.name}.gguf")
        make_gguf(g, q, sane=True, seed=int(q) + 40)
        logits = {}
        for dt in ("f32", "gguf"):
            b = os.path.join(W, f"keep-{q.name}-{dt}.bin")
            rc, _, err = export(g, b, "--dtype", dt)
            if rc == 0:
                rc, _, err = run("./gemma3", b, "--logits", ids, b + ".logits")
            if check(rc == 0, f"{q.name}: --dtype {dt} export and ./gemma3 --logits", err.strip()):
                logits[dt] = np.fromfile(b + ".logits", dtype="<f4").reshape(9, -1)
        if len(logits) < 2:
            continue
        if q not in (T.F32, T.BF16):  # (those two are stored as f32 and bf16, the same bytes)
            _, t = read_model(os.path.join(W, f"keep-{q.name}-gguf.bin"))
            r = GGUFReader(g)
            src = {x.name: bytes(x.data.tobytes()) for x in r.tensors if len(x.shape) == 2}
            same = all(t[our_name(n)][2] == raw and t[our_name(n)][0] == 256 + int(q) for n, raw in src.items())
            check(same, f"{q.name}: --dtype gguf keeps every matrix's bytes, dtype {256 + int(q)}")
        lf, lk = logits["f32"], logits["gguf"]
        d, top = float(np.max(np.abs(lf - lk))), float(np.max(np.abs(lf)))
        bound = 1e-4 if q in (T.F32, T.F16, T.BF16) else 1e-3
        if q == T.BF16 and BF16_ROUNDS:
            bound = 1e-2  # x rounded to bf16 (the AVX512_BF16 tiles): test_all.c's BF16_DOT_MAX_REL
        agree = int(np.sum(lf.argmax(1) == lk.argmax(1)))
        check(np.all(np.isfinite(lk)) and d <= bound * top,
              f"{q.name}: kept-block logits vs f32 export: max|diff| {d / top:.2g} of max|logit| (bound {bound:g}), "
              f"argmax {agree}/9")

    rc, _, err = export(os.path.join(ROOT, "tests", "fixtures", "tiny"), os.path.join(W, "dir-gguf.bin"), "--dtype", "gguf")
    check(rc == 1 and "--dtype gguf keeps a GGUF file's own blocks" in err and not os.path.exists(os.path.join(W, "dir-gguf.bin")),
          "--dtype gguf of a Hugging Face directory: refused, one line", err.strip())
    # a kept file whose dtype names no block type, or the wrong one: one error line, exit 1
    kb = os.path.join(W, "keep-Q4_K-gguf.bin")
    if os.path.exists(kb):
        raw = bytearray(open(kb, "rb").read())
        dir_off = struct.unpack_from("<Q", raw, 112)[0]  # entry 0: embed_tokens.weight, Q4_K (Q5_0 rows: other sizes)
        for dtype, needle in ((256 + 4, "unknown dtype 260"), (256 + 6, "bad offset/size"), (256 + 99, "unknown dtype 355")):
            struct.pack_into("<I", raw, dir_off + 64, dtype)
            bad = os.path.join(W, "keep-bad.bin")
            open(bad, "wb").write(raw)
            rc, _, err = run("./gemma3", bad, "--logits", ids, bad + ".logits")
            check(rc == 1 and needle in err and len(err.strip().splitlines()) == 1 and not os.path.exists(bad + ".logits"),
                  f"kept file with dtype {dtype}: refused, one line naming it", err.strip())

    # 3. other output types, and the engine on the result
    q = os.path.join(W, "t-Q4_K.gguf")
    rc, _, err = export(q, os.path.join(W, "t-Q4_K-bf16.bin"), "--dtype", "bf16")
    if check(rc == 0, "bf16 export", err.strip()):
        ref = reference_values(q)
        _, t = read_model(os.path.join(W, "t-Q4_K-bf16.bin"))
        bad = [n for n, v in ref.items() if not (
            np.array_equal(np.frombuffer(t[n][2], "<u2"), to_bf16_bits(v)) if t[n][0] == 1 else bits_equal(np.frombuffer(t[n][2], "<f4"), v))]
        check(not bad, "bf16 export: the f32 values rounded to nearest even (norms f32)", ", ".join(bad[:3]))
    ids = os.path.join(W, "ids.txt")
    with open(ids, "w") as f:
        f.write("2 300 301 302 5 290 291 292 293\n")
    sane = os.path.join(W, "sane-Q5_0.gguf")
    make_gguf(sane, T.Q5_0, sane=True, seed=11)
    for dt in ("f32", "bf16", "q8_0", "q4_0"):
        b = os.path.join(W, f"run-{dt}.bin")
        rc, _, err = export(sane, b, "--dtype", dt)
        if check(rc == 0, f"{dt} export of a Q5_0 file", err.strip()):
            rc, _, err = run("./gemma3", b, "--logits", ids, os.path.join(W, f"logits-{dt}.f32"))
            lg = np.fromfile(os.path.join(W, f"logits-{dt}.f32"), dtype="<f4") if rc == 0 else np.zeros(0)
            check(rc == 0 and lg.size == 9 * 512 and np.all(np.isfinite(lg)), f"{dt}: ./gemma3 --logits", err.strip())
    lf = np.fromfile(os.path.join(W, "logits-f32.f32"), dtype="<f4").reshape(9, 512)
    lq = np.fromfile(os.path.join(W, "logits-q8_0.f32"), dtype="<f4").reshape(9, 512)
    check(np.max(np.abs(lf - lq)) < 0.05 * np.max(np.abs(lf)), "q8_0 logits close to f32's",
          f"{np.max(np.abs(lf - lq))} vs max {np.max(np.abs(lf))}")
    toks, scores, ttypes = small_vocab(512)
    texts = ["hello", " the hello", "abra abracadabra", "hello\u00e9 t", "the  hell", "<start_of_turn>hello<end_of_turn>",
             "x\u4e2d\U0001F600", " ", "  hello  ", ""]
    for text in texts:
        rc, out, err = run("./gemma3", os.path.join(W, "run-f32.bin"), "--encode", stdin=text.encode())
        got = [int(x) for x in out.split()]
        want = spm_encode(text, toks, scores, ttypes)
        check(rc == 0 and got == want, f"--encode {text!r} on a small vocabulary: SentencePiece BPE's ids {want}",
              f"got {got} {err.strip()}")

    # 4. bad files
    good = os.path.join(W, "t-Q8_0.gguf")
    size = os.path.getsize(good)
    r = GGUFReader(good)
    first_data = min(int(t.data_offset) for t in r.tensors)
    tok_off, _ = field_offset(good, "tokenizer.ggml.tokens")
    for cut, where in ((3, "in the magic"), (12, "in the header"), (40, "in the metadata"), (tok_off + 100, "in the token list"),
                       (first_data - 40, "in the tensor table"), (first_data + 1000, "in the tensor data"),
                       (size - 1, "one byte short")):
        expect_error(f"truncated {where} (at {cut} bytes)", corrupt(good, os.path.join(W, "cut.gguf"), truncate=cut),
                     "bad magic" if cut < 4 else "truncated" if cut < first_data else "past the end")
    expect_error("wrong magic", corrupt(good, os.path.join(W, "b.gguf"), [(0, b"GGUG")]), "bad magic")
    expect_error("empty file", corrupt(good, os.path.join(W, "b.gguf"), truncate=0), "bad magic")
    expect_error("version 1", corrupt(good, os.path.join(W, "b.gguf"), [(4, struct.pack("<I", 1))]), "version 1")
    expect_error("version 4", corrupt(good, os.path.join(W, "b.gguf"), [(4, struct.pack("<I", 4))]), "version 4")
    expect_error("big-endian", corrupt(good, os.path.join(W, "b.gguf"), [(4, struct.pack(">I", 3))]), "big-endian")
    expect_error("tensor count lies", corrupt(good, os.path.join(W, "b.gguf"), [(8, struct.pack("<Q", 1 << 40))]), "claims")
    expect_error("metadata count lies", corrupt(good, os.path.join(W, "b.gguf"), [(16, struct.pack("<Q", 1 << 50))]), "claims")
    expect_error("metadata count one too many", corrupt(good, os.path.join(W, "b.gguf"), [(16, struct.pack("<Q", len(r.fields) - 3 + 1))]), "")
    arr = r.fields["tokenizer.ggml.tokens"]
    cnt_off = int(arr.offset) + 8 + len("tokenizer.ggml.tokens") + 4 + 4  # key length, key, value type, element type
    expect_error("token array count lies", corrupt(good, os.path.join(W, "b.gguf"), [(cnt_off, struct.pack("<Q", 1 << 60))]),
                 "tokenizer.ggml.tokens")
    str_off = cnt_off + 8  # the length of the first token string
    expect_error("string length lies", corrupt(good, os.path.join(W, "b.gguf"), [(str_off, struct.pack("<Q", 1 << 62))]),
                 "truncated")
    # tensor data offset past the end, and not aligned: patch the last tensor's offset field
    last = r.tensors[-1]
    with open(good, "rb") as f:
        head = f.read(first_data)
    pos = head.rfind(struct.pack("<Q", int(last.data_offset) - first_data))
    expect_error("tensor data offset past the end", corrupt(good, os.path.join(W, "b.gguf"), [(pos, struct.pack("<Q", size))]),
                 "past the end")
    expect_error("tensor data offset unaligned", corrupt(good, os.path.join(W, "b.gguf"),
                 [(pos, struct.pack("<Q", int(last.data_offset) - first_data + 1))]), "alignment")
    g = os.path.join(W, "b.gguf")
    make_gguf(g, T.Q8_0, arch="llama")
    expect_error("another architecture", g, "'llama' is not gemma3")
    make_gguf(g, T.Q8_0, types={"blk.1.attn_q.weight": T.Q8_K})
    expect_error("unsupported type", g, "blk.1.attn_q.weight has type Q8_K")
    # i-quant tensors: data cut short, and a row that is not whole blocks
    for q in (T.IQ1_S, T.IQ2_XXS, T.IQ3_S, T.TQ1_0, T.MXFP4):
        src = os.path.join(W, f"t-{q.name}.gguf")
        rq = GGUFReader(src)
        last = max((t for t in rq.tensors if t.tensor_type == q), key=lambda t: int(t.data_offset))
        cut = int(last.data_offset) + int(last.n_bytes) // 2
        expect_error(f"{q.name} tensor {last.name} cut in the middle", corrupt(src, os.path.join(W, "b.gguf"), truncate=cut),
                     f"tensor {last.name} data")
    src = os.path.join(W, "t-IQ2_XS.gguf")
    with open(src, "rb") as f:
        head = f.read(min(int(t.data_offset) for t in GGUFReader(src).tensors))
    pos = head.find(b"blk.0.attn_k.weight") + len("blk.0.attn_k.weight") + 4  # after the name and n_dims
    expect_error("IQ2_XS rows of 128 values (blocks are 256)", corrupt(src, os.path.join(W, "b.gguf"),
                 [(pos, struct.pack("<QQ", 128, 2 * KV * HD))]), "not whole IQ2_XS blocks of 256")
    expect_error("a type number ggml does not have", corrupt(src, os.path.join(W, "b.gguf"),
                 [(pos + 16, struct.pack("<I", 99))]), "blk.0.attn_k.weight has type number 99")
    make_gguf(g, T.Q8_0, drop=("blk.2.ffn_up.weight",))
    expect_error("missing tensor", g, "missing tensor blk.2.ffn_up.weight")
    make_gguf(g, T.Q8_0, shapes={"blk.0.attn_k.weight": [256, 256]})
    expect_error("wrong shape", g, "blk.0.attn_k.weight has dimensions [256, 256], expected [256, 128]")
    make_gguf(g, T.Q8_0, extra_tensors=[("blk.0.attn_extra.weight", [32, 256])])
    expect_error("unknown tensor", g, "unknown tensor 'blk.0.attn_extra.weight'")
    make_gguf(g, T.Q8_0, kv={"gemma3.embedding_length": None})
    expect_error("missing metadata", g, "missing metadata gemma3.embedding_length")
    make_gguf(g, T.Q8_0, kv={"gemma3.attention.layer_norm_rms_epsilon": ("f32", float("nan"))})
    expect_error("NaN epsilon", g, "gemma3.attention.layer_norm_rms_epsilon is nan, not a finite number")
    make_gguf(g, T.Q8_0, kv={"gemma3.rope.freq_base": ("f32", 0.0)})
    expect_error("zero RoPE base", g, "gemma3.rope.freq_base 0.0 is out of range")
    make_gguf(g, T.Q8_0, extra_tensors=[("blk.0." + "x" * 2000, [32, 256])])
    expect_error("a tensor name of 2000 characters (found by tests/fuzz_export.py)", g, "unknown tensor 'blk.0.xxxx")
    rc, _, err = export(g, os.path.join(W, "bad.bin"))
    check(len(err) < 300, "a tensor name of 2000 characters: the message quotes it cut short", f"{len(err)} characters")
    make_gguf(g, T.Q8_0, tokenizer=False, kv={"tokenizer.ggml.bos_token_id": ("i32", -2 ** 31)})
    expect_error("negative bos id (found by tests/fuzz_export.py)", g, "<bos> token id -2147483648")
    make_gguf(g, T.Q8_0, kv={"gemma3.final_logit_softcapping": ("f32", 30.0)})
    expect_error("soft-capping", g, "soft-capping")
    make_gguf(g, T.Q8_0, kv={"gemma3.rope.scaling.type": ("str", "yarn"), "gemma3.rope.scaling.factor": ("f32", 4.0)})
    expect_error("yarn rope scaling", g, "'yarn'")
    rc, _, err = export(os.path.join(W, "untied.gguf"), os.path.join(W, "untied-q8_0.bin"), "--dtype", "q8_0")
    check(rc == 0 and "lm_head.weight" in read_model(os.path.join(W, "untied-q8_0.bin"))[1],
          "untied, q8_0 export: lm_head.weight quantized too", err.strip())
    rc, _, err = run(PY, "export.py", good, os.path.join(W, "again-q8_0.bin"), "--dtype", "q8_0")
    check(rc == 0 and "is already quantized (Q8_0)" in err and ".tmp" not in err,
          "q8_0 export of a Q8_0 file: says it is already quantized, no .tmp names in the log", err.strip())

    # random corruption of the header, metadata and tensor table: an ExportError (one line)
    # or a clean load, never another exception (in-process, 400 files)
    code = ("import random, sys, traceback, export as E\n"
            f"src = open({good!r}, 'rb').read()\n"
            f"first, tmp = {first_data}, {os.path.join(W, 'fuzz.gguf')!r}\n"
            "rnd = random.Random(7)\n"
            "counts = [0, 0]\n"
            "for it in range(400):\n"
            "    b = bytearray(src)\n"
            "    for _ in range(rnd.choice([1, 2, 4])):\n"
            "        b[rnd.randrange(first)] = rnd.choice([0, 1, 0x7f, 0x80, 0xff, rnd.randrange(256)])\n"
            "    if rnd.random() < 0.2: b = b[:rnd.randrange(len(b))]\n"
            "    open(tmp, 'wb').write(b)\n"
            "    try:\n"
            "        E.load(tmp, 'f32', True).close()\n"
            "        counts[0] += 1\n"
            "    except E.ExportError:\n"
            "        counts[1] += 1\n"
            "    except Exception:\n"
            "        print(f'iteration {it}:', traceback.format_exc().splitlines()[-1]); sys.exit(1)\n"
            "print(f'{counts[0]} loaded, {counts[1]} refused')\n")
    rc, out, err = run(PY, "-c", code)
    check(rc == 0, f"400 randomly corrupted headers: refused with an ExportError or loaded ({out.decode().strip()})",
          (out.decode() + err).strip()[-300:])

    # a token of 300,000 characters: the merges derived at once (every split of it took 20 s)
    code = ("import export, time\n"
            "p = ['a', 'b', 'ab', 'a' * 300000]\n"
            "t = time.time()\n"
            "m = export.derive_merges(p, {x: i for i, x in enumerate(p)}, [0.0] * 4, [1] * 4)\n"
            "print(list(m) == [0, 1, 2], round(time.time() - t, 2))\n")
    rc, out, err = run(PY, "-c", code)
    ok, secs = (out.decode().split() + ["", ""])[:2]
    check(rc == 0 and ok == "True" and float(secs or 99) < 2, "a token of 300,000 characters: merges derived in under 2 s "
          "(every split was tried: quadratic in its length)", f"{out.decode().strip()} {err.strip()[-200:]}")

    # 5. Ctrl-C part-way: no output, no temporary file, no traceback (in-process, deterministic)
    code = ("import sys, export\n"
            "n = [0]\n"
            "orig = export.ChunkedWriter.write\n"
            "def write(self, data):\n"
            "    n[0] += 1\n"
            "    if n[0] == 8: raise KeyboardInterrupt\n"
            "    return orig(self, data)\n"
            "export.ChunkedWriter.write = write\n"
            f"sys.argv = ['export.py', {good!r}, {os.path.join(W, 'intr.bin')!r}, '--dtype', 'f32', '-q']\n"
            "export.main()\n")
    rc, _, err = run(PY, "-c", code)
    left = [f for f in os.listdir(W) if f.startswith(".intr.bin") or f == "intr.bin"]
    check(rc == 130 and err.strip() == "export.py: interrupted by SIGINT" and not left,
          "Ctrl-C during an export: exit 130, one line, no output or temporary file", f"rc {rc} {err.strip()!r} {left}")

    # 6. the real vocabulary
    if real is None:
        cand = os.environ.get("GEMMA3_GGUF") or os.path.join(ROOT, "tests", "data", "gemma-3-270m-q4_k_m.gguf")
        tj = os.path.join(ROOT, "tests", "data", "tokenizer.json")
        if os.path.exists(cand) and os.path.exists(tj):
            real = (cand, tj)
        else:
            print(f"# real-vocabulary checks not run: no {cand} (make test-real fetches it) or no {tj}")
    if real:
        real_vocab(*real)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


def real_vocab(gguf_path, tokenizer_json):
    """The tokenizer rebuilt from a real Gemma 3 GGUF against the real tokenizer.json."""
    sys.path.insert(0, ROOT)
    import export as E
    _, meta, _ = E.read_gguf(gguf_path)
    g, gs = E.gguf_tokenizer(gguf_path, meta)
    h, hs = E.pack_tokenizer(tokenizer_json)

    def parse(b):
        n, nm, na, _ = struct.unpack_from("<4I", b)
        off = struct.unpack_from(f"<{n + 1}I", b, 16)
        p = 16 + 4 * (n + 1)
        merges = b[p:p + 12 * nm]
        p += 12 * nm
        added = set(struct.unpack_from(f"<{na}I", b, p))
        p += 4 * na
        types = b[p:p + n]
        blob = b[p + n:]
        return n, nm, merges, added, types, [blob[off[i]:off[i + 1]] for i in range(n)]

    G, Hf = parse(g), parse(h)
    n = G[0]
    check(G[1] == Hf[1] and G[2] == Hf[2], f"real vocabulary: the {G[1]} merges derived from the scores equal "
          f"tokenizer.json's {Hf[1]}, in order")
    check(G[5] == Hf[5][:n], f"real vocabulary: the {n} pieces equal tokenizer.json's")
    extra = sorted(Hf[3] - G[3])
    check(G[3] <= Hf[3] and all(i >= n for i in extra), "real vocabulary: the added tokens equal tokenizer.json's "
          f"(tokenizer.json also has {extra}, beyond the GGUF's {n} tokens)")
    check({i for i in range(n) if G[4][i] == 1} == {i for i in range(n) if Hf[4][i] == 1}, "real vocabulary: byte pieces")
    check(gs == hs, f"real vocabulary: special ids {gs}")
    # the 421 cases, through an export whose tokenizer comes from the GGUF: a tiny model
    # (F32, hidden 32) carrying the real tokenizer arrays
    tiny = os.path.join(W, "realvocab.gguf")
    r = GGUFReader(gguf_path)
    f = r.fields
    toks = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode() for i in f["tokenizer.ggml.tokens"].data]
    w = GGUFWriter(tiny, "gemma3")
    for k, v in (("context_length", 512), ("embedding_length", 32), ("block_count", 1), ("feed_forward_length", 32),
                 ("attention.head_count", 2), ("attention.head_count_kv", 1), ("attention.key_length", 16),
                 ("attention.value_length", 16), ("attention.sliding_window", 8)):
        w.add_uint32("gemma3." + k, v)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", toks)
    w.add_array("tokenizer.ggml.scores", [float(f["tokenizer.ggml.scores"].parts[i][0]) for i in f["tokenizer.ggml.scores"].data])
    w.add_array("tokenizer.ggml.token_type", [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data])
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", (rng.standard_normal((len(toks), 32)) * 0.02).astype(np.float32))
    for name, shape in (("attn_norm", [32]), ("attn_q", [32, 32]), ("attn_k", [16, 32]), ("attn_v", [16, 32]),
                        ("attn_output", [32, 32]), ("attn_q_norm", [16]), ("attn_k_norm", [16]),
                        ("post_attention_norm", [32]), ("ffn_norm", [32]), ("ffn_gate", [32, 32]), ("ffn_up", [32, 32]),
                        ("ffn_down", [32, 32]), ("post_ffw_norm", [32])):
        w.add_tensor(f"blk.0.{name}.weight", np.ones(shape, dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    b = os.path.join(W, "realvocab.bin")
    rc, _, err = export(tiny, b, "--dtype", "f32")
    if not check(rc == 0, "real vocabulary: export", err.strip()):
        return
    same = differ = 0
    notes = []
    with open(os.path.join(ROOT, "tests", "fixtures", "tokenizer", "cases.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            c = json.loads(line)
            rc, out, err = run("./gemma3", b, "--encode", stdin=c["text"].encode())
            got = [int(x) for x in out.split()]
            if got == c["ids"]:
                same += 1
            elif "<image_soft_token>" in c["text"]:
                notes.append(c["text"][:40])  # id 262144: in tokenizer.json only, not in the GGUF
            else:
                differ += 1
                print(f"#   {c['text'][:60]!r}: got {got[:12]}, want {c['ids'][:12]}")
    check(differ == 0, f"real vocabulary: {same} of the tokenizer cases give Hugging Face's ids, "
          f"{len(notes)} hold <image_soft_token> (id 262144, not in the GGUF's {n} tokens), {differ} differ")


if __name__ == "__main__":
    main()
