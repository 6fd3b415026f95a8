#!/usr/bin/env python3
"""Independent float32 numpy forward pass of a Gemma 3 GGUF file.

The weights are what llama.cpp's own Python reader dequantizes (the `gguf` package on PyPI,
pinned to 0.19.0 by tests/test_real.sh: gguf.GGUFReader + gguf.quants.dequantize), so this
shares no code with export.py or gemma3.c. The model follows the GGUF conventions (GEMMA3-NOTES
items 14-16): norms are stored as 1 + w and multiplied as they are; hyper-parameters come from
the `gemma3.*` metadata, with what llama.cpp (src/models/gemma3.cpp) assumes where a key is
absent: local RoPE base 10000 (`rope.freq_base_swa`), a global layer every 6th
(`attention.sliding_window_pattern`), and the attention scale 1/sqrt(head_dim), or
1/sqrt(n_embd / n_head) for the 27B shape (62 layers). The building blocks that do not depend
on the file format (RoPE, masks, softmax, GELU) come from tests/ref_forward.py, which
reproduces gemma_pytorch's golden logits.

    python3 tests/ref_gguf.py --self-check
    python3 tests/ref_gguf.py MODEL.gguf --info
    python3 tests/ref_gguf.py MODEL.gguf --tokens IDS.txt --out LOGITS.f32
        [--dump-hidden HIDDEN.f32] [--compare OTHER.f32 [--tol 1e-4]]
        [--compare-hidden OTHER_HIDDEN.f32]

  --self-check    writes tests/fixtures/tiny (the checkpoint whose golden logits come from
                  gemma_pytorch) as a GGUF the way llama.cpp's converter does (norms + 1, GGUF
                  names), runs it, and compares with the golden logits (bound 1e-5 of the
                  largest); the fixture's query_pre_attn_scalar (24, not head_dim) is set by hand
  --tokens FILE   whitespace-separated ids (include <bos> yourself), positions 0..T-1
  --out FILE      float32 logits, row-major [T][vocab] (the layout of gemma3 --logits)
  --dump-hidden   the residual stream after the embedding and after each layer,
                  [T][n_layers + 1][hidden] (the layout of gemma3 --dump-hidden)
  --compare FILE  logits of another engine, same layout: prints max|diff|, max|diff| over
                  max|logit|, and argmax agreement; exit status 1 unless max|diff| <= tol ×
                  max|logit| and every argmax is equal
  --compare-hidden FILE  prints, per layer, max|diff| of the residual stream over its max
                  (where two engines part, if they do)
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ref_forward import apply_rope, attention_mask, gelu_tanh, rope_tables, softmax  # noqa: E402

import gguf  # noqa: E402

F32 = np.float32


def field(reader, key, default=None):
    """The value of one metadata key (scalar, string or array), or default if absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def load_gguf(path):
    """Read a gemma3 GGUF: returns (cfg, weights, general), weights as float32 arrays in
    numpy's [rows][columns] order (GGUF lists dimensions the other way round)."""
    r = gguf.GGUFReader(path)
    arch = field(r, "general.architecture")
    if arch != "gemma3":
        raise ValueError(f"{path}: general.architecture is {arch!r}, not 'gemma3'")

    def g(key, default=None):
        v = field(r, "gemma3." + key, default)
        if v is None:
            raise ValueError(f"{path}: metadata gemma3.{key} missing")
        return v

    cfg = {
        "hidden": int(g("embedding_length")),
        "ff": int(g("feed_forward_length")),
        "n_layers": int(g("block_count")),
        "n_heads": int(g("attention.head_count")),
        "n_kv": int(g("attention.head_count_kv")),
        "eps": float(g("attention.layer_norm_rms_epsilon")),
        "rope_global": float(g("rope.freq_base")),
        "rope_local": float(g("rope.freq_base_swa", 10000.0)),   # llama.cpp's default
        "window": int(g("attention.sliding_window")),
        "context": int(g("context_length")),
    }
    cfg["head_dim"] = int(g("attention.key_length", cfg["hidden"] // cfg["n_heads"]))
    if int(g("attention.value_length", cfg["head_dim"])) != cfg["head_dim"]:
        raise ValueError(f"{path}: key_length != value_length")
    factor = 1.0
    if field(r, "gemma3.rope.scaling.type") == "linear":
        factor = float(g("rope.scaling.factor"))
    cfg["rope_factor"] = factor
    pattern = int(field(r, "gemma3.attention.sliding_window_pattern", 6))
    cfg["is_global"] = [(i + 1) % pattern == 0 for i in range(cfg["n_layers"])]
    # llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA3): 27B is 62 layers; it scales by
    # 1/sqrt(n_embd / n_head), every other size by 1/sqrt(head_dim)
    if cfg["n_layers"] == 62:
        cfg["attn_scale"] = (cfg["hidden"] // cfg["n_heads"]) ** -0.5
    else:
        cfg["attn_scale"] = cfg["head_dim"] ** -0.5

    weights = {}
    for t in r.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(n) for n in reversed(t.shape))
        weights[t.name] = np.ascontiguousarray(arr, dtype=F32).reshape(shape)
    cfg["vocab"] = weights["token_embd.weight"].shape[0]
    check_shapes(cfg, weights)

    general = {k: field(r, k) for k in r.fields if k.startswith("general.")}
    general["chat_template present"] = "tokenizer.chat_template" in r.fields
    general["tensor types"] = sorted({t.tensor_type.name for t in r.tensors})
    return cfg, weights, general


def check_shapes(cfg, w):
    d, ff, hd = cfg["hidden"], cfg["ff"], cfg["head_dim"]
    nh, nkv = cfg["n_heads"], cfg["n_kv"]
    want = {"token_embd.weight": (cfg["vocab"], d), "output_norm.weight": (d,)}
    for i in range(cfg["n_layers"]):
        p = f"blk.{i}."
        for n in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            want[p + n + ".weight"] = (d,)
        want.update({
            p + "attn_q.weight": (nh * hd, d), p + "attn_k.weight": (nkv * hd, d),
            p + "attn_v.weight": (nkv * hd, d), p + "attn_output.weight": (d, nh * hd),
            p + "attn_q_norm.weight": (hd,), p + "attn_k_norm.weight": (hd,),
            p + "ffn_gate.weight": (ff, d), p + "ffn_up.weight": (ff, d),
            p + "ffn_down.weight": (d, ff),
        })
    if "output.weight" in w:
        want["output.weight"] = (w["output.weight"].shape[0], d)
    for name, shape in want.items():
        if name not in w:
            raise ValueError(f"missing tensor {name}")
        if w[name].shape != shape:
            raise ValueError(f"tensor {name} has shape {w[name].shape}, expected {shape}")


def norm(x, stored, eps):
    """Gemma RMSNorm with the GGUF's stored scale (already 1 + w): x · rsqrt(mean(x²) + eps) · s."""
    mean_sq = np.mean(x * x, axis=-1, keepdims=True, dtype=F32)
    return (x * (F32(1.0) / np.sqrt(mean_sq + F32(eps)))) * stored


def forward(tokens, cfg, w, hidden_out=None):
    """Causal forward of tokens at positions 0..T-1; float32 logits [T][vocab]. If
    hidden_out is a list, the residual stream after the embedding and each layer is
    appended to it."""
    T = len(tokens)
    d, hd, nh, nkv, eps = cfg["hidden"], cfg["head_dim"], cfg["n_heads"], cfg["n_kv"], cfg["eps"]
    pos = np.arange(T)
    ropes = {False: rope_tables(pos, hd, cfg["rope_local"], 1.0),
             True: rope_tables(pos, hd, cfg["rope_global"], cfg["rope_factor"])}
    masks = {False: attention_mask(pos, T, cfg["window"]), True: attention_mask(pos, T, None)}

    embed = w["token_embd.weight"]
    x = embed[np.asarray(tokens)] * F32(np.sqrt(F32(d), dtype=F32))
    if hidden_out is not None:
        hidden_out.append(x)
    for i in range(cfg["n_layers"]):
        p = f"blk.{i}."
        glob = cfg["is_global"][i]
        h = norm(x, w[p + "attn_norm.weight"], eps)
        q = (h @ w[p + "attn_q.weight"].T).reshape(T, nh, hd).transpose(1, 0, 2)
        k = (h @ w[p + "attn_k.weight"].T).reshape(T, nkv, hd).transpose(1, 0, 2)
        v = (h @ w[p + "attn_v.weight"].T).reshape(T, nkv, hd).transpose(1, 0, 2)
        q = apply_rope(norm(q, w[p + "attn_q_norm.weight"], eps), *ropes[glob])
        k = apply_rope(norm(k, w[p + "attn_k_norm.weight"], eps), *ropes[glob])
        k = np.repeat(k, nh // nkv, axis=0)      # query head h uses kv head h / (nh / nkv)
        v = np.repeat(v, nh // nkv, axis=0)
        scores = (q * F32(cfg["attn_scale"])) @ k.transpose(0, 2, 1)
        scores = np.where(masks[glob][None], scores, F32(-np.inf))
        a = (softmax(scores) @ v).transpose(1, 0, 2).reshape(T, nh * hd)
        x = x + norm(a @ w[p + "attn_output.weight"].T, w[p + "post_attention_norm.weight"], eps)
        h = norm(x, w[p + "ffn_norm.weight"], eps)
        m = gelu_tanh(h @ w[p + "ffn_gate.weight"].T) * (h @ w[p + "ffn_up.weight"].T)
        x = x + norm(m @ w[p + "ffn_down.weight"].T, w[p + "post_ffw_norm.weight"], eps)
        if hidden_out is not None:
            hidden_out.append(x)
    x = norm(x, w["output_norm.weight"], eps)
    return x @ w.get("output.weight", embed).T


def compare(ours, path, tol):
    """Prints the comparison with another engine's logits; true if within tol of the largest."""
    other = np.fromfile(path, dtype="<f4")
    if other.size != ours.size:
        print(f"compare: {path} has {other.size} floats, expected {ours.shape}")
        return False
    other = other.reshape(ours.shape)
    diff = np.abs(ours.astype(np.float64) - other)
    scale = float(np.max(np.abs(ours)))
    worst = float(diff.max())
    equal = int(np.sum(np.argmax(ours, -1) == np.argmax(other, -1)))
    ok = worst <= tol * scale and equal == ours.shape[0]
    print(f"compare {path}: max|diff| {worst:.3g} = {worst / scale:.2g} of max|logit| "
          f"{scale:.4g} (bound {tol:g}); argmax equal {equal}/{ours.shape[0]}; "
          f"worst position {int(diff.max(axis=1).argmax())}: {'ok' if ok else 'FAIL'}")
    return ok


def compare_hidden(ours, path):
    other = np.fromfile(path, dtype="<f4")
    if other.size != ours.size:
        print(f"compare-hidden: {path} has {other.size} floats, expected {ours.shape}")
        return
    other = other.reshape(ours.shape)
    for layer in range(ours.shape[1]):
        a, b = ours[:, layer], other[:, layer]
        rel = float(np.max(np.abs(a.astype(np.float64) - b))) / float(np.max(np.abs(a)))
        name = "embedding" if layer == 0 else f"layer {layer - 1}"
        print(f"  hidden after {name:>9}: max|diff| / max|x| = {rel:.2g}")


HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def self_check():
    """The golden fixture through a GGUF written with gguf-py; true if it matches."""
    import tempfile
    import ref_forward
    fixture = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tiny")
    hf = ref_forward.load_text_weights(fixture)
    c = ref_forward.load_config(fixture, hf["embed_tokens.weight"].shape[0])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tiny.gguf")
        wr = gguf.GGUFWriter(path, "gemma3")
        wr.add_context_length(c["max_position_embeddings"])
        wr.add_embedding_length(c["hidden_size"])
        wr.add_block_count(c["num_hidden_layers"])
        wr.add_feed_forward_length(c["intermediate_size"])
        wr.add_head_count(c["num_attention_heads"])
        wr.add_head_count_kv(c["num_key_value_heads"])
        wr.add_key_length(c["head_dim"])
        wr.add_value_length(c["head_dim"])
        wr.add_layer_norm_rms_eps(c["rms_norm_eps"])
        wr.add_rope_freq_base(c["rope_theta"])
        wr.add_sliding_window(c["sliding_window"])
        for name, arr in hf.items():
            if name == "embed_tokens.weight":
                gname = "token_embd.weight"
            elif name == "norm.weight":
                gname = "output_norm.weight"
            else:                                  # layers.N.<module>.weight
                parts = name.split(".")
                gname = f"blk.{parts[1]}.{HF_TO_GGUF['.'.join(parts[2:-1])]}.weight"
            if name.endswith("norm.weight"):
                arr = arr + F32(1.0)
            wr.add_tensor(gname, arr.astype(F32))
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_tensors_to_file()
        wr.close()
        cfg, w, _ = load_gguf(path)
    cfg["attn_scale"] = float(c["query_pre_attn_scalar"]) ** -0.5
    with open(os.path.join(fixture, "tokens.txt")) as f:
        tokens = [int(t) for t in f.read().split()]
    logits = forward(tokens, cfg, w)
    golden = np.fromfile(os.path.join(fixture, "logits.f32"), dtype="<f4").reshape(logits.shape)
    worst = float(np.abs(logits - golden).max())
    scale = float(np.abs(golden).max())
    equal = int(np.sum(logits.argmax(-1) == golden.argmax(-1)))
    ok = worst <= 1e-5 * scale and equal == len(tokens)
    print(f"self-check: fixtures/tiny as GGUF vs gemma_pytorch: max|diff| {worst:.3g} = "
          f"{worst / scale:.2g} of max|logit|, argmax equal {equal}/{len(tokens)}: "
          f"{'ok' if ok else 'FAIL'}")
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf_file", nargs="?")
    ap.add_argument("--self-check", action="store_true")
    ap.add_argument("--info", action="store_true")
    ap.add_argument("--tokens")
    ap.add_argument("--out")
    ap.add_argument("--dump-hidden")
    ap.add_argument("--compare")
    ap.add_argument("--compare-hidden")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args(argv)
    if args.self_check:
        return 0 if self_check() else 1
    if not args.gguf_file:
        ap.error("a GGUF file is needed")

    cfg, w, general = load_gguf(args.gguf_file)
    if args.info:
        for k, v in general.items():
            print(f"{k} = {v}")
        kinds = "".join("G" if g else "L" for g in cfg["is_global"])
        print(f"config: vocab {cfg['vocab']} hidden {cfg['hidden']} ff {cfg['ff']} heads "
              f"{cfg['n_heads']}/{cfg['n_kv']}x{cfg['head_dim']} layers {kinds} window "
              f"{cfg['window']} rope {cfg['rope_local']:g}/{cfg['rope_global']:g} "
              f"factor {cfg['rope_factor']:g} scale {cfg['attn_scale']:.6g}")
    if not args.tokens:
        return 0
    with open(args.tokens) as f:
        tokens = [int(t) for t in f.read().split()]
    if not tokens or not all(0 <= t < cfg["vocab"] for t in tokens):
        raise SystemExit(f"{args.tokens}: no ids, or ids outside [0, {cfg['vocab']})")
    hidden = [] if (args.dump_hidden or args.compare_hidden) else None
    logits = forward(tokens, cfg, w, hidden)
    if args.out:
        logits.astype("<f4").tofile(args.out)
    if hidden is not None:
        hidden = np.stack(hidden, axis=1).astype("<f4")       # [T][n_layers + 1][hidden]
        if args.dump_hidden:
            hidden.tofile(args.dump_hidden)
        if args.compare_hidden:
            compare_hidden(hidden, args.compare_hidden)
    if args.compare and not compare(logits, args.compare, args.tol):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
