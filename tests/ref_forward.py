#!/usr/bin/python3
"""Independent numpy float32 reference forward pass for Gemma 3 text models.

Purpose
-------
The C engine is checked against golden logits produced by Google's
gemma_pytorch for one tiny checkpoint (/work/shared/fixtures/tiny).  For any
other checkpoint (other shapes, nested or sharded Hugging Face layouts, long
prompts, linear rope scaling) there is no torch available, so this script
computes the expected logits instead.  It reads a Hugging Face checkpoint
directory directly (config.json + model.safetensors or a sharded
model.safetensors.index.json), parses safetensors itself (BF16 / F16 / F32),
and runs the model in float32 following gemma_pytorch's semantics (see
/work/shared/GEMMA3-NOTES.md).  Before trusting it on new checkpoints it must
reproduce /work/shared/fixtures/tiny/logits.f32.

Run it with Debian's /usr/bin/python3 (which has numpy).

CLI
---
    /usr/bin/python3 tests/ref_forward.py HF_DIR --tokens TOKENS.txt --out LOGITS.f32
        [--greedy N --greedy-out IDS.txt] [--compare REF.f32]

  HF_DIR            checkpoint directory (config.json + safetensors)
  --tokens FILE     whitespace-separated token ids (include <bos> yourself)
  --out FILE        little-endian float32 logits, row-major [T][vocab], from
                    one causal pass over all T tokens at positions 0..T-1
  --greedy N        greedily decode N more tokens after the prompt (argmax,
                    float32 KV cache continuing the logits pass, one token
                    per step)
  --greedy-out FILE write the N decoded ids, space separated
  --compare REF     print max |diff| against REF (same layout as --out) and
                    per-row argmax agreement; exit status 1 if max |diff| > 1e-3
  --untied          the classifier is the stored lm_head.weight, not the embedding
                    (as mlx_lm and mlx-vlm compute the logits when one is stored)
"""

import argparse
import json
import os
import struct
import sys

import numpy as np

F32 = np.float32
COMPARE_TOLERANCE = 1e-3

# transformers' Gemma3TextConfig defaults, used for keys absent from config.json
# (the real 4B/12B/27B configs list only a handful of text_config keys).
TEXT_CONFIG_DEFAULTS = {
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "rope_scaling": None,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "layer_types": None,
}

# Prefixes under which the text decoder's tensors are stored, most specific first.
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
SKIPPED_MARKERS = ("vision_tower", "multi_modal_projector")


# --------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------

def read_safetensors(path, wanted):
    """Return {name: float32 ndarray} for the tensors of one safetensors file
    for which wanted(name) is true.  BF16 is widened exactly by placing the 16
    bits in the high half of a float32; F16 and F32 are converted by numpy."""
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    data_start = 8 + header_len
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__" or not wanted(name):
            continue
        begin, end = info["data_offsets"]
        blob = raw[data_start + begin:data_start + end]
        shape = tuple(info["shape"])
        dtype = info["dtype"]
        if dtype == "BF16":
            bits = blob.view("<u2").astype(np.uint32) << 16
            arr = bits.view(F32)
        elif dtype == "F16":
            arr = blob.view("<f2").astype(F32)
        elif dtype == "F32":
            arr = np.array(blob.view("<f4"), dtype=F32)
        else:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        tensors[name] = arr.reshape(shape)
    return tensors


def checkpoint_files(hf_dir):
    """List the safetensors files of a checkpoint: single or sharded."""
    index_path = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(hf_dir, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def text_tensor_name(name):
    """Map a checkpoint tensor name to its decoder-relative name
    ("embed_tokens.weight", "layers.3.mlp.up_proj.weight", ...), or None for
    tensors that are not part of the text decoder (vision tower, projector,
    a stored lm_head: Gemma 3 ties the classifier to the embedding)."""
    if any(marker in name for marker in SKIPPED_MARKERS):
        return None
    for prefix in TEXT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def load_text_weights(hf_dir):
    """Load every text-decoder tensor of the checkpoint, keyed by decoder-relative name."""
    weights = {}
    for path in checkpoint_files(hf_dir):
        loaded = read_safetensors(path, lambda n: text_tensor_name(n) is not None)
        for name, arr in loaded.items():
            short = text_tensor_name(name)
            if short in weights:
                raise ValueError(f"tensor {short} appears twice in the checkpoint")
            weights[short] = arr
    if "embed_tokens.weight" not in weights:
        raise ValueError(f"{hf_dir}: no embed_tokens.weight found under {TEXT_PREFIXES}")
    return weights


def load_classifier(hf_dir):
    """The stored classifier, lm_head.weight (language_model.lm_head.weight in the
    multimodal layout), for --untied: MLX computes the logits with it where it is stored."""
    names = ("lm_head.weight", "language_model.lm_head.weight")
    for path in checkpoint_files(hf_dir):
        loaded = read_safetensors(path, lambda n: n in names)
        if loaded:
            return next(iter(loaded.values()))
    raise ValueError(f"{hf_dir}: --untied, but there is no {' or '.join(names)}")


def load_config(hf_dir, vocab_size):
    """Read config.json (flat or nested under text_config), fill in the
    Gemma3TextConfig defaults and resolve per-layer attention types and the
    linear rope factor.  vocab_size comes from the embedding tensor."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        raw = json.load(f)
    text = raw.get("text_config") or raw
    cfg = dict(TEXT_CONFIG_DEFAULTS)
    cfg.update({k: v for k, v in text.items() if v is not None or k == "rope_scaling"})
    if "sliding_window_pattern" not in text and "_sliding_window_pattern" in text:
        cfg["sliding_window_pattern"] = text["_sliding_window_pattern"]
    cfg["vocab_size"] = vocab_size

    n_layers = cfg["num_hidden_layers"]
    if cfg.get("layer_types"):
        layer_types = list(cfg["layer_types"])
        if len(layer_types) != n_layers:
            raise ValueError("layer_types length does not match num_hidden_layers")
        for t in layer_types:
            if t not in ("sliding_attention", "full_attention"):
                raise ValueError(f"unknown layer type {t!r}")
        cfg["is_global"] = [t == "full_attention" for t in layer_types]
    else:
        pattern = cfg["sliding_window_pattern"]
        cfg["is_global"] = [(i + 1) % pattern == 0 for i in range(n_layers)]

    scaling = cfg.get("rope_scaling")
    factor = 1.0
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            factor = float(scaling["factor"])
        elif kind != "default":
            raise ValueError(f"unsupported rope_scaling {scaling}")
    cfg["rope_factor"] = factor
    return cfg


def transpose_projections(weights):
    """Replace every [out, in] projection "..._proj.weight" by a contiguous
    [in, out] copy named "..._proj.weight_t": with Debian's reference BLAS,
    x @ W_t is markedly faster than x @ W.T.  The embedding is left as is."""
    out = {}
    for name, arr in weights.items():
        if name.endswith("_proj.weight"):
            out[name + "_t"] = np.ascontiguousarray(arr.T)
        else:
            out[name] = arr
    return out


def check_shapes(cfg, weights):
    """Fail early, with a clear message, on a config/tensor mismatch."""
    d, ff = cfg["hidden_size"], cfg["intermediate_size"]
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    expected = {"embed_tokens.weight": (cfg["vocab_size"], d), "norm.weight": (d,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        expected.update({
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "pre_feedforward_layernorm.weight": (d,),
            p + "post_feedforward_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (nh * hd, d),
            p + "self_attn.k_proj.weight": (nkv * hd, d),
            p + "self_attn.v_proj.weight": (nkv * hd, d),
            p + "self_attn.o_proj.weight": (d, nh * hd),
            p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (ff, d),
            p + "mlp.up_proj.weight": (ff, d),
            p + "mlp.down_proj.weight": (d, ff),
        })
    for name, shape in expected.items():
        if name not in weights:
            raise ValueError(f"missing tensor {name}")
        if weights[name].shape != shape:
            raise ValueError(f"tensor {name} has shape {weights[name].shape}, expected {shape}")
    if nh % nkv != 0:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    unused = sorted(set(weights) - set(expected))
    if any(name.startswith("layers.") for name in unused):
        raise ValueError(f"checkpoint has layer tensors beyond the config: {unused[:5]}")
    if unused:
        print(f"warning: ignoring {len(unused)} unexpected tensors: {unused[:5]}",
              file=sys.stderr)


def load_model(hf_dir):
    """Load config and text-decoder weights of a Hugging Face checkpoint
    directory, check them against each other and prepare them for forward()."""
    weights = load_text_weights(hf_dir)
    cfg = load_config(hf_dir, weights["embed_tokens.weight"].shape[0])
    check_shapes(cfg, weights)
    return cfg, transpose_projections(weights)


# --------------------------------------------------------------------------
# Model pieces (all float32)
# --------------------------------------------------------------------------

def rms_norm(x, weight, eps):
    """Gemma RMSNorm over the last axis: x * rsqrt(mean(x^2) + eps) * (1 + w)."""
    mean_sq = np.mean(x * x, axis=-1, keepdims=True, dtype=F32)
    inv_rms = F32(1.0) / np.sqrt(mean_sq + F32(eps))
    return (x * inv_rms) * (F32(1.0) + weight)


def linear(x, weight_t):
    """y = x @ W^T, given W^T as a contiguous [in, out] matrix (see load_model)."""
    return x @ weight_t


def rope_tables(positions, head_dim, base, factor):
    """cos/sin tables [len(positions), head_dim/2]: inv_freq = 1/base^(2k/hd) / factor,
    angle = pos * inv_freq, everything in float32 as gemma_pytorch does."""
    exponents = np.arange(0, head_dim, 2, dtype=F32) / F32(head_dim)
    inv_freq = F32(1.0) / (F32(base) ** exponents)
    inv_freq = inv_freq / F32(factor)
    angles = np.outer(np.asarray(positions, dtype=F32), inv_freq).astype(F32)
    return np.cos(angles), np.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on [heads, T, head_dim]: pairs (k, k + head_dim/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate((x1 * cos - x2 * sin, x1 * sin + x2 * cos), axis=-1)


def attention_mask(q_positions, n_keys, window):
    """Boolean [n_queries, n_keys] mask over key positions 0..n_keys-1: query at
    position i sees key j iff j <= i and (window is None or j > i - window)."""
    i = np.asarray(q_positions)[:, None]
    j = np.arange(n_keys)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    return allowed


def softmax(scores):
    """Float32 softmax over the last axis; fully masked entries hold -inf."""
    scores = scores - np.max(scores, axis=-1, keepdims=True)
    e = np.exp(scores)
    return e / np.sum(e, axis=-1, keepdims=True, dtype=F32)


def self_attention(h, cfg, w, prefix, rope, mask, kv_cache):
    """Gemma 3 attention sub-block on normed input h [T, d] (up to o_proj; the
    output norm is applied by the caller): project, per-head q/k norm, RoPE,
    scaled GQA causal attention.  kv_cache is a per-layer dict holding the
    float32 keys (after norm + RoPE) and values of earlier positions; the new
    ones are appended to it."""
    n_pos = h.shape[0]
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    eps = cfg["rms_norm_eps"]
    q = linear(h, w[prefix + "q_proj.weight_t"]).reshape(n_pos, nh, hd).transpose(1, 0, 2)
    k = linear(h, w[prefix + "k_proj.weight_t"]).reshape(n_pos, nkv, hd).transpose(1, 0, 2)
    v = linear(h, w[prefix + "v_proj.weight_t"]).reshape(n_pos, nkv, hd).transpose(1, 0, 2)

    q = rms_norm(q, w[prefix + "q_norm.weight"], eps)
    k = rms_norm(k, w[prefix + "k_norm.weight"], eps)
    cos, sin = rope
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)

    if "k" in kv_cache:
        k = np.concatenate((kv_cache["k"], k), axis=1)
        v = np.concatenate((kv_cache["v"], v), axis=1)
    kv_cache["k"], kv_cache["v"] = k, v

    group = nh // nkv
    k = np.repeat(k, group, axis=0)          # query head h -> kv head h // group
    v = np.repeat(v, group, axis=0)

    q = q * F32(float(cfg["query_pre_attn_scalar"]) ** -0.5)
    scores = q @ k.transpose(0, 2, 1)        # [nh, T, n_keys]
    scores = np.where(mask[None, :, :], scores, F32(-np.inf))
    probs = softmax(scores)
    out = probs @ v                          # [nh, T, hd]
    out = out.transpose(1, 0, 2).reshape(n_pos, nh * hd)
    return linear(out, w[prefix + "o_proj.weight_t"])


def gelu_tanh(x):
    """GELU, tanh approximation (gelu_pytorch_tanh)."""
    c = F32(np.sqrt(2.0 / np.pi))
    return F32(0.5) * x * (F32(1.0) + np.tanh(c * (x + F32(0.044715) * x * x * x)))


def mlp(h, w, prefix):
    """Gated GELU feed-forward: down(gelu_tanh(gate(h)) * up(h))."""
    gate = gelu_tanh(linear(h, w[prefix + "gate_proj.weight_t"]))
    up = linear(h, w[prefix + "up_proj.weight_t"])
    return linear(gate * up, w[prefix + "down_proj.weight_t"])


def decoder_layer(x, cfg, w, layer, rope, mask, kv_cache):
    """One Gemma 3 block with its four norms (sandwich norms around attention and MLP)."""
    p = f"layers.{layer}."
    eps = cfg["rms_norm_eps"]
    h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
    a = self_attention(h, cfg, w, p + "self_attn.", rope, mask, kv_cache)
    x = x + rms_norm(a, w[p + "post_attention_layernorm.weight"], eps)
    h = rms_norm(x, w[p + "pre_feedforward_layernorm.weight"], eps)
    m = mlp(h, w, p + "mlp.")
    return x + rms_norm(m, w[p + "post_feedforward_layernorm.weight"], eps)


def new_cache(cfg):
    """Empty KV cache: one dict per layer, filled by self_attention."""
    return [{} for _ in range(cfg["num_hidden_layers"])]


def cache_length(cache):
    """Number of positions already held by a KV cache."""
    return cache[0]["k"].shape[1] if cache and "k" in cache[0] else 0


def forward(tokens, cfg, w, cache=None, last_only=False):
    """Causal forward of tokens placed at positions P..P+T-1, where P is the
    number of positions already in cache (0 without a cache).  Returns float32
    logits [T, vocab] (or [1, vocab] for the last position when last_only).
    The cache, if given, is extended with this call's keys and values."""
    if cache is None:
        cache = new_cache(cfg)
    tokens = np.asarray(tokens, dtype=np.int64)
    start = cache_length(cache)
    positions = np.arange(start, start + len(tokens))
    n_keys = start + len(tokens)

    embed = w["embed_tokens.weight"]
    normalizer = F32(np.sqrt(F32(cfg["hidden_size"]), dtype=F32))
    x = embed[tokens] * normalizer

    hd = cfg["head_dim"]
    local_rope = rope_tables(positions, hd, cfg["rope_local_base_freq"], 1.0)
    global_rope = rope_tables(positions, hd, cfg["rope_theta"], cfg["rope_factor"])
    local_mask = attention_mask(positions, n_keys, cfg["sliding_window"])
    global_mask = attention_mask(positions, n_keys, None)

    for layer in range(cfg["num_hidden_layers"]):
        if cfg["is_global"][layer]:
            rope, mask = global_rope, global_mask
        else:
            rope, mask = local_rope, local_mask
        x = decoder_layer(x, cfg, w, layer, rope, mask, cache[layer])

    if last_only:
        x = x[-1:]
    x = rms_norm(x, w["norm.weight"], cfg["rms_norm_eps"])
    return x @ w.get("lm_head.weight", embed).T  # tied classifier, unscaled table (--untied: lm_head)


def greedy_decode(last_logits, n_new, cfg, w, cache):
    """Argmax-decode n_new tokens continuing a prefill: last_logits is the
    prompt's final logits row and cache the KV cache that prefill filled;
    each chosen token is fed back one position at a time."""
    logits = last_logits[None, :]
    new = []
    for step in range(n_new):
        nxt = int(np.argmax(logits[-1]))
        new.append(nxt)
        if step + 1 < n_new:
            logits = forward([nxt], cfg, w, cache)
    return new


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

def read_tokens(path, vocab_size):
    """Whitespace-separated ids, checked against the vocabulary size."""
    with open(path) as f:
        ids = [int(t) for t in f.read().split()]
    if not ids:
        raise ValueError(f"{path}: no tokens")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{path}: token ids out of range [0, {vocab_size}): {bad[:5]}")
    return ids


def compare(logits, ref_path):
    """Print max |diff| and argmax agreement against a reference file; return max |diff|."""
    ref = np.fromfile(ref_path, dtype="<f4")
    if ref.size != logits.size:
        print(f"compare: size mismatch: ours {logits.shape} ({logits.size} floats), "
              f"{ref_path} has {ref.size} floats")
        return float("inf")
    ref = ref.reshape(logits.shape)
    max_abs = float(np.max(np.abs(logits.astype(np.float64) - ref.astype(np.float64))))
    max_ref = float(np.max(np.abs(ref)))
    rows_equal = int(np.sum(np.argmax(logits, axis=-1) == np.argmax(ref, axis=-1)))
    print(f"compare vs {ref_path}: max_abs_diff={max_abs:.6g} "
          f"(|ref|max={max_ref:.6g}, rel={max_abs / max(max_ref, 1e-30):.3g}) "
          f"argmax rows equal {rows_equal}/{logits.shape[0]}")
    return max_abs


def describe(cfg, n_tokens):
    """One line summarising the resolved configuration (L = sliding, G = global layer)."""
    kinds = "".join("G" if g else "L" for g in cfg["is_global"])
    print(f"ref_forward: T={n_tokens} vocab={cfg['vocab_size']} d={cfg['hidden_size']} "
          f"ff={cfg['intermediate_size']} heads={cfg['num_attention_heads']}/"
          f"{cfg['num_key_value_heads']}x{cfg['head_dim']} layers={kinds} "
          f"window={cfg['sliding_window']} qpas={cfg['query_pre_attn_scalar']} "
          f"rope={cfg['rope_local_base_freq']:g}/{cfg['rope_theta']:g} "
          f"factor={cfg['rope_factor']:g}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("hf_dir")
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--greedy", type=int, default=0)
    ap.add_argument("--greedy-out")
    ap.add_argument("--compare")
    ap.add_argument("--untied", action="store_true")
    args = ap.parse_args(argv)

    cfg, weights = load_model(args.hf_dir)
    if args.untied:
        weights["lm_head.weight"] = load_classifier(args.hf_dir)
    tokens = read_tokens(args.tokens, cfg["vocab_size"])
    describe(cfg, len(tokens))

    cache = new_cache(cfg)
    logits = forward(tokens, cfg, weights, cache)
    assert logits.dtype == F32, logits.dtype
    logits.astype("<f4").tofile(args.out)
    print(f"wrote {args.out}: [{logits.shape[0]}][{logits.shape[1]}] float32, "
          f"|logits|max={float(np.max(np.abs(logits))):.6g}")

    if args.greedy > 0:
        ids = greedy_decode(logits[-1], args.greedy, cfg, weights, cache)
        text = " ".join(str(t) for t in ids)
        print(f"greedy: {text}")
        if args.greedy_out:
            with open(args.greedy_out, "w") as f:
                f.write(text + "\n")

    if args.compare:
        if compare(logits, args.compare) > COMPARE_TOLERANCE:
            print(f"FAIL: max abs diff exceeds {COMPARE_TOLERANCE}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
