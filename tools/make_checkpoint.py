#!/usr/bin/env python3
"""Write a small random Gemma 3 text checkpoint in the real Hugging Face layout.

The real Gemma weights cannot be downloaded here, so the tests and benchmarks use
random checkpoints that look exactly like the files Hugging Face publishes:
config.json + model.safetensors (or model-0000i-of-0000N.safetensors shards and
model.safetensors.index.json), optionally tokenizer.json.  The exporter then runs
on them through its normal code path.  Standard library only (no numpy).

Usage:
    python3 tools/make_checkpoint.py OUT_DIR [--preset tiny|small|1b|270m]
        [--vocab N] [--hidden N] [--inter N] [--layers N] [--heads N] [--kv-heads N]
        [--head-dim N] [--qpas F] [--window N] [--pattern N] [--max-pos N]
        [--rope-theta F] [--rope-local-base F] [--rope-scaling F]
        [--layout flat|nested|nested-new|nested-v5] [--layer-types] [--shards N]
        [--dtype bf16|f32|f16] [--sparse-config] [--tokenizer PATH]
        [--seed N] [--fast-random]
        [--vision IMAGE,PATCH,HIDDEN,INTER,LAYERS,HEADS,MM_TOKENS]
        [--image-tokens IMAGE,BOI,EOI]

Layouts:
  flat        Gemma3ForCausalLM, flat config (model_type gemma3_text), tensors "model.*"
              (like the 1B / 270M releases).
  nested      Gemma3ForConditionalGeneration, config under "text_config" (model_type
              gemma3), tensors "language_model.model.*" plus a small SigLIP vision tower
              "vision_tower.vision_model.*" and projector "multi_modal_projector.*"
              (like the 4B+ releases; --vision sets its sizes, default 16,4,32,64,1,2,4).
  nested-new  as nested, but tensors "model.language_model.*", "model.vision_tower.*",
              "model.multi_modal_projector.*" (transformers 4.52 - 4.57 naming).
  nested-v5   as nested, but the tower's tensors "vision_tower.*" without "vision_model."
              (what transformers 5 saves).

--vision writes a real SigLIP vision tower and projector of those sizes (image_size,
patch_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
mm_tokens_per_image) in place of the small fake one, so transformers'
Gemma3ForConditionalGeneration loads the checkpoint and runs images through it.  Its
LayerNorm weights are 1 + N(0, 0.12) (a LayerNorm multiplies by w, not 1 + w).
--image-tokens sets image_token_index, boi_token_index, eoi_token_index (default
262144, 255999, 256000 as the real checkpoints where the vocabulary holds them, else its
last three ids).

Determinism: every tensor is generated from its own seed, derived with SHA-256 from
(--seed, canonical tensor name without any prefix, generator mode), in fixed chunks.
So the same --seed and shape give the same tensor values whatever --layout, --shards,
--layer-types, --sparse-config and --dtype are (f32 and f16 files hold exactly the
bf16 values, widened).  --fast-random gives different (but equally deterministic)
values than the default generator.

Values (bf16; magnitudes like a real model, so activations stay finite):
  embed_tokens           ~ N(0, 1/sqrt(hidden))       (1B: sigma 0.029, |x| < 0.125)
  linear weights [o, i]  ~ N(0, 1/sqrt(i))             (1B: sigma 0.029 / 0.012)
  norm weights, biases   ~ N(0, 0.12), |x| < 0.5       (norms multiply by 1 + w)
Magnitudes are clamped to [2^-13, B), B = the first 2^odd >= 4 sigma, by clamping the
bf16 exponent, so every value is a normal number exactly representable in bf16, f16
and f32.  The default generator draws random.gauss() and truncates to bf16 (about
6 MB/s: fine up to tens of millions of parameters).  --fast-random fills bytes from
SHAKE-256 and forces each bf16 high byte (sign + exponent) through a 256-entry table
with bytes.translate, at C speed: the real 1B shape (1.0 G parameters, 2.0 GB of
bf16) takes about 10 s.  Its values are spread log-uniformly inside two-octave
exponent buckets whose shares are fitted so the standard deviation is sigma.
"""

import argparse
import array
import hashlib
import json
import math
import os
import random
import shutil
import struct
import sys
import time

CHUNK = 1 << 20          # elements generated per step; part of the value definition
MIN_HI7 = 57             # smallest allowed (bf16 bits >> 8) & 0x7f: |x| >= 2^-13
NORM_SIGMA = 0.12
DEFAULT_VOCAB = 262208   # transformers' Gemma3TextConfig default vocab_size

PRESETS = {
    "tiny": dict(vocab=512, hidden=64, inter=160, layers=7, heads=4, kv_heads=2,
                 head_dim=32, qpas=24, window=8, pattern=6, max_pos=512),
    "small": dict(vocab=1024, hidden=96, inter=256, layers=8, heads=3, kv_heads=1,
                  head_dim=32, qpas=32, window=6, pattern=6, max_pos=512),
    "1b": dict(vocab=262144, hidden=1152, inter=6912, layers=26, heads=4, kv_heads=1,
               head_dim=256, qpas=256, window=512, pattern=6, max_pos=32768),
    "270m": dict(vocab=262144, hidden=640, inter=2048, layers=18, heads=4, kv_heads=1,
                 head_dim=256, qpas=256, window=512, pattern=6, max_pos=32768),
}

DTYPES = {  # --dtype -> (safetensors dtype, bytes per element, torch_dtype)
    "bf16": ("BF16", 2, "bfloat16"),
    "f32": ("F32", 4, "float32"),
    "f16": ("F16", 2, "float16"),
}

# The vision tower of the nested layouts when --vision does not size it.
DEFAULT_VISION = [16, 4, 32, 64, 1, 2, 4]


# ----------------------------------------------------------------------------
# Model description
# ----------------------------------------------------------------------------

def is_global(layer, pattern):
    """Gemma 3 rule: every pattern-th layer uses global attention."""
    return (layer + 1) % pattern == 0


def text_tensors(a):
    """Canonical (name, shape) list of the text model, in HF order."""
    h, hd = a.hidden, a.head_dim
    out = [("embed_tokens.weight", [a.vocab, h])]
    for i in range(a.layers):
        p = "layers.%d." % i
        out += [
            (p + "input_layernorm.weight", [h]),
            (p + "self_attn.q_proj.weight", [a.heads * hd, h]),
            (p + "self_attn.k_proj.weight", [a.kv_heads * hd, h]),
            (p + "self_attn.v_proj.weight", [a.kv_heads * hd, h]),
            (p + "self_attn.o_proj.weight", [h, a.heads * hd]),
            (p + "self_attn.q_norm.weight", [hd]),
            (p + "self_attn.k_norm.weight", [hd]),
            (p + "post_attention_layernorm.weight", [h]),
            (p + "pre_feedforward_layernorm.weight", [h]),
            (p + "post_feedforward_layernorm.weight", [h]),
            (p + "mlp.gate_proj.weight", [a.inter, h]),
            (p + "mlp.up_proj.weight", [a.inter, h]),
            (p + "mlp.down_proj.weight", [h, a.inter]),
        ]
    out.append(("norm.weight", [h]))
    return out


def vision_tensors(a):
    """Canonical (name, shape) list of the SigLIP tower (google/gemma-3-4b-it naming)."""
    image, patch, h, inter, layers = a.vision[:5]
    p = "vision_tower.vision_model."
    out = [(p + "embeddings.patch_embedding.weight", [h, 3, patch, patch]),
           (p + "embeddings.patch_embedding.bias", [h]),
           (p + "embeddings.position_embedding.weight", [(image // patch) ** 2, h])]
    for i in range(layers):
        q = p + "encoder.layers.%d." % i
        for norm in ("layer_norm1", "layer_norm2"):
            out += [(q + norm + ".weight", [h]), (q + norm + ".bias", [h])]
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += [(q + "self_attn." + proj + ".weight", [h, h]), (q + "self_attn." + proj + ".bias", [h])]
        out += [(q + "mlp.fc1.weight", [inter, h]), (q + "mlp.fc1.bias", [inter]),
                (q + "mlp.fc2.weight", [h, inter]), (q + "mlp.fc2.bias", [h])]
    out += [(p + "post_layernorm.weight", [h]), (p + "post_layernorm.bias", [h])]
    return out


def vision_hidden(a):
    return a.vision[2]


def projector_tensors(a):
    return [
        ("multi_modal_projector.mm_input_projection_weight", [vision_hidden(a), a.hidden]),
        ("multi_modal_projector.mm_soft_emb_norm.weight", [vision_hidden(a)]),
    ]


def file_name(canonical, layout):
    """HF tensor name of a canonical name for the given layout."""
    is_text = not canonical.startswith(("vision_tower.", "multi_modal_projector."))
    if layout == "flat":
        return "model." + canonical
    if layout == "nested":
        return ("language_model.model." + canonical) if is_text else canonical
    if layout == "nested-v5":
        return ("language_model.model." + canonical) if is_text else canonical.replace(
            "vision_tower.vision_model.", "vision_tower.", 1)
    return ("model.language_model." + canonical) if is_text else ("model." + canonical)


def all_tensors(a):
    """(canonical name, file name, shape) in file order.  Vision tensors go first
    and projector tensors last, so exporters cannot assume the text is contiguous."""
    canon = text_tensors(a)
    if a.layout != "flat":
        canon = vision_tensors(a) + canon + projector_tensors(a)
    return [(c, file_name(c, a.layout), s) for c, s in canon]


def sigma_of(canonical, shape, hidden):
    """Standard deviation used for one tensor (see module docstring)."""
    if canonical.endswith(".bias") or "norm" in canonical.rsplit(".", 2)[-2]:
        return NORM_SIGMA
    if canonical == "embed_tokens.weight":
        return 1.0 / math.sqrt(hidden)
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return 1.0 / math.sqrt(fan_in)


# ----------------------------------------------------------------------------
# Random bf16 generation
# ----------------------------------------------------------------------------

def top_hi7(sigma):
    """Largest allowed high-byte exponent field: bound 2^(2*hi7-125) >= 4 sigma."""
    return max(MIN_HI7, math.ceil((math.log2(4.0 * sigma) + 125.0) / 2.0))


_tables = {}


def clamp_table(sigma):
    """bytes.translate table for the bf16 high byte: keep the sign, clamp the
    exponent field to [MIN_HI7, top_hi7(sigma)]."""
    key = ("clamp", sigma)
    if key not in _tables:
        top = top_hi7(sigma)
        _tables[key] = bytes((b & 0x80) | min(max(b & 0x7F, MIN_HI7), top)
                             for b in range(256))
    return _tables[key]


def bucket_slots(shape_sigma, top):
    """Exponent field (hi7) for each of 128 slots: two-octave buckets
    [2^(2h-127), 2^(2h-125)) for h in [MIN_HI7, top], each getting about the share
    of slots that N(0, shape_sigma) puts there (the end buckets take the tails)."""
    def cdf_abs(x):  # P(|X| < x)
        return 1.0 if x is None else math.erf(x / (shape_sigma * math.sqrt(2.0)))

    buckets = list(range(MIN_HI7, top + 1))
    probs = []
    for h in buckets:
        lower = 0.0 if h == MIN_HI7 else 2.0 ** (2 * h - 127)
        upper = None if h == top else 2.0 ** (2 * h - 125)
        probs.append(cdf_abs(upper) - cdf_abs(lower))
    raw = [p * 128 for p in probs]          # largest-remainder allocation
    slots = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - slots[i], reverse=True)
    for i in order[:128 - sum(slots)]:
        slots[i] += 1
    per_slot = []
    for h, n in zip(buckets, slots):
        per_slot += [h] * n
    return per_slot


def slots_variance(per_slot):
    """Exact E[x^2] of the bf16 values the slots produce: exponent 2h or 2h+1 and
    the 7 mantissa bits uniform (they come from the random low byte)."""
    mant = sum((1.0 + m / 128.0) ** 2 for m in range(128)) / 128.0
    return sum(mant * (4.0 ** (2 * h - 127) + 4.0 ** (2 * h - 126)) / 2.0
               for h in per_slot) / len(per_slot)


def fast_table(sigma):
    """bytes.translate table mapping a random byte to a bf16 high byte: bit 7 is the
    sign, the low 7 bits pick a two-octave exponent bucket (the low byte, left
    random, supplies the last exponent bit and the mantissa).  Values are spread
    evenly in log scale inside a bucket, which inflates the variance, so the
    bucket shares come from a narrower Gaussian, found by bisection, whose table
    has standard deviation sigma."""
    key = ("fast", sigma)
    if key in _tables:
        return _tables[key]
    top = top_hi7(sigma)
    lo, hi = sigma / 16.0, sigma
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if slots_variance(bucket_slots(mid, top)) > sigma * sigma:
            hi = mid
        else:
            lo = mid
    per_slot = bucket_slots(lo, top)
    _tables[key] = bytes((b & 0x80) | per_slot[b & 0x7F] for b in range(256))
    return _tables[key]


def tensor_key(seed, canonical, fast):
    mode = "fast" if fast else "gauss"
    return hashlib.sha256(("gemma3.c/make_checkpoint:%d:%s:%s"
                           % (seed, mode, canonical)).encode()).digest()


def gauss_chunks(key, n, sigma):
    """Default generator: random.gauss, truncated to bf16, exponent clamped."""
    rng = random.Random(int.from_bytes(key, "little"))
    gauss = rng.gauss
    table = clamp_table(sigma)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        f32 = array.array("f", [gauss(0.0, sigma) for _ in range(m)])
        if sys.byteorder == "big":
            f32.byteswap()
        f32 = f32.tobytes()
        bf = bytearray(2 * m)
        bf[0::2] = f32[2::4]
        bf[1::2] = f32[3::4].translate(table)
        yield bytes(bf)


def fast_chunks(key, n, sigma):
    """--fast-random generator: SHAKE-256 bytes, high byte forced via a table."""
    table = fast_table(sigma)
    for j, start in enumerate(range(0, n, CHUNK)):
        m = min(CHUNK, n - start)
        raw = hashlib.shake_256(key + j.to_bytes(8, "little")).digest(2 * m)
        bf = bytearray(raw)
        bf[1::2] = raw[1::2].translate(table)
        yield bytes(bf)


_masks = {}


def lane_masks(n):
    """Big-int masks over n 32-bit lanes (cached for the common chunk size)."""
    if n not in _masks:
        if len(_masks) > 4:
            _masks.clear()
        _masks[n] = (int.from_bytes(b"\0\0\xff\x7f" * n, "little"),
                     int.from_bytes(b"\0\0\0\x80" * n, "little"),
                     int.from_bytes(b"\0\xc0\x01\0" * n, "little"))  # 112 << 10
    return _masks[n]


def bf16_to_f32(bf):
    out = bytearray(2 * len(bf))
    out[2::4] = bf[0::2]
    out[3::4] = bf[1::2]
    return bytes(out)


def bf16_to_f16(bf):
    """Exact bf16 -> f16 for normal values with exponent in [113, 142], on whole
    chunks at once: 32-bit lanes in one big integer, no per-element Python work."""
    n = len(bf) // 2
    lanes = int.from_bytes(bf16_to_f32(bf), "little")   # each lane = bf16 << 16
    mag_mask, sign_mask, rebias = lane_masks(n)
    # (bf16 & 0x7fff) << 3 places exponent at bit 10 and mantissa at bits 3..9;
    # subtracting 112 << 10 rebiases the exponent (127 -> 15) without borrows.
    res = (((lanes & mag_mask) >> 13) - rebias) | ((lanes & sign_mask) >> 16)
    b = res.to_bytes(4 * n, "little")
    out = bytearray(2 * n)
    out[0::2] = b[0::4]
    out[1::2] = b[1::4]
    return bytes(out)


def tensor_chunks(canonical, shape, a):
    """Yield the bytes of one tensor in the requested dtype."""
    n = 1
    for d in shape:
        n *= d
    key = tensor_key(a.seed, canonical, a.fast_random)
    sigma = sigma_of(canonical, shape, a.hidden)
    if canonical == "multi_modal_projector.mm_input_projection_weight":
        sigma = 1.0 / math.sqrt(shape[0])  # stored (in, out): x @ w
    gen = fast_chunks if a.fast_random else gauss_chunks
    convert = {"bf16": None, "f32": bf16_to_f32, "f16": bf16_to_f16}[a.dtype]
    for bf in gen(key, n, sigma):
        if is_layernorm_weight(canonical):
            bf = plus_one(bf)
        yield convert(bf) if convert else bf


def is_layernorm_weight(canonical):
    """The SigLIP tower's LayerNorm weights (its biases, and Gemma's RMSNorms, stay as drawn)."""
    return canonical.startswith("vision_tower.") and canonical.endswith("norm.weight") and \
        ("layer_norm" in canonical or "post_layernorm" in canonical)


def plus_one(bf):
    """1 + w for bf16 values w, truncated to bf16 (a few hundred values: plain Python)."""
    out = bytearray()
    for i in range(0, len(bf), 2):
        w = struct.unpack("<f", b"\0\0" + bf[i:i + 2])[0]
        out += struct.pack("<f", 1.0 + w)[2:4]
    return bytes(out)


# ----------------------------------------------------------------------------
# safetensors writing
# ----------------------------------------------------------------------------

def nbytes(shape, dtype):
    n = DTYPES[dtype][1]
    for d in shape:
        n *= d
    return n


def split_shards(tensors, n_shards, dtype):
    """Split the ordered tensor list into n_shards contiguous, non-empty groups of
    roughly equal byte size."""
    n_shards = max(1, min(n_shards, len(tensors)))
    sizes = [nbytes(t[2], dtype) for t in tensors]
    groups, cur, cur_bytes = [], [], 0
    remaining = sum(sizes)
    for i, (t, size) in enumerate(zip(tensors, sizes)):
        shards_left = n_shards - len(groups)          # including the current one
        target = remaining / shards_left
        must_close = len(tensors) - i == shards_left - 1
        if cur and shards_left > 1 and (cur_bytes + size / 2 > target or must_close):
            groups.append(cur)
            remaining -= cur_bytes
            cur, cur_bytes = [], 0
        cur.append(t)
        cur_bytes += size
    groups.append(cur)
    return groups


def safetensors_header(tensors, dtype):
    """JSON header (8-byte aligned with spaces, as the safetensors library does)."""
    header, off = {}, 0
    for _, name, shape in tensors:
        size = nbytes(shape, dtype)
        header[name] = {"dtype": DTYPES[dtype][0], "shape": shape,
                        "data_offsets": [off, off + size]}
        off += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, off


class Progress:
    """Progress lines on stderr for writes over 256 MB: every 5 % or 10 s."""

    def __init__(self, total, hint=""):
        self.total, self.done = total, 0
        self.t0 = self.last_time = time.time()
        self.last_pct = 0
        self.enabled = total > (256 << 20)
        if self.enabled and hint:
            print(hint, file=sys.stderr, flush=True)

    def add(self, n, what):
        self.done += n
        now, pct = time.time(), 100 * self.done // self.total
        if self.enabled and (pct >= self.last_pct + 5 or now - self.last_time > 10.0):
            self.last_time, self.last_pct = now, pct
            print("  %3d%%  %6d / %d MB  %6.1f s  %s" % (
                pct, self.done >> 20, self.total >> 20, now - self.t0, what),
                file=sys.stderr, flush=True)


def write_safetensors(path, tensors, a, progress):
    raw, data_size = safetensors_header(tensors, a.dtype)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for canonical, name, shape in tensors:
            for chunk in tensor_chunks(canonical, shape, a):
                f.write(chunk)
                progress.add(len(chunk), name)
        assert f.tell() == 8 + len(raw) + data_size
    os.replace(tmp, path)
    return data_size


def remove_stale(out_dir):
    """Remove weight files an earlier run (maybe with other --shards) left behind."""
    for fn in os.listdir(out_dir):
        if fn == "model.safetensors" or fn == "model.safetensors.index.json" or (
                fn.startswith("model-") and fn.endswith(".safetensors")):
            os.remove(os.path.join(out_dir, fn))


def write_weights(a):
    tensors = all_tensors(a)
    groups = split_shards(tensors, a.shards, a.dtype)
    total = sum(nbytes(t[2], a.dtype) for t in tensors)
    hint = "" if a.fast_random else (
        "note: the default generator does about 6 MB/s; --fast-random is much faster")
    progress = Progress(total, hint)
    remove_stale(a.out_dir)
    if len(groups) == 1:
        write_safetensors(os.path.join(a.out_dir, "model.safetensors"), tensors, a, progress)
    else:
        weight_map = {}
        for i, group in enumerate(groups):
            fn = "model-%05d-of-%05d.safetensors" % (i + 1, len(groups))
            write_safetensors(os.path.join(a.out_dir, fn), group, a, progress)
            for _, name, _ in group:
                weight_map[name] = fn
        index = {"metadata": {"total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}
        write_json(os.path.join(a.out_dir, "model.safetensors.index.json"), index)
    return len(tensors), total, len(groups)


# ----------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------

def number(x):
    """Write integral floats as ints (HF configs say 256, not 256.0)."""
    return int(x) if float(x).is_integer() else x


def rope_scaling(a):
    if a.rope_scaling is None:
        return None
    return {"rope_type": "linear", "factor": float(a.rope_scaling)}


def layer_types(a):
    return ["full_attention" if is_global(i, a.pattern) else "sliding_attention"
            for i in range(a.layers)]


def text_config(a):
    """Full Gemma3TextConfig dict, key order as in the reference fixture."""
    c = {
        "vocab_size": a.vocab,
        "hidden_size": a.hidden,
        "intermediate_size": a.inter,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "query_pre_attn_scalar": number(a.qpas),
        "sliding_window": a.window,
    }
    if a.layer_types:
        c["layer_types"] = layer_types(a)
    else:
        c["sliding_window_pattern"] = a.pattern
    c.update({
        "rope_theta": float(a.rope_theta),
        "rope_local_base_freq": float(a.rope_local_base),
        "rope_scaling": rope_scaling(a),
        "max_position_embeddings": a.max_pos,
        "model_type": "gemma3_text",
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-06,
        "attention_bias": False,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
        "pad_token_id": 0,
    })
    return c


def sparse_text_config(a):
    """Only the keys the real 4B+ configs carry; the rest takes the defaults."""
    c = {}
    if a.vocab != DEFAULT_VOCAB:
        c["vocab_size"] = a.vocab
    c.update({
        "hidden_size": a.hidden,
        "intermediate_size": a.inter,
        "model_type": "gemma3_text",
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "query_pre_attn_scalar": number(a.qpas),
    })
    if a.rope_scaling is not None:
        c["rope_scaling"] = rope_scaling(a)
    c["sliding_window"] = a.window
    if a.layer_types:
        c["layer_types"] = layer_types(a)
    return c


def make_config(a):
    torch_dtype = DTYPES[a.dtype][2]
    if a.layout == "flat":
        c = text_config(a)
        c["torch_dtype"] = torch_dtype
        c["architectures"] = ["Gemma3ForCausalLM"]
        return c
    image_id, boi, eoi = a.image_tokens
    image, patch, vh, vinter, vlayers, vheads, mm_tokens = a.vision
    return {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "boi_token_index": boi,
        "eoi_token_index": eoi,
        "eos_token_id": [1, 106],
        "image_token_index": image_id,
        "initializer_range": 0.02,
        "mm_tokens_per_image": mm_tokens,
        "model_type": "gemma3",
        "text_config": sparse_text_config(a) if a.sparse_config else text_config(a),
        "torch_dtype": torch_dtype,
        "vision_config": {
            "hidden_size": vh,
            "image_size": image,
            "intermediate_size": vinter,
            "model_type": "siglip_vision_model",
            "num_attention_heads": vheads,
            "num_hidden_layers": vlayers,
            "patch_size": patch,
            "vision_use_head": False,
        },
    }


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)   # no trailing newline, like the fixture


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

def warn_sparse_defaults(a, explicit):
    """--sparse-config leaves these keys out; say so if the user set them."""
    defaults = {"pattern": 6, "max_pos": 131072, "rope_theta": 1e6, "rope_local_base": 1e4}
    ignored = [k for k, v in defaults.items() if getattr(a, k) != v and (
        k.startswith("rope") or (k in explicit and not (k == "pattern" and a.layer_types)))]
    if ignored:
        print("note: --sparse-config does not write %s; readers use the defaults %s"
              % (", ".join(ignored), {k: defaults[k] for k in ignored}), file=sys.stderr)


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Write a random Gemma 3 checkpoint in the Hugging Face layout.")
    p.add_argument("out_dir")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    for flag, dest in [("--vocab", "vocab"), ("--hidden", "hidden"), ("--inter", "inter"),
                       ("--layers", "layers"), ("--heads", "heads"),
                       ("--kv-heads", "kv_heads"), ("--head-dim", "head_dim"),
                       ("--window", "window"), ("--pattern", "pattern"),
                       ("--max-pos", "max_pos")]:
        p.add_argument(flag, dest=dest, type=int)
    p.add_argument("--qpas", type=float, help="query_pre_attn_scalar")
    p.add_argument("--rope-theta", type=float, default=1e6)
    p.add_argument("--rope-local-base", type=float, default=1e4)
    p.add_argument("--rope-scaling", type=float,
                   help='write rope_scaling {"rope_type": "linear", "factor": F}')
    p.add_argument("--layout", choices=["flat", "nested", "nested-new", "nested-v5"], default="flat")
    p.add_argument("--layer-types", action="store_true",
                   help="write layer_types instead of sliding_window_pattern")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--sparse-config", action="store_true",
                   help="nested layouts: write only the text_config keys real 4B+ configs have")
    p.add_argument("--tokenizer", help="tokenizer.json to copy into OUT_DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast-random", action="store_true",
                   help="fast table-driven generator for very large shapes")
    p.add_argument("--vision", type=int_list(7),
                   help="a real SigLIP tower: IMAGE,PATCH,HIDDEN,INTER,LAYERS,HEADS,MM_TOKENS")
    p.add_argument("--image-tokens", type=int_list(3),
                   help="IMAGE,BOI,EOI token ids (default 262144,255999,256000, or the vocabulary's last three)")
    a = p.parse_args(argv)

    explicit = {k for k in PRESETS[a.preset] if getattr(a, k) is not None}
    for k, v in PRESETS[a.preset].items():
        if k not in explicit:
            setattr(a, k, v)
    for k in ["vocab", "hidden", "inter", "layers", "heads", "kv_heads", "head_dim",
              "window", "pattern", "max_pos", "shards"]:
        if getattr(a, k) < 1:
            p.error("--%s must be >= 1" % k.replace("_", "-"))
    if a.heads % a.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    if a.qpas <= 0:
        p.error("--qpas must be > 0")
    if a.vision is not None and a.layout == "flat":
        p.error("--vision needs a nested layout")
    if a.layout != "flat":
        if a.vision is None:
            a.vision = list(DEFAULT_VISION)
        if a.image_tokens is None:
            a.image_tokens = [262144, 255999, 256000] if a.vocab > 262144 else [a.vocab - 1, a.vocab - 3, a.vocab - 2]
        image, patch, h, _, _, heads, mm = a.vision
        side = int(round(math.sqrt(mm)))
        if min(a.vision) < 1 or image % patch or h % heads or side * side != mm or (image // patch) % side:
            p.error("--vision: image_size must be a multiple of patch_size, hidden of heads, and "
                    "mm_tokens a square whose side divides image_size / patch_size")
    if a.sparse_config and a.layout == "flat":
        p.error("--sparse-config needs --layout nested or nested-new")
    if a.sparse_config:
        warn_sparse_defaults(a, explicit)
    return a


def int_list(n):
    def parse(text):
        v = [int(x) for x in text.split(",")]
        if len(v) != n:
            raise argparse.ArgumentTypeError("expected %d comma-separated integers" % n)
        return v
    return parse


def main(argv=None):
    a = parse_args(argv)
    t0 = time.time()
    os.makedirs(a.out_dir, exist_ok=True)
    write_json(os.path.join(a.out_dir, "config.json"), make_config(a))
    n_tensors, total, n_files = write_weights(a)
    if a.tokenizer:
        shutil.copyfile(a.tokenizer, os.path.join(a.out_dir, "tokenizer.json"))
    print("wrote %s: %s layout, %d tensors in %d file(s), %.1f MB %s, %s random, %.2f s"
          % (a.out_dir, a.layout, n_tensors, n_files, total / 1e6, a.dtype,
             "fast" if a.fast_random else "gauss", time.time() - t0))


if __name__ == "__main__":
    main()
