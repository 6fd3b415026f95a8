#!/usr/bin/env python3
"""Export a Gemma 3 checkpoint (Hugging Face or MLX directory, or GGUF file) to the flat gemma3.c model file.

    python3 export.py HF_DIR|MLX_DIR OUT.bin [--dtype f32|bf16|q8_0|q4_0] [--text-only] [--force]
    python3 export.py MODEL.gguf OUT.bin [--dtype f32|bf16|q8_0|q4_0|gguf] [--mmproj MMPROJ.gguf] [--force]

HF_DIR holds config.json, model.safetensors (or model-*-of-*.safetensors plus
model.safetensors.index.json) and, optionally, tokenizer.json. Both the text-only
layout (Gemma3ForCausalLM: 270M, 1B) and the multimodal one
(Gemma3ForConditionalGeneration: 4B, 12B, 27B, config under "text_config") are read;
the latter's SigLIP vision tower and projector are kept (--text-only leaves them out). The output format is described in FORMAT.md: a header with
every hyper-parameter, the tokenizer, a tensor directory, then 64-byte aligned tensors,
all little-endian.

MLX_DIR is a directory as Apple's `mlx_lm convert` (or `mlx_vlm.convert`) writes it: an
HF_DIR whose config.json may name a `quantization` (mode affine: 1 to 8 bits but 7, groups
of 32, 64 or 128; or mxfp4, nvfp4, mxfp8; and per-module entries, as the mixed recipes
write), with each quantized matrix (the embedding too) a packed uint32 `weight` beside its
`scales` (and, affine, `biases`). tools/mlx_dequant (C, built with make when needed)
unpacks them to the float32 values MLX's quantized matmul computes with (affine: scale * q
+ bias in float32); --dtype f32 keeps those. A stored lm_head (mlx-vlm keeps one), which
MLX computes the logits with, becomes lm_head.weight where it holds other values than the
embedding.

MODEL.gguf is a GGUF file (version 2 or 3) of architecture gemma3, as llama.cpp's
converter and Ollama write them (Ollama keeps them as ~/.ollama/models/blobs/sha256-*).
Its tensors may be of any type gguf-py dequantizes (F32, F16, BF16, Q4_0 ... Q8_0, Q2_K ...
Q6_K, IQ1_S ... IQ4_XS, TQ1_0, TQ2_0, MXFP4, NVFP4), each tensor its own:
tools/gguf_dequant (C, built with make when needed) turns them into exactly the float32
values of gguf-py's gguf.quants.dequantize; --dtype f32 keeps those, the other types
convert from them, and --dtype gguf copies each matrix's blocks as
they are (gemma3 multiplies them in their own type; FORMAT.md). The norms, stored as 1 + w, become w again;
the tokenizer is rebuilt from tokenizer.ggml.* (BPE merges derived from the
SentencePiece scores, as Hugging Face derives tokenizer.json's). Vision tensors (v.*,
mm.*) in the model file are skipped; --mmproj MMPROJ.gguf reads the vision tower and
projector from llama.cpp's separate mmproj file of a Gemma 3 4B+ model.

Standard library only. Tensors are streamed one at a time, so memory stays at the size
of the largest tensor, whatever the model size. The quantized types (q8_0, q4_0) are
made by the C engine itself (`gemma3 --quantize`, built with make if needed) from an
intermediate bf16 export (f32 if any source tensor is not bf16, and always for GGUF),
so they need no numpy. The output is written under a temporary name beside it and
renamed at the end (see class Output): a failed or interrupted export (SIGINT, SIGTERM,
SIGHUP: exit 128 + signal) leaves neither OUT.bin nor a temporary file. Inputs, the
program's own files and files that are not gemma3.c models (unless --force) are never
replaced.

Every value read from the input is checked where it enters (check_config for the
hyper-parameters, against what gemma3's loader accepts; the safetensors, index, GGUF and
tokenizer readers for their own fields): a bad input is one line naming the key or field,
exit status 1, before any work. tests/fuzz_export.py fuzzes these readers.
"""
import argparse
import array
import fcntl
import json
import math
import mmap
import os
import re
import signal
import stat
import struct
import subprocess
import sys
import time

FORMAT_VERSION = 2
MAGIC = b"GM3C"
HEADER_SIZE = 128
DIR_ENTRY_SIZE = 104
ALIGN = 64

DTYPE_F32, DTYPE_BF16 = 0, 1
DTYPE_CODES = {"f32": DTYPE_F32, "bf16": DTYPE_BF16}
ELEM_SIZE = {DTYPE_F32: 4, DTYPE_BF16: 2}
# --dtype gguf keeps a GGUF's blocks: ggml type t becomes dtype DTYPE_GGML + t (FORMAT.md),
# except F32 and BF16, whose rows are the same bytes as our f32 and bf16.
DTYPE_GGML = 256

# Defaults of transformers' Gemma3TextConfig: the real 4B/12B/27B config.json files list
# only a few keys, and every absent key means this value (GEMMA3-NOTES item 13).
TEXT_CONFIG_DEFAULTS = {
    "vocab_size": 262208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": None,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "layer_types": None,
    "attention_bias": False,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
}

# Prefixes under which the text model's tensors live, by checkpoint flavour.
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
# Tensors of the vision half of the multimodal checkpoints: not ours, skipped.
SKIP_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                 "model.multi_modal_projector.")

LAYER_TENSORS = [  # (name inside layers.N, shape as a function of the config)
    ("input_layernorm.weight", lambda c: [c["hidden_size"]]),
    ("self_attn.q_proj.weight", lambda c: [c["num_attention_heads"] * c["head_dim"], c["hidden_size"]]),
    ("self_attn.k_proj.weight", lambda c: [c["num_key_value_heads"] * c["head_dim"], c["hidden_size"]]),
    ("self_attn.v_proj.weight", lambda c: [c["num_key_value_heads"] * c["head_dim"], c["hidden_size"]]),
    ("self_attn.o_proj.weight", lambda c: [c["hidden_size"], c["num_attention_heads"] * c["head_dim"]]),
    ("self_attn.q_norm.weight", lambda c: [c["head_dim"]]),
    ("self_attn.k_norm.weight", lambda c: [c["head_dim"]]),
    ("post_attention_layernorm.weight", lambda c: [c["hidden_size"]]),
    ("pre_feedforward_layernorm.weight", lambda c: [c["hidden_size"]]),
    ("post_feedforward_layernorm.weight", lambda c: [c["hidden_size"]]),
    ("mlp.gate_proj.weight", lambda c: [c["intermediate_size"], c["hidden_size"]]),
    ("mlp.up_proj.weight", lambda c: [c["intermediate_size"], c["hidden_size"]]),
    ("mlp.down_proj.weight", lambda c: [c["hidden_size"], c["intermediate_size"]]),
]


class ExportError(Exception):
    """A problem with the input checkpoint: reported as one line, exit code 1."""


def error_line(e):
    """The one line main() prints for an ExportError: control characters (a newline in a
    tensor name read from the file, say) escaped, so the message stays one line."""
    msg = str(e)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in msg)


def short(v, n=60):
    """A value from the input, for a message: its repr, cut to n characters."""
    r = repr(v)
    return r if len(r) <= n else r[:n - 3] + "..."


def label(s, n=80):
    """A name from the input (a GGUF key or tensor name), for a message: as it is if it is
    short and printable, else its repr cut short."""
    return s if len(s) <= n and s.isprintable() else short(s, n)


def read_json(path, what, limit):
    """A JSON file of at most `limit` bytes, parsed; every failure an ExportError."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise ExportError(f"{path} is {size} bytes, more than a {what} can plausibly be ({limit})")
            raw = f.read()
    except OSError as e:
        raise ExportError(f"cannot read {path}: {e.strerror}")
    return parse_json(raw, path)


def parse_json(raw, path):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, 5000-digit integers, deep nesting
        raise ExportError(f"{path} is not valid JSON: {short(str(e), 120)[1:-1]}")


# ----------------------------------------------------------------------------
# config.json

# The header's sizes (FORMAT.md): what gemma3's read_header accepts, 1 to 2^24, except the
# layer count, kept to 2^16 here (export.py makes 13 tensor entries per layer).
MAX_DIM = 1 << 24
MAX_LAYERS = 1 << 16
QK = 32  # q8_0 / q4_0 block: every matrix row is whole blocks


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_config(cfg, where, names=None):
    """Every hyper-parameter the header holds, checked once, where the data enters (from
    config.json or GGUF metadata), against what gemma3's loader accepts: a message naming
    the key instead of gemma3's "header field 8 has implausible value 0" later. `names`:
    the source's own key names (GGUF), by ours."""
    names = names or {}

    def key(k):
        return names.get(k, k)

    for k, hi in (("hidden_size", MAX_DIM), ("intermediate_size", MAX_DIM), ("num_hidden_layers", MAX_LAYERS),
                  ("num_attention_heads", MAX_DIM), ("num_key_value_heads", MAX_DIM), ("head_dim", MAX_DIM),
                  ("sliding_window", MAX_DIM), ("max_position_embeddings", MAX_DIM)):
        v = cfg[k]
        if not is_int(v):
            raise ExportError(f"{where}: {key(k)} is {short(v)}, not an integer")
        if not 1 <= v <= hi:
            raise ExportError(f"{where}: {key(k)} {v} is out of range (1 to {hi})")
    if not is_int(cfg["bos_token_id"]) or not 0 <= cfg["bos_token_id"] < MAX_DIM:
        raise ExportError(f"{where}: {key('bos_token_id')} is {short(cfg['bos_token_id'])}, not a token id")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ExportError(f"{where}: {key('num_attention_heads')} {cfg['num_attention_heads']} is not a multiple of "
                          f"{key('num_key_value_heads')} {cfg['num_key_value_heads']}")
    if cfg["head_dim"] % 2:
        raise ExportError(f"{where}: {key('head_dim')} {cfg['head_dim']} is odd (RoPE rotates pairs of dimensions)")
    if cfg["num_attention_heads"] * cfg["head_dim"] > MAX_DIM:
        raise ExportError(f"{where}: {key('num_attention_heads')} x {key('head_dim')} = "
                          f"{cfg['num_attention_heads'] * cfg['head_dim']} is out of range (at most {MAX_DIM})")
    # The header's floats: finite, and still positive (eps: not negative) as float32.
    for k, lowest in (("rms_norm_eps", 0.0), ("rope_theta", None), ("rope_local_base_freq", None),
                      ("query_pre_attn_scalar", None), ("rope_factor", None)):
        v = cfg[k]
        if not is_number(v):
            raise ExportError(f"{where}: {key(k)} is {short(v)}, not a finite number")
        try:
            v32 = struct.unpack("<f", struct.pack("<f", v))[0]
        except (OverflowError, struct.error):  # (an int past 2^1024 is a struct.error)
            v32 = math.inf
        if not (math.isfinite(v32) and (v32 >= lowest if lowest is not None else v32 > 0)):
            raise ExportError(f"{where}: {key(k)} {v} is out of range "
                              f"({'not negative' if lowest is not None else 'positive'}, within float32)")


def check_quantizable(cfg, qtype, where):
    """q8_0 / q4_0 cut every matrix row into blocks of 32: the rows are hidden_size,
    intermediate_size and heads x head_dim wide (gemma3 --quantize refuses the rest)."""
    for k, v in (("hidden_size", cfg["hidden_size"]), ("intermediate_size", cfg["intermediate_size"]),
                 ("num_attention_heads x head_dim", cfg["num_attention_heads"] * cfg["head_dim"])):
        if v % QK:
            raise ExportError(f"{where}: {k} {v} is not a multiple of {QK}, which {qtype} needs "
                              f"(rows in blocks of {QK}); export f32 or bf16")


def legacy_rope_keys(text, path):
    """transformers 5 saves RoPE as rope_parameters, per layer type ({"full_attention":
    {"rope_theta", "rope_type", "factor"}, "sliding_attention": {...}}) where 4.x wrote
    rope_theta, rope_local_base_freq and rope_scaling: the 4.x keys, from it (those present win)."""
    rp = text.get("rope_parameters")
    if rp is None:
        return text
    if not isinstance(rp, dict):
        raise ExportError(f"{path}: rope_parameters is {short(rp)}, not an object")
    full, sliding = rp.get("full_attention", rp), rp.get("sliding_attention", {})
    if not isinstance(full, dict) or not isinstance(sliding, dict):
        raise ExportError(f"{path}: rope_parameters is {short(rp)}: wanted an object per layer type")
    if sliding.get("rope_type", "default") != "default":
        raise ExportError(f"{path}: rope_parameters.sliding_attention.rope_type {short(sliding.get('rope_type'))}: "
                          "Gemma 3 scales only the global layers")
    out = dict(text)
    if "rope_theta" in full:
        out.setdefault("rope_theta", full["rope_theta"])
    if "rope_theta" in sliding:
        out.setdefault("rope_local_base_freq", sliding["rope_theta"])
    if full.get("rope_type", "default") != "default" and "rope_scaling" not in text:
        out["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
    return out


def read_config(hf_dir):
    path = os.path.join(hf_dir, "config.json")
    raw = read_json(path, "config.json", 1 << 20)
    if not isinstance(raw, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    # Multimodal checkpoints (Gemma3ForConditionalGeneration) nest the text model's config.
    text = raw.get("text_config", raw)
    if text is None:
        text = {}
    if not isinstance(text, dict):
        raise ExportError(f"{path}: text_config is {short(text)}, not an object")
    text = legacy_rope_keys(text, path)
    cfg = dict(TEXT_CONFIG_DEFAULTS)
    cfg.update({k: v for k, v in text.items() if v is not None or k in ("rope_scaling",)})
    # Older transformers name the activation hidden_act.
    if "hidden_activation" not in text and "hidden_act" in text:
        cfg["hidden_activation"] = text["hidden_act"]

    if cfg["hidden_activation"] not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ExportError(f"unsupported hidden_activation {short(cfg['hidden_activation'])} (Gemma 3 uses gelu_pytorch_tanh)")
    if cfg["attention_bias"] is not False:
        raise ExportError(f"attention_bias={short(cfg['attention_bias'])} is not Gemma 3 and is not supported")
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg[cap] is not None:
            raise ExportError(f"{cap}={short(cfg[cap])} is set, but Gemma 3 has no soft-capping; refusing to guess")
    if raw.get("tie_word_embeddings", cfg["tie_word_embeddings"]) is not True:
        raise ExportError(f"tie_word_embeddings={short(raw.get('tie_word_embeddings'))}: Gemma 3 ties the classifier to the embedding")

    # RoPE scaling: Gemma 3 4B+ use linear scaling (factor 8), on global layers only.
    rs = cfg["rope_scaling"]
    if rs is None:
        cfg["rope_factor"] = 1.0
    elif not isinstance(rs, dict):
        raise ExportError(f"{path}: rope_scaling is {short(rs)}, not an object or null")
    else:
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "default":
            cfg["rope_factor"] = 1.0
        elif kind == "linear":
            cfg["rope_factor"] = rs.get("factor")
        else:
            raise ExportError(f"unsupported rope_scaling type {short(kind)} (only 'linear' is Gemma 3)")
    names = {"rope_factor": "rope_scaling.factor"}
    check_config(cfg, path, names)
    n_layers = cfg["num_hidden_layers"]

    # Per-layer attention type: the newer layer_types list wins over the pattern rule.
    if cfg["layer_types"] is not None:
        kinds = {"sliding_attention": 0, "full_attention": 1}
        if not isinstance(cfg["layer_types"], list):
            raise ExportError(f"{path}: layer_types is {short(cfg['layer_types'])}, not a list")
        if len(cfg["layer_types"]) != n_layers:
            raise ExportError(f"layer_types has {len(cfg['layer_types'])} entries, num_hidden_layers is {n_layers}")
        for t in cfg["layer_types"]:
            if not isinstance(t, str) or t not in kinds:
                raise ExportError(f"unknown layer type {short(t)} in layer_types")
        cfg["is_global"] = [kinds[t] for t in cfg["layer_types"]]
    else:
        pattern = cfg["sliding_window_pattern"]
        if not is_int(pattern) or not 1 <= pattern <= MAX_LAYERS:
            raise ExportError(f"{path}: sliding_window_pattern is {short(pattern)}, not a positive integer")
        cfg["is_global"] = [1 if (i + 1) % pattern == 0 else 0 for i in range(n_layers)]
    return cfg


# ----------------------------------------------------------------------------
# safetensors reading (header parse + byte ranges; no third-party code)

# F32, BF16, F16 tensors; U32 and U8: an MLX checkpoint's packed matrices and fp8 scales
ST_DTYPES = {"F32": 4, "BF16": 2, "F16": 2, "U32": 4, "U8": 1}
ST_FLOATS = ("F32", "BF16", "F16")
ST_HEADER_LIMIT = 100_000_000  # the safetensors library's own limit on the JSON header


def read_safetensors_header(path):
    """{name: where its bytes are} from a safetensors file's header, every field checked:
    types, sizes, and that each tensor's bytes lie inside the file and overlap no other's."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ExportError(f"cannot open {path}: {e.strerror}")
    with f:
        try:
            head = f.read(8)
            if len(head) != 8:
                raise ExportError(f"{path}: truncated safetensors file")
            n = struct.unpack("<Q", head)[0]
            size = os.fstat(f.fileno()).st_size
            if n > size - 8 or n > ST_HEADER_LIMIT:
                raise ExportError(f"{path}: safetensors header length {n} exceeds the file or the format's limit")
            raw = f.read(n)
        except OSError as e:  # a directory named like a shard, an I/O error
            raise ExportError(f"cannot read {path}: {e.strerror}")
    header = parse_json(raw, f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise ExportError(f"{path}: the safetensors header is {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    tensors, spans = {}, []
    for name, info in header.items():
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
                and all(is_int(d) and d >= 0 for d in info["shape"]) and isinstance(info.get("data_offsets"), list)
                and len(info["data_offsets"]) == 2 and all(is_int(o) and o >= 0 for o in info["data_offsets"])):
            raise ExportError(f"{path}: tensor {short(name)} has a malformed entry {short(info)} "
                              "(wanted dtype, shape of integers, data_offsets [start, end])")
        dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ST_DTYPES:
            hint = (" (a quantized checkpoint: export.py reads F32, BF16 and F16 ones, and MLX's packed U32 ones)"
                    if dtype in ST_QUANTIZED else "")
            raise ExportError(f"{path}: tensor {short(name)} has unsupported dtype {short(dtype)}{hint}")
        if len(shape) > 4:
            raise ExportError(f"{path}: tensor {short(name)} has {len(shape)} dimensions")
        count = 1
        for d in shape:
            count *= d
        if end - start != count * ST_DTYPES[dtype] or 8 + n + end > size:
            raise ExportError(f"{path}: tensor {short(name)} has inconsistent size or lies past the end of the file")
        tensors[name] = {"file": path, "dtype": dtype, "shape": shape, "offset": 8 + n + start, "nbytes": end - start}
        spans.append((start, end, name))
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise ExportError(f"{path}: tensors {short(a)} and {short(b)} overlap (data_offsets lie)")
    return tensors


ST_QUANTIZED = {"I8", "I4", "U4", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"}


def shard_names(hf_dir):
    """The safetensors files of a checkpoint: model.safetensors, or the shards its index
    lists, each a plain file name in hf_dir (never a path that leads out of it)."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if not os.path.exists(index):
        if os.path.exists(os.path.join(hf_dir, "model.safetensors")):
            return ["model.safetensors"]
        raise ExportError(f"no model.safetensors or model.safetensors.index.json in {hf_dir}")
    idx = read_json(index, "safetensors index", 64 << 20)
    wmap = idx.get("weight_map") if isinstance(idx, dict) else None
    if not isinstance(wmap, dict):
        raise ExportError(f"{index}: no weight_map object (the tensor -> shard file map)")
    files = set()
    for name, fn in wmap.items():
        if not (isinstance(fn, str) and fn and fn not in (".", "..") and os.path.basename(fn) == fn
                and "/" not in fn and "\\" not in fn and "\0" not in fn and fn.isprintable()
                and fn.encode("utf-8", "replace").decode("utf-8") == fn):  # no lone surrogates
            raise ExportError(f"{index}: weight_map gives {short(name)} the shard {short(fn)}, "
                              f"not a file name inside {hf_dir}")
        if len(fn) > 255:
            raise ExportError(f"{index}: weight_map gives {short(name)} a shard name of {len(fn)} characters "
                              f"({short(fn)}), longer than a file name can be")
        files.add(fn)
    return sorted(files)


# A stored classifier (plain, or packed by MLX, whose multimodal layout keeps it under
# language_model.): found as lm_head.*; load_hf decides whether it is the embedding again.
LM_HEAD_NAMES = {f"{p}lm_head.{t}" for p in ("", "language_model.") for t in ("weight", "scales", "biases")}


def find_tensors(hf_dir):
    """Map canonical name (prefix stripped) -> where its bytes are, over all shards."""
    found = {}
    for fn in shard_names(hf_dir):
        for name, info in read_safetensors_header(os.path.join(hf_dir, fn)).items():
            if name.startswith(SKIP_PREFIXES):
                continue  # the vision half
            for p in TEXT_PREFIXES:
                if name.startswith(p):
                    canon = name[len(p):]
                    break
            else:
                if name not in LM_HEAD_NAMES:
                    raise ExportError(f"unknown tensor {short(name)} in {fn}")
                canon = name[name.index("lm_head."):]
            if canon in found:
                raise ExportError(f"tensor {short(canon)} appears twice")
            found[canon] = info
    return found


def expected_tensors(cfg):
    """The canonical tensor list, in file order, with expected shapes."""
    out = [("embed_tokens.weight", None)]  # rows = vocab, taken from the tensor itself
    for i in range(cfg["num_hidden_layers"]):
        for name, shape in LAYER_TENSORS:
            out.append((f"layers.{i}.{name}", shape(cfg)))
    out.append(("norm.weight", [cfg["hidden_size"]]))
    return out


def read_tensor_bytes(info):
    with open(info["file"], "rb") as f:
        f.seek(info["offset"])
        data = f.read(info["nbytes"])
    if len(data) != info["nbytes"]:
        raise ExportError(f"{info['file']}: short read")
    return data


def convert(data, src, dst):
    """Convert raw little-endian tensor bytes between dtypes. Slicing runs at C speed."""
    if src == "BF16" and dst == DTYPE_F32:
        # bf16 is the top half of an f32: place each 2-byte value in the high half.
        out = bytearray(2 * len(data))
        out[2::4] = data[0::2]
        out[3::4] = data[1::2]
        return bytes(out)
    if src == "BF16" and dst == DTYPE_BF16:
        return data
    if src == "F16":
        n = len(data) // 2
        data = struct.pack(f"<{n}f", *struct.unpack(f"<{n}e", data))
        src = "F32"
    if src == "F32" and dst == DTYPE_F32:
        return data
    if src == "F32" and dst == DTYPE_BF16:
        # Round to nearest even, like torch's .to(bfloat16). Slow in pure Python, but the
        # official checkpoints are bf16, so this is only for rare f32/f16 sources.
        n = len(data) // 4
        words = struct.unpack(f"<{n}I", data)
        halves = []
        for w in words:
            if (w & 0x7F800000) == 0x7F800000 and (w & 0x7FFFFF):
                halves.append((w >> 16) | 0x40)  # NaN stays NaN
            else:
                halves.append(((w + 0x7FFF + ((w >> 16) & 1)) >> 16) & 0xFFFF)
        return struct.pack(f"<{n}H", *halves)
    raise AssertionError((src, dst))


def finite_tensor(name, info, dt):
    """A tensor's bytes converted to dt, refused if a value is a NaN or an infinity (then
    every logit of the model would be NaN): in the source, or after rounding to bf16."""
    data = convert(read_tensor_bytes(info), info["dtype"], dt)
    i = first_nonfinite(data, dt)
    if i is not None:
        size = ST_DTYPES[info["dtype"]]
        raw = read_tensor_bytes(info)[i * size:(i + 1) * size]
        v = struct.unpack("<" + {"F32": "f", "F16": "e"}.get(info["dtype"], "H"), raw)[0]
        if info["dtype"] == "BF16":
            v = struct.unpack("<f", struct.pack("<I", v << 16))[0]
        what = f"({v:g}) rounds to infinity in bf16" if math.isfinite(v) else \
            f"is {'NaN' if v != v else '-infinity' if v < 0 else 'infinity'}; a NaN or infinity cannot be exported"
        raise ExportError(f"tensor {name!r}: value {i} {what}")
    return data


def finite_chunks(name, chunks, dt):
    """The chunks of a tensor unpacked in C (an MLX matrix), refused at the first NaN or
    infinity as finite_tensor refuses them (a scale or bias that is one makes them)."""
    done = 0
    for chunk in chunks:
        i = first_nonfinite(chunk, dt)
        if i is not None:
            raise ExportError(f"tensor {name!r}: value {done + i} is NaN or infinite (its group's scale or bias is); "
                              "a NaN or infinity cannot be exported")
        done += len(chunk) // ELEM_SIZE[dt]
        yield chunk


def bytes_table(pred):
    return bytes(1 if pred(b) else 0 for b in range(256))


# A float32 or bf16 is a NaN or an infinity when its exponent bits are all ones: the high
# byte's low 7 bits and the next byte's top bit (little-endian).
EXP_HIGH, EXP_LOW = bytes_table(lambda b: b & 0x7F == 0x7F), bytes_table(lambda b: b & 0x80)


def first_nonfinite(data, dt):
    """The index of the first NaN or infinity among the little-endian dt values in data,
    (bytes) or None. At the speed of bytes operations, 16 MiB at a time (memory stays that
    of the tensor): the high bytes are searched for 0x7F / 0xFF (no real weight has them), and
    only where found are the exponents compared, as one big integer per byte position."""
    size = ELEM_SIZE[dt]
    step = (16 << 20) // size * size
    for start in range(0, len(data), step):
        high = data[start + size - 1:start + step:size]
        if b"\x7f" not in high and b"\xff" not in high:
            continue
        both = (int.from_bytes(high.translate(EXP_HIGH), "little") &
                int.from_bytes(data[start + size - 2:start + step:size].translate(EXP_LOW), "little"))
        if both:
            return start // size + ((both & -both).bit_length() - 1) // 8
    return None


# ----------------------------------------------------------------------------
# The vision half of Gemma3ForConditionalGeneration (4B, 12B, 27B): the SigLIP tower and
# the projector, kept in the file under transformers 5's names (FORMAT.md, Vision)

# Where the tower's tensors live, by checkpoint flavour: google/gemma-3-4b-it,
# transformers 4.52 - 4.57, transformers 5 (longest first: the last is a prefix of the first).
VISION_PREFIXES = ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.",
                   "vision_tower.")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
VISION_TOWER = "vision_tower."          # the file's names: transformers 5's
PROJECTOR = "multi_modal_projector."

# Defaults of transformers' SiglipVisionConfig and Gemma3Config for keys a config leaves out.
VISION_CONFIG_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 16,
                          "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}
MM_CONFIG_DEFAULTS = {"mm_tokens_per_image": 256, "image_token_index": 262144, "boi_token_index": 255999,
                      "eoi_token_index": 256000}

VISION_LAYER_TENSORS = [  # (name inside encoder.layers.N, shape as a function of (hidden, intermediate))
    ("layer_norm1.weight", lambda h, f: [h]), ("layer_norm1.bias", lambda h, f: [h]),
    ("self_attn.q_proj.weight", lambda h, f: [h, h]), ("self_attn.q_proj.bias", lambda h, f: [h]),
    ("self_attn.k_proj.weight", lambda h, f: [h, h]), ("self_attn.k_proj.bias", lambda h, f: [h]),
    ("self_attn.v_proj.weight", lambda h, f: [h, h]), ("self_attn.v_proj.bias", lambda h, f: [h]),
    ("self_attn.out_proj.weight", lambda h, f: [h, h]), ("self_attn.out_proj.bias", lambda h, f: [h]),
    ("layer_norm2.weight", lambda h, f: [h]), ("layer_norm2.bias", lambda h, f: [h]),
    ("mlp.fc1.weight", lambda h, f: [f, h]), ("mlp.fc1.bias", lambda h, f: [f]),
    ("mlp.fc2.weight", lambda h, f: [h, f]), ("mlp.fc2.bias", lambda h, f: [h]),
]
VISION_SECTION_SIZE = 80


def read_vision_config(hf_dir, vocab):
    """The vision hyper-parameters of a multimodal config.json, or None for a text model."""
    path = os.path.join(hf_dir, "config.json")
    raw = read_json(path, "config.json", 1 << 20)
    if not isinstance(raw, dict) or raw.get("vision_config") is None:
        return None
    vision = raw["vision_config"]
    if not isinstance(vision, dict):
        raise ExportError(f"{path}: vision_config is {short(vision)}, not an object")
    vc = dict(VISION_CONFIG_DEFAULTS)
    vc.update({k: v for k, v in vision.items() if v is not None})
    for k, d in MM_CONFIG_DEFAULTS.items():
        vc[k] = raw.get(k, raw.get(k.replace("_index", "_id"), d))
    if vc["hidden_act"] not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ExportError(f"{path}: vision_config.hidden_act {short(vc['hidden_act'])} is not SigLIP's gelu_pytorch_tanh")
    ints = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
            "image_size", "patch_size"] + list(MM_CONFIG_DEFAULTS)
    for k in ints:
        if not is_int(vc[k]) or not 1 <= vc[k] <= MAX_DIM:
            raise ExportError(f"{path}: vision setting {k} is {short(vc[k])}, not an integer in 1..{MAX_DIM}")
    eps = vc["layer_norm_eps"]
    if not is_number(eps) or not 0 <= eps < 1:
        raise ExportError(f"{path}: vision_config.layer_norm_eps is {short(eps)}, not a number in [0, 1)")
    side = vc["image_size"] // vc["patch_size"]
    pooled = math.isqrt(vc["mm_tokens_per_image"])
    if (vc["image_size"] % vc["patch_size"] or vc["hidden_size"] % vc["num_attention_heads"] or vc["num_channels"] != 3
            or pooled * pooled != vc["mm_tokens_per_image"] or side % pooled or side * side > MAX_DIM):
        raise ExportError(f"{path}: inconsistent vision config (image_size {vc['image_size']} must be whole patches of "
                          f"{vc['patch_size']}, hidden_size {vc['hidden_size']} whole heads, num_channels 3, "
                          f"mm_tokens_per_image {vc['mm_tokens_per_image']} a square whose side divides "
                          f"{side} patches a side)")
    for k in ("image_token_index", "boi_token_index", "eoi_token_index"):
        if vc[k] >= vocab:
            raise ExportError(f"{path}: {k} {vc[k]} is outside the vocabulary of {vocab}")
    vc["mean"], vc["std"] = read_image_normalization(hf_dir)
    return vc


def read_image_normalization(hf_dir):
    """image_mean and image_std of preprocessor_config.json (Gemma 3's: 0.5, 0.5 a channel)."""
    path = os.path.join(hf_dir, "preprocessor_config.json")
    if not os.path.exists(path):
        return [0.5] * 3, [0.5] * 3
    raw = read_json(path, "preprocessor_config.json", 1 << 20)
    out = []
    for k in ("image_mean", "image_std"):
        v = raw.get(k, [0.5] * 3) if isinstance(raw, dict) else None
        if not (isinstance(v, list) and len(v) == 3 and all(is_number(x) and -1e3 < x < 1e3 for x in v)
                and (k == "image_mean" or all(x > 0 for x in v))):
            raise ExportError(f"{path}: {k} is {short(v)}, not three numbers (std > 0)")
        out.append([float(x) for x in v])
    return out


def find_vision_tensors(hf_dir):
    """Map the file's name (transformers 5's) -> where the tensor's bytes are, over all shards.
    The pooling head that transformers 5 adds to the tower (vision_use_head) is not Gemma's."""
    found = {}
    for fn in shard_names(hf_dir):
        for name, info in read_safetensors_header(os.path.join(hf_dir, fn)).items():
            canon = None
            for p in VISION_PREFIXES:
                if name.startswith(p):
                    canon = VISION_TOWER + name[len(p):]
                    break
            for p in PROJECTOR_PREFIXES:
                if name.startswith(p):
                    canon = PROJECTOR + name[len(p):]
            if canon is None or canon.startswith(VISION_TOWER + "head."):
                continue
            if canon in found:
                raise ExportError(f"vision tensor {short(canon)} appears twice")
            found[canon] = info
    return found


def expected_vision_tensors(vc, text_hidden):
    """(file name, shape in the checkpoint, shape in the file) of the tower and projector."""
    h, f, c, p = vc["hidden_size"], vc["intermediate_size"], vc["num_channels"], vc["patch_size"]
    t = VISION_TOWER
    out = [(t + "embeddings.patch_embedding.weight", [h, c, p, p], [h, c * p * p]),
           (t + "embeddings.patch_embedding.bias", [h], [h]),
           (t + "embeddings.position_embedding.weight", [(vc["image_size"] // p) ** 2, h], None)]
    for i in range(vc["num_hidden_layers"]):
        out += [(f"{t}encoder.layers.{i}.{n}", s(h, f), None) for n, s in VISION_LAYER_TENSORS]
    out += [(t + "post_layernorm.weight", [h], None), (t + "post_layernorm.bias", [h], None),
            (PROJECTOR + "mm_soft_emb_norm.weight", [h], None),
            # HF keeps it (vision hidden, text hidden) for x @ w; the file, as every matrix, (out, in)
            (PROJECTOR + "mm_input_projection_weight", [h, text_hidden], [text_hidden, h])]
    return [(n, s, s if fs is None else fs) for n, s, fs in out]


def transposed(data, rows, cols, elem):
    """A row-major (rows, cols) matrix of elem-byte values as (cols, rows)."""
    a = array.array("I" if elem == 4 else "H", data)
    out = array.array(a.typecode, bytes(len(data)))
    for j in range(cols):
        out[j * rows:(j + 1) * rows] = a[j::cols]
    return out.tobytes()


def vision_tensors(hf_dir, vc, text_hidden, out_dtype):
    """The tower's and projector's tensors as the writer takes them (see Source)."""
    found = find_vision_tensors(hf_dir)
    # too few tensors for the layer count (7 + 16 a layer): name the first missing one from
    # as many layers as the tensors could fill, not from a huge config's whole list
    few = dict(vc, num_hidden_layers=min(vc["num_hidden_layers"], len(found) // 16 + 2))
    wanted = expected_vision_tensors(vc if few == vc or len(found) >= 7 + 16 * vc["num_hidden_layers"] else few,
                                     text_hidden)
    names = {n for n, _, _ in wanted}
    for name in found:
        if name not in names:
            raise ExportError(f"unknown vision tensor {short(name)} (not part of a {vc['num_hidden_layers']}-layer "
                              "SigLIP tower and Gemma 3 projector)")
    tensors = []
    for name, shape, file_shape in wanted:
        info = found.get(name)
        if info is None:
            raise ExportError(f"missing vision tensor {name!r} (the config has a vision_config; "
                              "export --text-only to leave the image path out)")
        if info["shape"] != shape:
            raise ExportError(f"vision tensor {name!r} has shape {short(info['shape'])}, expected {shape}")
        dt = out_dtype if len(file_shape) == 2 else DTYPE_F32
        flip = name.endswith("mm_input_projection_weight")

        def chunks(info=info, dt=dt, flip=flip, shape=shape):
            data = convert(read_tensor_bytes(info), info["dtype"], dt)
            return iter([transposed(data, shape[0], shape[1], ELEM_SIZE[dt]) if flip else data])
        tensors.append((name, file_shape, dt, math.prod(file_shape) * ELEM_SIZE[dt], chunks))
    return tensors


def vision_section(vc):
    """The vision section's bytes (FORMAT.md)."""
    raw = struct.pack("<11I7f2I", vc["image_size"], vc["patch_size"], vc["num_channels"], vc["hidden_size"],
                      vc["intermediate_size"], vc["num_hidden_layers"], vc["num_attention_heads"],
                      vc["mm_tokens_per_image"], vc["image_token_index"], vc["boi_token_index"],
                      vc["eoi_token_index"], float(vc["layer_norm_eps"]), *vc["mean"], *vc["std"], 0, 0)
    assert len(raw) == VISION_SECTION_SIZE
    return raw


def add_vision(src, hf_dir, dtype_name):
    """Give src the vision section and tensors of a multimodal checkpoint (nothing for a text one)."""
    vc = read_vision_config(hf_dir, src.vocab)
    if vc is None:
        return src
    src.tensors = src.tensors + vision_tensors(hf_dir, vc, src.cfg["hidden_size"], DTYPE_CODES[dtype_name])
    src.vision = vision_section(vc)
    return src


# ----------------------------------------------------------------------------
# tokenizer.json -> tokenizer section (FORMAT.md)

BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")


def pack_tokenizer(path):
    tok = read_json(path, "tokenizer.json", 1 << 30)
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise ExportError(f"{path}: expected a BPE tokenizer, got {short(model.get('type') if isinstance(model, dict) else model)}")
    vocab, merges_in, added_in = model.get("vocab"), model.get("merges", []), tok.get("added_tokens") or []
    if not (isinstance(vocab, dict) and vocab and all(is_int(i) and 0 <= i < MAX_DIM for i in vocab.values())):
        raise ExportError(f"{path}: model.vocab is not an object of piece: id (ids 0 to {MAX_DIM - 1})")
    if not (isinstance(added_in, list) and all(isinstance(a, dict) and is_int(a.get("id")) and 0 <= a["id"] < MAX_DIM
                                               and isinstance(a.get("content"), str) for a in added_in)):
        raise ExportError(f"{path}: added_tokens is not a list of {{id, content}} objects")
    if not isinstance(merges_in, list):
        raise ExportError(f"{path}: model.merges is not a list")
    pieces = {i: p for p, i in vocab.items()}
    types = {i: (1 if BYTE_PIECE.match(p) else 0) for p, i in vocab.items()}
    added = []
    for a in added_in:
        if not a["content"]:  # gemma3 matches added tokens in the text: an empty one is refused
            raise ExportError(f"{path}: added token {a['id']} is empty")
        pieces[a["id"]] = a["content"]
        types[a["id"]] = 3 if a.get("special") else 2
        added.append(a["id"])

    merges = array.array("I")
    for m in merges_in:
        if isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            a, b = m
        elif isinstance(m, str) and " " in m:
            a, b = m.split(" ", 1)
        else:
            raise ExportError(f"{path}: merge {short(m)} is neither \"left right\" nor [left, right]")
        ab = a + b
        try:
            ia, ib, im = vocab[a], vocab[b], vocab[ab]
        except KeyError as e:
            raise ExportError(f"{path}: merge {short(a)} + {short(b)} uses a piece not in the vocab ({short(e.args[0])})")
        # as gemma3's loader checks each merge: the ids' pieces are the halves and the whole
        # (an id given to two pieces, or to an added token, breaks that), none empty
        if not (a and b and pieces[ia] == a and pieces[ib] == b and pieces[im] == ab):
            raise ExportError(f"{path}: merge {short(a)} + {short(b)}: the pieces of ids {ia}, {ib}, {im} are "
                              f"{short(pieces[ia], 30)}, {short(pieces[ib], 30)}, {short(pieces[im], 30)} "
                              "(an empty part, or an id given to two pieces)")
        merges.extend((ia, ib, im))
    return tokenizer_section(pieces, types, added, merges)


# What gemma3's tokenizer_init accepts (tokenizer.c): at most 2^26 tokens and 2^27 merges.
MAX_TOKENS, MAX_MERGES = 1 << 26, 1 << 27


def tokenizer_section(pieces, types, added, merges):
    """The tokenizer section (FORMAT.md) from {id: piece}, {id: type}, the added ids and
    the merges, an array of (left id, right id, merged id) in rank order; also the ids of
    the four pieces the header names (None where absent)."""
    n_tokens = max(pieces) + 1
    if n_tokens > MAX_TOKENS or len(merges) // 3 > MAX_MERGES:
        raise ExportError(f"the tokenizer has {n_tokens} tokens and {len(merges) // 3} merges; gemma3 reads at most "
                          f"{MAX_TOKENS} and {MAX_MERGES}")
    # Work per piece, not per id: ids without a piece (a sparse vocabulary, or one added
    # token with a huge id) are runs of equal offsets and zero types, filled a run at a time.
    blob = bytearray()
    offsets = array.array("I", bytes(4 * (n_tokens + 1)))
    kinds = bytearray(n_tokens)
    done = 0  # offsets[0 .. done] are set
    for i in sorted(pieces):
        offsets[done + 1:i + 1] = array.array("I", [len(blob)]) * (i - done)
        try:
            blob += pieces[i].encode("utf-8")
        except UnicodeEncodeError:
            raise ExportError(f"token {i} {short(pieces[i])} is not valid UTF-8 (a lone surrogate)")
        offsets[i + 1] = len(blob)
        kinds[i] = types.get(i, 0)
        done = i + 1
    if sys.byteorder == "big":
        merges = array.array("I", merges)
        merges.byteswap()
        offsets.byteswap()
    out = bytearray(struct.pack("<4I", n_tokens, len(merges) // 3, len(added), 0))
    out += offsets
    out += merges  # (a bytes-like object: no copy of its own)
    out += struct.pack(f"<{len(added)}I", *added)
    out += kinds
    out += blob
    ids = {p: i for i, p in pieces.items()}
    special = {name: ids.get(name) for name in ("<bos>", "<eos>", "<end_of_turn>", "<start_of_turn>")}
    return out, special


# ----------------------------------------------------------------------------
# writing

class ChunkedWriter:
    """Writes a file in whole 4 MiB pieces at 4 MiB offsets. Linux then caches the new
    file in 2 MiB pages where the filesystem can (large folios), and gemma3 maps it
    with 2 MiB pages: fewer TLB misses while decode streams the weights (see
    read_file_bytes in gemma3.c). A plain buffered file writes at whatever offsets its
    buffer happens to fill, which leaves the cache in small pages."""
    CHUNK = 4 << 20

    def __init__(self, f):
        self.f, self.buf, self.pos = f, bytearray(), 0

    def _put(self, data):
        view = memoryview(data)
        while view:  # at most 64 MiB per call: a raw write may take less than asked
            view = view[self.f.write(view[:self.CHUNK * 16]):]

    def write(self, data):
        self.pos += len(data)
        view = memoryview(data)
        if self.buf:
            need = self.CHUNK - len(self.buf)
            self.buf += view[:need]
            view = view[need:]
            if len(self.buf) < self.CHUNK:
                return
            self._put(self.buf)
            self.buf = bytearray()
        whole = len(view) - len(view) % self.CHUNK
        if whole:
            self._put(view[:whole])
        self.buf += view[whole:]

    def close(self):
        self._put(self.buf)
        self.buf = bytearray()


def pad_to(n, a=ALIGN):
    return (n + a - 1) // a * a


class Source:
    """What the writer needs from a checkpoint: its config, vocab size, tokenizer
    section, special ids, and the tensors in file order, each as
    (name, shape in HF order, output dtype, byte size, function returning its bytes
    as an iterator of chunks)."""

    def __init__(self, cfg, vocab, tok_bytes, special, tensors, close=lambda: None):
        self.cfg, self.vocab, self.tok_bytes, self.tensors, self.close = cfg, vocab, tok_bytes, tensors, close
        self.vision = b""  # the vision section of a multimodal model (add_vision)
        self.bos, self.eos, self.eot, self.sot = special_ids(special, cfg, vocab)


# The header's special ids, where the tokenizer does not name them: Gemma 3's.
GEMMA3_IDS = {"<eos>": 1, "<end_of_turn>": 106, "<start_of_turn>": 105}


def special_ids(special, cfg, vocab):
    """The ids of <bos>, <eos>, <end_of_turn> and <start_of_turn> the header holds: the
    tokenizer's (special), else config's bos_token_id and Gemma 3's fixed ids. Checked as
    gemma3's read_header checks them (the one place export.py mirrors it): the vocabulary
    (embedding rows) is 1 to 2^24, and every id lies below it."""
    if not 1 <= vocab <= MAX_DIM:
        raise ExportError(f"the embedding table has {vocab} rows (1 to {MAX_DIM} allowed)")
    ids = []
    for piece in ("<bos>", "<eos>", "<end_of_turn>", "<start_of_turn>"):
        v, origin = special.get(piece), "the tokenizer's"
        if v is None:
            v, origin = (cfg["bos_token_id"], "config's") if piece == "<bos>" else (GEMMA3_IDS[piece], "Gemma 3's")
        if not is_int(v) or not 0 <= v < vocab:
            raise ExportError(f"{piece} token id {short(v)} ({origin}) is out of range for a vocabulary of {vocab} "
                              f"(gemma3 needs every special id from 0 to {vocab - 1})")
        ids.append(v)
    return ids


def check_tensor_count(found, n_layers):
    """Too few tensors for the layer count: say so (naming the first missing one) before
    anything walks the layers."""
    if len(found) < 2 + 13 * n_layers:
        names = (n for i in range(-1, n_layers + 1) for n in
                 (["embed_tokens.weight"] if i < 0 else ["norm.weight"] if i == n_layers else
                  [f"layers.{i}.{t}" for t, _ in LAYER_TENSORS]))
        raise ExportError(f"missing tensor {next((n for n in names if n not in found), '?')!r} (num_hidden_layers "
                          f"{n_layers} needs {2 + 13 * n_layers} tensors, the checkpoint has {len(found)})")


def load_hf(hf_dir, dtype_name, quant=None, quiet=True, text_only=False):
    cfg = read_config(hf_dir)
    if quant:
        check_quantizable(cfg, quant, os.path.join(hf_dir, "config.json"))
    found = find_tensors(hf_dir)
    check_tensor_count(found, cfg["num_hidden_layers"])  # (before any per-layer work: a huge layer count)
    packed_types = mlx_matrices(hf_dir, cfg, found)  # MLX's packed matrices: their scales and biases leave found
    # A stored classifier: Hugging Face's is tied to the embedding whatever it holds (Gemma 3's
    # config ties them), but mlx_lm and mlx-vlm compute the logits with it when it is there.
    head = found.pop("lm_head.weight", None)
    if packed_types and not quiet:
        kinds = ", ".join(f"{b}-bit {m} in groups of {g}" if m == "affine" else m for m, b, g in packed_types)
        print(f"{os.path.basename(os.path.normpath(hf_dir))}: MLX checkpoint, quantized matrices {kinds}",
              file=sys.stderr)
        if quant:
            print(f"note: the checkpoint is already quantized: {quant} quantizes its dequantized values again, and "
                  "the errors add up; --dtype f32 keeps the checkpoint's own values", file=sys.stderr)
    check_tensor_count(found, cfg["num_hidden_layers"])
    wanted = expected_tensors(cfg)
    wanted_names = {n for n, _ in wanted}
    for name in found:
        if name not in wanted_names:
            raise ExportError(f"unknown tensor {short(name)} (not part of a Gemma 3 text model with {cfg['num_hidden_layers']} layers)")
    missing = [n for n, _ in wanted if n not in found]
    if missing:
        raise ExportError(f"missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    emb = found["embed_tokens.weight"]["shape"]
    if len(emb) != 2 or emb[1] != cfg["hidden_size"]:
        raise ExportError(f"embed_tokens.weight has shape {short(emb)}, expected [vocab, {cfg['hidden_size']}]")
    vocab = emb[0]  # 262,144 for 270M/1B, 262,208 for 4B+: the tensor is the truth
    for name, shape in wanted[1:]:
        if found[name]["shape"] != shape:
            raise ExportError(f"tensor {name!r} has shape {short(found[name]['shape'])}, expected {shape}")
    if head is not None and packed_types:  # MLX: its own classifier, unless it is the embedding again
        if head["shape"] != emb:
            raise ExportError(f"tensor lm_head.weight has shape {short(head['shape'])}, expected {emb} (the embedding's)")
        if not same_matrix(head, found["embed_tokens.weight"]):
            found["lm_head.weight"] = head
            wanted.append(("lm_head.weight", emb))

    tok_path = os.path.join(hf_dir, "tokenizer.json")
    tok_bytes, special = (pack_tokenizer(tok_path) if os.path.exists(tok_path) else (b"", {}))

    # Output dtype per tensor: norms (1-D) always stay f32; matrices take --dtype.
    out_dtype = DTYPE_CODES[dtype_name]
    # MLX's packed matrices: tools/mlx_dequant unpacks them all, in file order.
    packed = [found[n] for n, _ in wanted if "mlx" in found[n]]
    files = sorted({i["file"] for w in packed for i in (w, w["mlx"][3], w["mlx"][4]) if i})
    jobs = [mlx_job(w, out_dtype, files) for w in packed]
    deq = MlxDequantizer(files, jobs, quiet) if jobs else None
    tensors = []
    for name, _ in wanted:
        info = found[name]
        dt = out_dtype if len(info["shape"]) == 2 else DTYPE_F32
        count = 1
        for d in info["shape"]:
            count *= d
        if "mlx" in info:
            read = lambda nb=count * ELEM_SIZE[dt], name=name, dt=dt: finite_chunks(name, deq.read(nb, name), dt)
        else:
            read = lambda name=name, info=info, dt=dt: iter([finite_tensor(name, info, dt)])
        tensors.append((name, list(info["shape"]), dt, count * ELEM_SIZE[dt], read))
    try:
        src = Source(cfg, vocab, tok_bytes, special, tensors, close=deq.close if deq else lambda: None)
        # a quantized MLX checkpoint's vision tower (mlx-vlm packs it too) is left out
        return src if text_only or packed else add_vision(src, hf_dir, dtype_name)
    except BaseException:
        if deq:
            deq.close()
        raise


def write_model(src, raw, out_name, dtype_name, quiet, label=None):
    """Write src as a model file into raw (a binary file open for writing, unbuffered: the
    temporary file, or the FIFO or device the user named), in order. out_name: what the log
    calls it ("wrote OUT_NAME"); label: what it says instead (an intermediate file). Closes
    src, also on an error."""
    cfg, tensors = src.cfg, src.tensors
    n_layers = cfg["num_hidden_layers"]
    layer_types_off = HEADER_SIZE
    vision_off = pad_to(layer_types_off + n_layers, 8)
    tok_off = vision_off + len(src.vision)
    dir_off = pad_to(tok_off + len(src.tok_bytes), 8)
    data_off = pad_to(dir_off + DIR_ENTRY_SIZE * len(tensors))
    directory = bytearray()
    pos = data_off
    offsets = []
    for name, shape, dt, nbytes, _ in tensors:
        directory += struct.pack("<64sII4IQQ", name.encode(), dt, len(shape), *(shape + [0] * (4 - len(shape))), pos, nbytes)
        offsets.append(pos)
        pos = pad_to(pos + nbytes)
    file_size = pos

    header = struct.pack(
        "<4sIQ13I5f2I4Q", MAGIC, FORMAT_VERSION, file_size,
        src.vocab, cfg["hidden_size"], cfg["intermediate_size"], n_layers,
        cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
        cfg["sliding_window"], cfg["max_position_embeddings"], src.bos, src.eos, src.eot, src.sot,
        float(cfg["query_pre_attn_scalar"]), float(cfg["rms_norm_eps"]), float(cfg["rope_theta"]),
        float(cfg["rope_local_base_freq"]), cfg["rope_factor"],
        len(tensors), 0, tok_off if src.tok_bytes else 0, len(src.tok_bytes), dir_off, vision_off if src.vision else 0)
    assert len(header) == HEADER_SIZE

    t0 = time.time()
    total = sum(t[3] for t in tensors)
    done = 0
    show = not quiet and sys.stderr.isatty()  # a \r progress line only makes sense on a terminal
    last = 0.0
    try:
        f = ChunkedWriter(raw)
        f.write(header)
        f.write(bytes(cfg["is_global"]))
        f.write(b"\0" * (vision_off - f.pos))
        f.write(src.vision)
        f.write(src.tok_bytes)
        f.write(b"\0" * (dir_off - f.pos))
        f.write(directory)
        for (name, shape, dt, nbytes, chunks), off in zip(tensors, offsets):
            f.write(b"\0" * (off - f.pos))
            for data in chunks():
                f.write(data)
                done += len(data)
                if show and (time.time() - last > 0.2 or done == total):
                    last = time.time()
                    pct = 100.0 * done / total
                    print(f"\r  {pct:5.1f}%  {done / 1e6:9.1f} MB  {name:<48}", end="", file=sys.stderr, flush=True)
            if f.pos != off + nbytes:
                raise ExportError(f"tensor {name!r}: got {f.pos - off} bytes, expected {nbytes}")
        f.write(b"\0" * (file_size - f.pos))
        f.close()
    except BaseException:
        if show:
            print(file=sys.stderr)
        raise
    finally:
        src.close()
    if not quiet:
        print(f"{chr(13) if show else ''}{label or 'wrote ' + out_name}: {file_size / 1e6:.1f} MB, {len(tensors)} tensors, vocab {src.vocab}, "
              f"{n_layers} layers ({sum(cfg['is_global'])} global), dtype {dtype_name}, "
              f"tokenizer {'yes' if src.tok_bytes else 'no'}, {time.time() - t0:.1f} s", file=sys.stderr)


def load(path, dtype_name, quiet, quant=None, text_only=False, mmproj=None):
    """The checkpoint at path as a Source; quant (q8_0, q4_0): the type it is going to be
    quantized to after, checked against the config before any work."""
    if os.path.isdir(path):
        if mmproj:
            raise ExportError(f"--mmproj goes with a GGUF model file; {path} is a directory, whose own "
                              "vision tower (if any) is kept")
        return load_hf(path, dtype_name, quant, quiet, text_only)
    if os.path.exists(path):
        src = load_gguf(path, dtype_name, quiet, quant)
        try:
            return add_mmproj(src, mmproj, dtype_name, quiet, path) if mmproj else src
        except BaseException:
            src.close()
            raise
    raise ExportError(f"cannot read {path}: no such file or directory")


# ----------------------------------------------------------------------------
# the output: where it goes, and never what the user did not ask to replace

HERE = os.path.dirname(os.path.abspath(__file__))
# The program's own files: an output there would replace the program.
PROGRAM_FILES = (os.path.abspath(__file__), os.path.join(HERE, "gemma3"), os.path.join(HERE, "tools", "gguf_dequant"),
                 os.path.join(HERE, "tools", "mlx_dequant"))
TEMP_STEM = ".gemma3-export"  # .NAME.gemma3-export.tmp, .NAME.gemma3-export.q.tmp


class Output:
    """The output file the user named, resolved (a symlink: its target, the link stays):
    - a regular file, or a name that does not exist yet: the export goes to a temporary
      file beside it, `.NAME.gemma3-export.tmp`, renamed over NAME when whole. A q8_0 /
      q4_0 export then quantizes that file: it keeps it open, gives its name to a new empty
      file (hand_over), and gemma3 --quantize reads the old one by descriptor and writes
      into the new one, which becomes NAME. So a run killed at any step leaves at most one
      temporary file, whose name is fixed for the output: the next run to the same output
      removes it. The temporary file is locked (flock) while a run uses it, so a second run
      to the same output meanwhile is refused instead of mixing its files with the first's.
    - a FIFO or a character device: written directly, in order; never replaced.
    Anything else (a directory, a block device, a socket) is refused."""

    def __init__(self, name, target, stream):
        self.name, self.target, self.stream = name, target, stream
        d, base = os.path.split(target)
        self.tmp = os.path.join(d, f".{base}{TEMP_STEM}.tmp")
        self.qtmp = os.path.join(d, f".{base}{TEMP_STEM}.q.tmp")
        self.fd = None  # the locked temporary file

    def temporaries(self):
        return [] if self.stream else [self.tmp, self.qtmp]

    def begin(self):
        """Take the temporary file (locked), removing what an earlier run left."""
        if self.stream:
            return
        while True:
            try:
                fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise ExportError(f"cannot write {self.name}: {e.strerror}")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise ExportError(f"another export.py is writing {self.name} now (it holds {self.tmp})")
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.tmp))
            except OSError:
                same = False
            if same:
                break
            os.close(fd)  # the file was renamed or removed between our open and our lock: again
        self.fd = fd
        for t in self.temporaries()[1:]:
            remove_if_there(t)
        os.ftruncate(fd, 0)

    def open_stream(self):
        """The file to write into: the temporary one, or the FIFO or device itself."""
        if self.stream:
            try:  # by the user's name: /dev/stdout's target is no path (pipe:[1234])
                return open(self.name, "wb", buffering=0)
            except OSError as e:
                raise ExportError(f"cannot write {self.name}: {e.strerror}")
        os.lseek(self.fd, 0, os.SEEK_SET)
        return open(self.fd, "wb", buffering=0, closefd=False)

    def hand_over(self):
        """The quantizing step's files: the temporary file's name goes to a new empty file,
        locked like it (made as .q.tmp, then renamed over it, so that the name is never
        free for another run to take); the old one, with the export in it, stays open but
        nameless, to be read by descriptor. Returns the old one's descriptor."""
        remove_if_there(self.qtmp)
        try:
            fd = os.open(self.qtmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as e:
            raise ExportError(f"cannot write {self.name}: {e.strerror}")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (a new file: nobody else holds it)
        os.rename(self.qtmp, self.tmp)
        old, self.fd = self.fd, fd
        return old

    def finish(self):
        """Put the finished temporary file in place, with the signals that interrupt an
        export held back: a renamed output is a finished one."""
        if self.stream:
            return
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            os.replace(self.tmp, self.target)
            # (after the rename the temporary name may already be another run's: not removed)
            os.close(self.fd)
            self.fd = None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def abort(self):
        """Remove every temporary file (ours: we hold the lock) and let the lock go."""
        if self.fd is None:
            return
        for t in self.temporaries():
            remove_if_there(t)
        os.close(self.fd)
        self.fd = None


def remove_if_there(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def check_output(src_path, out_path, force, quant, mmproj=None):
    """Before any work: where the output goes (an Output), refused with one line if it is a
    directory, a block device or socket, one of the inputs, the program itself, or an
    existing file that is not a gemma3.c model (unless force)."""
    try:
        st = os.stat(out_path)  # the target of a symlink
    except FileNotFoundError:
        st = None  # a new name (or a symlink to one)
    except OSError as e:
        raise ExportError(f"cannot write {out_path}: {e.strerror}")
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise ExportError(f"{out_path} is a directory: give the output file's name, e.g. {os.path.join(out_path, 'gemma3.bin')}")
    target = os.path.realpath(out_path)
    stream = st is not None and (stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode))
    if st is not None and not stream and not stat.S_ISREG(st.st_mode):
        kind = "block device" if stat.S_ISBLK(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "special file"
        raise ExportError(f"{out_path} is a {kind}: export.py writes regular files, FIFOs and character devices")
    if stream and quant:
        raise ExportError(f"{out_path} is a {'FIFO' if stat.S_ISFIFO(st.st_mode) else 'character device'}: a {quant} export "
                          "needs a regular file (gemma3 --quantize writes beside it); export to a file and copy it")
    out = Output(out_path, target, stream)
    try:
        inputs = [os.path.join(src_path, n) for n in os.listdir(src_path)] if os.path.isdir(src_path) else [src_path]
        inputs += [mmproj] if mmproj else []
    except OSError:
        inputs = []  # unreadable input: load() says so
    for path in out.temporaries() + [target]:
        for what, files in (("the input {}", inputs), ("{}, one of export.py's own program files", PROGRAM_FILES)):
            for i in files:
                if os.path.realpath(i) == path or (os.path.exists(path) and same_file(i, path)):
                    what = what.format(i)
                    raise ExportError(f"{out_path} is {what}: refusing to overwrite it" if path == target else
                                      f"{out_path}'s temporary file {path} would be {what}: refusing to overwrite it")
    if st is not None and stat.S_ISREG(st.st_mode) and st.st_size > 0 and not force:
        try:
            with open(target, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise ExportError(f"cannot read {out_path} to see whether it is a gemma3.c model file: {e.strerror} "
                              "(--force replaces it)")
        if magic != MAGIC:
            raise ExportError(f"{out_path} exists and is not a gemma3.c model file (no GM3C magic): refusing to replace "
                              "it (--force replaces it)")
    return out


def same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# ----------------------------------------------------------------------------
# interruption: SIGINT, SIGTERM and SIGHUP stop the export, its temporary files removed

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """One of STOP_SIGNALS arrived: unwinds like KeyboardInterrupt, through every cleanup."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def on_stop_signal(signum, frame):
    for s in STOP_SIGNALS:  # the first one stops the export; the cleanup runs undisturbed
        if signal.getsignal(s) is on_stop_signal:
            signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def catch_stop_signals():
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
            signal.signal(s, on_stop_signal)


def export(src_path, out, dtype_name, quiet=False, text_only=False, mmproj=None):
    """f32 / bf16: the checkpoint written straight into the output (its temporary file, or
    the FIFO or device), then put in place."""
    write_into(out, load(src_path, dtype_name, quiet, text_only=text_only, mmproj=mmproj), dtype_name, quiet)
    out.finish()


def write_into(out, src, dtype_name, quiet, label=None):
    """write_model into the output's stream (its temporary file, or the FIFO or device)."""
    try:
        raw = out.open_stream()
    except BaseException:
        src.close()
        raise
    with raw:
        write_model(src, raw, out.name, dtype_name, quiet, label)


def build_with_make(target, why, quiet, refresh=False):
    """Build one of the project's binaries (gemma3, tools/gguf_dequant) if it is missing;
    refresh: also when its source is newer (make decides; the old binary is used if make
    is not there)."""
    here = os.path.dirname(os.path.abspath(__file__))
    binary = os.path.join(here, target)
    exists = os.access(binary, os.X_OK)
    if not exists or refresh:
        if not exists and not quiet:
            print(f"building {target} ({why}) ...", file=sys.stderr)
        try:
            ok = subprocess.run(["make", "-s", "-C", here, target], stdout=subprocess.DEVNULL).returncode == 0
        except OSError:
            ok = False
        if not ok and not (exists and os.access(binary, os.X_OK)):
            raise ExportError(f"{why}: could not build {target}; run make {target} in {here}")
    return binary


def export_quantized(src_path, out, dtype_name, quiet, text_only=False, mmproj=None):
    """q8_0 / q4_0: export losslessly into the temporary file, then let the C engine
    quantize it (fast, no numpy) into the second one, which becomes the output."""
    t0 = time.time()
    if os.path.isdir(src_path):
        check_quantizable(read_config(src_path), dtype_name, os.path.join(src_path, "config.json"))
        lossless = "bf16" if all(t["dtype"] == "BF16" for t in find_tensors(src_path).values()) else "f32"
    else:
        lossless = "f32"  # a GGUF's dequantized values are float32; bf16 would round them
    engine = build_with_make("gemma3", "it does the quantization", quiet)
    write_into(out, load(src_path, lossless, quiet, dtype_name, text_only, mmproj), lossless, quiet,
               label=f"step 1 of 2, {lossless} export")
    source = out.hand_over()
    try:
        quantize_file(engine, source, out.fd, dtype_name, out.name, lossless, quiet)
    finally:
        os.close(source)  # (nameless: closing it frees its space)
    out.finish()
    if not quiet:
        print(f"wrote {out.name}: {os.path.getsize(out.target) / 1e6:.1f} MB, dtype {dtype_name}, "
              f"{time.time() - t0:.1f} s", file=sys.stderr)


def quantized_size(f, dtype_name):
    """The size gemma3 --quantize gives the model file f (open for reading): its layout
    (FORMAT.md) with every matrix row as n/32 blocks of 34 (q8_0) or 18 (q4_0) bytes."""
    f.seek(0)
    head = f.read(HEADER_SIZE)
    n, dir_off = struct.unpack_from("<I", head, 88)[0], struct.unpack_from("<Q", head, 112)[0]
    f.seek(dir_off)
    directory = f.read(n * DIR_ENTRY_SIZE)
    pos = pad_to(dir_off + n * DIR_ENTRY_SIZE)
    for i in range(n):
        ndim, rows, cols = struct.unpack_from("<3I", directory, i * DIR_ENTRY_SIZE + 68)
        nbytes = struct.unpack_from("<Q", directory, i * DIR_ENTRY_SIZE + 96)[0]
        if ndim == 2:
            nbytes = rows * (cols // QK) * (34 if dtype_name == "q8_0" else 18)
        pos = pad_to(pos + nbytes)
    return pos


def quantize_file(engine, source, dest, dtype_name, out_path, lossless, quiet):
    """gemma3 /dev/fd/SOURCE --quantize DTYPE - > DEST (descriptors: the lossless export, the
    output's temporary file), with a progress line of our own on a terminal (gemma3's shows
    only on its terminal, and its stderr is ours to read): the share of the output written
    so far. Its error line, if any, names the files the user knows."""
    show = not quiet and sys.stderr.isatty()
    src_path = f"/dev/fd/{source}"
    if not os.path.exists(src_path):
        raise ExportError(f"cannot quantize to {dtype_name} here: gemma3 reads the {lossless} export as {src_path}, "
                          "and this system has no /dev/fd")
    with os.fdopen(os.dup(source), "rb") as f:
        total = quantized_size(f, dtype_name)
        f.seek(0)  # (where /dev/fd/N is a dup, gemma3 shares this offset)
    if not quiet and not show:
        print(f"step 2 of 2, quantizing to {dtype_name} ...", file=sys.stderr)
    proc = None
    try:
        proc = subprocess.Popen([engine, src_path, "--quantize", dtype_name, "-"], stdout=dest,
                                stderr=subprocess.PIPE, pass_fds=(source,))
        while True:
            try:
                _, err = proc.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if show:
                    done = os.fstat(dest).st_size
                    print(f"\r  step 2 of 2, quantizing to {dtype_name}  {100.0 * min(done, total) / total:5.1f}%  "
                          f"{done / 1e6:9.1f} MB", end="", file=sys.stderr, flush=True)
    finally:  # (an interrupted export kills it; the caller removes its files)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    if show:
        print(f"\r  step 2 of 2, quantizing to {dtype_name}  100.0%  {total / 1e6:9.1f} MB", file=sys.stderr)
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        msg = lines[-1] if lines else f"gemma3 --quantize failed (exit status {proc.returncode})"
        if msg.startswith("gemma3: error: "):
            msg = "gemma3 --quantize: " + msg[len("gemma3: error: "):]
        raise ExportError(msg.replace("cannot write -:", f"cannot write {out_path}:")
                          .replace(src_path, f"the {lossless} export"))


# ----------------------------------------------------------------------------
# GGUF (llama.cpp's format): reading, with every count and offset checked against the file

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
# Metadata value types: number -> (struct format, size); 8 string, 9 array.
GGUF_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4),
                7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
GGUF_STRING, GGUF_ARRAY = 8, 9
GGUF_INT_TYPES = {0, 1, 2, 3, 4, 5, 10, 11}
GGUF_FLOAT_TYPES = {6, 12}

# ggml tensor types: number -> (name, values per block, bytes per block). The supported
# ones are those tools/gguf_dequant.c dequantizes; the rest are named in the error.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
}
GGML_OTHER_TYPES = {
    4: "Q4_2", 5: "Q4_3", 9: "Q8_1", 15: "Q8_K", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8", 36: "IQ4_NL_4_4", 37: "IQ4_NL_4_8", 38: "IQ4_NL_8_8",
}

# GGUF tensor names (llama.cpp's converter, Ollama) -> ours (HF names, prefix stripped).
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GGUF_SKIP_PREFIXES = ("v.", "mm.")  # the vision tower and projector Ollama keeps in the same file


class GGUFReader:
    """A cursor over the mapped file: each read checks that the bytes are there. (Slices
    of an mmap are bytes, copies: nothing keeps the mapping open after an error.)"""

    def __init__(self, path, buf):
        self.path, self.buf, self.pos, self.size = path, buf, 0, len(buf)

    def take(self, n, what):
        if n < 0 or n > self.size - self.pos:
            raise ExportError(f"{self.path}: truncated GGUF: {what} at byte {self.pos} needs {n} bytes, "
                              f"the file has {self.size - self.pos} left")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def scalar(self, fmt, size, what):
        return struct.unpack("<" + fmt, self.take(size, what))[0]

    def u32(self, what):
        return self.scalar("I", 4, what)

    def u64(self, what):
        return self.scalar("Q", 8, what)

    def string(self, what):
        n = self.u64(what + " length")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ExportError(f"{self.path}: {what} at byte {self.pos - n} is not valid UTF-8")

    def value(self, vtype, what):
        if vtype in GGUF_SCALARS:
            return self.scalar(*GGUF_SCALARS[vtype], what)
        if vtype == GGUF_STRING:
            return self.string(what)
        if vtype == GGUF_ARRAY:
            etype = self.u32(what + " element type")
            n = self.u64(what + " element count")
            if etype in GGUF_SCALARS:
                fmt, size = GGUF_SCALARS[etype]
                raw = self.take(n * size, f"{what} ({n} values)")
                return list(struct.unpack(f"<{n}{fmt}", raw))
            if etype == GGUF_STRING:
                if n > (self.size - self.pos) // 8:  # every string takes at least its 8-byte length
                    raise ExportError(f"{self.path}: truncated or corrupt GGUF: {what} claims {n} strings, "
                                      "more than the file can hold")
                return [self.string(f"{what}[{i}]") for i in range(n)]
            raise ExportError(f"{self.path}: {what} is an array of unsupported element type {etype}")
        raise ExportError(f"{self.path}: {what} has unknown value type {vtype}")


def read_gguf(path):
    """Parse a GGUF file's header, metadata and tensor table. Returns (version, metadata
    {key: (type, value)}, tensors {name: (type, dims fastest-first, absolute offset, bytes)})."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ExportError(f"cannot open {path}: {e.strerror}")
    with f:
        size = os.fstat(f.fileno()).st_size
        magic = f.read(4)
        if magic == MAGIC:
            raise ExportError(f"{path} is already a gemma3.c model file: export.py reads Hugging Face directories and "
                              f"GGUF files (to quantize it: ./gemma3 {path} --quantize q8_0|q4_0 OUT.bin)")
        if size < 4 or magic != GGUF_MAGIC:
            raise ExportError(f"{path} is not a GGUF file (bad magic) nor a Hugging Face directory")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        r = GGUFReader(path, buf)
        r.take(4, "magic")
        version = r.u32("version")
        if version in (2 << 24, 3 << 24):
            raise ExportError(f"{path} is a big-endian GGUF; only little-endian GGUF files are supported")
        if version not in (2, 3):
            raise ExportError(f"{path}: GGUF version {version} is not supported (versions 2 and 3 are)")
        n_tensors = r.u64("tensor count")
        n_kv = r.u64("metadata count")
        # each metadata entry takes at least 13 bytes, each tensor entry at least 24
        if n_kv > (size - r.pos) // 13 or n_tensors > (size - r.pos) // 24:
            raise ExportError(f"{path}: truncated or corrupt GGUF: the header claims {n_kv} metadata entries and "
                              f"{n_tensors} tensors, more than a {size}-byte file can hold")
        meta = {}
        for i in range(n_kv):
            key = r.string(f"metadata key {i}")
            vtype = r.u32(f"type of {label(key)}")
            if key in meta:
                raise ExportError(f"{path}: metadata key {short(key)} appears twice")
            meta[key] = (vtype, r.value(vtype, label(key)))
        tensors = {}
        for i in range(n_tensors):
            name = r.string(f"tensor {i} name")
            tn = label(name)
            n_dims = r.u32(f"tensor {tn} dimension count")
            if not 1 <= n_dims <= 4:
                raise ExportError(f"{path}: tensor {tn} has {n_dims} dimensions (1 to 4 allowed)")
            dims = [r.u64(f"tensor {tn} dimensions") for _ in range(n_dims)]
            ttype = r.u32(f"tensor {tn} type")
            offset = r.u64(f"tensor {tn} offset")
            if name in tensors:
                raise ExportError(f"{path}: tensor {short(name)} appears twice")
            tensors[name] = [ttype, dims, offset, None]
        align = gguf_meta(meta, "general.alignment", int, GGUF_DEFAULT_ALIGNMENT, path)
        if align <= 0 or align & (align - 1):
            raise ExportError(f"{path}: general.alignment {align} is not a power of two")
        data_start = pad_to(r.pos, align)
        for name, t in tensors.items():
            ttype, dims, offset, _ = t
            tn = label(name)
            count = 1
            for d in dims:
                count *= d
            if ttype not in GGML_TYPES:
                if name.startswith(GGUF_SKIP_PREFIXES):
                    t[2] = t[3] = None  # a vision tensor we skip: its type does not matter
                    continue
                tname = GGML_OTHER_TYPES.get(ttype, f"number {ttype}")
                raise ExportError(f"{path}: tensor {tn} has type {tname}, which export.py cannot read "
                                  f"(supported: {', '.join(n for n, _, _ in GGML_TYPES.values())})")
            tname, block_values, block_bytes = GGML_TYPES[ttype]
            if count == 0 or dims[0] % block_values:
                raise ExportError(f"{path}: tensor {tn} has dimensions {dims}, not whole {tname} blocks of {block_values}")
            nbytes = count // block_values * block_bytes
            if offset % align:
                raise ExportError(f"{path}: tensor {tn} data offset {offset} is not a multiple of the alignment {align}")
            if data_start + offset + nbytes > size:
                raise ExportError(f"{path}: tensor {tn} data ({nbytes} bytes at {data_start + offset}) lies past the "
                                  f"end of the file ({size} bytes)")
            t[2], t[3] = data_start + offset, nbytes
        return version, meta, {n: tuple(t) for n, t in tensors.items()}
    finally:
        buf.close()


def gguf_meta(meta, key, kind, default, path):
    """One metadata value as kind (int, float, str, or list for a per-layer array);
    default when absent (None: the key is required)."""
    if key not in meta:
        if default is None:
            raise ExportError(f"{path}: missing metadata {key}")
        return default
    vtype, v = meta[key]
    if kind is int and vtype in GGUF_INT_TYPES:
        return int(v)
    if kind is float and vtype in GGUF_FLOAT_TYPES | GGUF_INT_TYPES:
        return float(v)
    if kind is str and vtype == GGUF_STRING:
        return v
    if kind is list:
        return v if vtype == GGUF_ARRAY else [v]
    raise ExportError(f"{path}: metadata {key} has the wrong type ({vtype}) for {kind.__name__}")


def gguf_per_layer(meta, key, default, path):
    """A hyper-parameter that GGUF may store per layer (an array): Gemma 3's are equal in
    every layer, which is all gemma3.c supports."""
    if key in meta and meta[key][0] == GGUF_ARRAY:
        vals = meta[key][1]
        if not vals or any(not isinstance(v, int) or isinstance(v, bool) for v in vals) or len(set(vals)) != 1:
            raise ExportError(f"{path}: {key} varies per layer ({short(vals[:8])}); gemma3.c needs one value")
        return vals[0]
    return gguf_meta(meta, key, int, default, path)


def gguf_config(path, meta, tensors):
    """The header fields from the gemma3.* metadata. Where a key is absent, the value
    llama.cpp assumes (src/llama-model.cpp, LLM_ARCH_GEMMA3)."""
    arch = gguf_meta(meta, "general.architecture", str, None, path)
    if arch != "gemma3":
        raise ExportError(f"{path}: architecture {arch!r} is not gemma3")
    A = "gemma3."
    n_layers = gguf_meta(meta, A + "block_count", int, None, path)
    dim = gguf_meta(meta, A + "embedding_length", int, None, path)
    n_heads = gguf_per_layer(meta, A + "attention.head_count", None, path)
    n_kv = gguf_per_layer(meta, A + "attention.head_count_kv", n_heads, path)
    if not (0 < n_layers < 1 << 16 and 0 < dim < 1 << 24 and 0 < n_heads < 1 << 16 and 0 < n_kv <= n_heads):
        raise ExportError(f"{path}: implausible sizes (block_count {n_layers}, embedding_length {dim}, "
                          f"head_count {n_heads}, head_count_kv {n_kv})")
    if n_heads % n_kv:
        raise ExportError(f"{path}: head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
    head_dim = gguf_meta(meta, A + "attention.key_length", int, dim // n_heads, path)
    if gguf_meta(meta, A + "attention.value_length", int, head_dim, path) != head_dim:
        raise ExportError(f"{path}: attention.value_length differs from key_length; Gemma 3 has one head_dim")
    cfg = {
        "hidden_size": dim,
        # without the key: the rows of the first gate matrix
        "intermediate_size": gguf_per_layer(meta, A + "feed_forward_length",
                                            tensors.get("blk.0.ffn_gate.weight", (0, [0, None]))[1][-1], path),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": gguf_meta(meta, A + "context_length", int, None, path),
        "rms_norm_eps": gguf_meta(meta, A + "attention.layer_norm_rms_epsilon", float, None, path),
        # rope.freq_base is llama.cpp's key (absent: its default 10000), rope.global.freq_base Ollama's older one
        "rope_theta": gguf_meta(meta, A + "rope.freq_base", float,
                                gguf_meta(meta, A + "rope.global.freq_base", float, 10000.0, path), path),
        # llama.cpp fixes 10000 for the sliding layers; Ollama writes rope.local.freq_base
        "rope_local_base_freq": gguf_meta(meta, A + "rope.local.freq_base", float,
                                          gguf_meta(meta, A + "rope.freq_base_swa", float, 10000.0, path), path),
        "bos_token_id": 2,
    }
    # Attention scale: llama.cpp uses 1/sqrt(head_dim), except for the 27B shape
    # (62 layers), where it is 1/sqrt(n_embd / n_head) (integer division): in our header,
    # query_pre_attn_scalar 168 with head_dim 128 (gemma_pytorch's config).
    cfg["query_pre_attn_scalar"] = dim // n_heads if n_layers == 62 else head_dim

    # Sliding window: llama.cpp reads attention.sliding_window; without it (or 0) no layer
    # slides. The pattern: a global layer every 6th, unless attention.sliding_window_pattern
    # gives a period (llama.cpp's set_swa_pattern: layer i slides iff i % n < n - 1) or, as
    # Ollama writes it, one flag per layer (true = sliding).
    window = gguf_meta(meta, A + "attention.sliding_window", int, 0, path)
    pattern = meta.get(A + "attention.sliding_window_pattern")
    if window <= 0:
        cfg["is_global"] = [1] * n_layers
        window = cfg["max_position_embeddings"]
    elif pattern is not None and pattern[0] == GGUF_ARRAY:
        flags = pattern[1]
        if len(flags) != n_layers:
            raise ExportError(f"{path}: attention.sliding_window_pattern has {len(flags)} entries, block_count is {n_layers}")
        cfg["is_global"] = [0 if v else 1 for v in flags]
    else:
        n = gguf_meta(meta, A + "attention.sliding_window_pattern", int, 6, path)
        if n < 0:
            raise ExportError(f"{path}: attention.sliding_window_pattern {n} is negative")
        cfg["is_global"] = [0 if n == 0 or i % n < n - 1 else 1 for i in range(n_layers)]
    cfg["sliding_window"] = window

    # RoPE scaling, global layers only (llama.cpp keeps the sliding layers' scale at 1):
    # rope.scaling.factor (older files: rope.scale_linear), type linear unless it says none.
    kind = gguf_meta(meta, A + "rope.scaling.type", str, "linear", path)
    factor = gguf_meta(meta, A + "rope.scaling.factor", float,
                       gguf_meta(meta, A + "rope.scale_linear", float, 0.0, path), path)
    if kind == "none" or factor == 0.0:
        factor = 1.0
    elif kind != "linear":
        raise ExportError(f"{path}: rope scaling type {kind!r} is not supported (Gemma 3 uses linear)")
    if not factor > 0:
        raise ExportError(f"{path}: rope scaling factor {factor} is not positive")
    cfg["rope_factor"] = factor
    cap = gguf_meta(meta, A + "final_logit_softcapping", float, 0.0, path)
    if cap:
        raise ExportError(f"{path}: final_logit_softcapping={cap} is set, but Gemma 3 has no soft-capping "
                          "and gemma3.c does not implement it")
    for key, v in (("context_length", cfg["max_position_embeddings"]), ("feed_forward_length", cfg["intermediate_size"]),
                   ("key_length", head_dim), ("sliding_window", window)):
        if not 0 < v < 1 << 24:
            raise ExportError(f"{path}: implausible {key} {v}")
    check_config(cfg, path, GGUF_KEYS)
    return cfg


# Our config keys, as gguf_config's messages name them.
GGUF_KEYS = {
    "hidden_size": "gemma3.embedding_length", "intermediate_size": "gemma3.feed_forward_length",
    "num_hidden_layers": "gemma3.block_count", "num_attention_heads": "gemma3.attention.head_count",
    "num_key_value_heads": "gemma3.attention.head_count_kv", "head_dim": "gemma3.attention.key_length",
    "sliding_window": "gemma3.attention.sliding_window", "max_position_embeddings": "gemma3.context_length",
    "rms_norm_eps": "gemma3.attention.layer_norm_rms_epsilon", "rope_theta": "gemma3.rope.freq_base",
    "rope_local_base_freq": "gemma3.rope.local.freq_base", "rope_factor": "gemma3.rope.scaling.factor",
    "query_pre_attn_scalar": "the attention scale (from gemma3.attention.key_length)", "bos_token_id": "bos_token_id",
}


def gguf_tokenizer(path, meta):
    """The tokenizer section from tokenizer.ggml.* (SentencePiece vocabulary: pieces,
    scores, token types). Returns (bytes, special ids); (b"", {}) when there is none."""
    tokens = gguf_meta(meta, "tokenizer.ggml.tokens", list, [], path)
    if not tokens:
        return b"", {}
    model = gguf_meta(meta, "tokenizer.ggml.model", str, "llama", path)
    if model != "llama":
        print(f"export.py: warning: tokenizer.ggml.model is {model!r}, not SentencePiece ('llama', Gemma's): "
              "the export has no tokenizer (--logits works, -p and --encode do not)", file=sys.stderr)
        return b"", {}
    n = len(tokens)
    scores = gguf_meta(meta, "tokenizer.ggml.scores", list, [0.0] * n, path)
    ttypes = gguf_meta(meta, "tokenizer.ggml.token_type", list, [1] * n, path)
    if len(scores) != n or len(ttypes) != n:
        raise ExportError(f"{path}: tokenizer.ggml.scores / token_type have {len(scores)} / {len(ttypes)} entries, tokens {n}")
    # Each array of the type its entries are used as (a file may hold any type in any array).
    for key, arr, ok, what in (("tokens", tokens, lambda v: isinstance(v, str), "a string"),
                               ("scores", scores, is_number, "a finite number"),
                               ("token_type", ttypes, is_int, "an integer")):
        bad = next((i for i, v in enumerate(arr) if not ok(v)), None)
        if bad is not None:
            raise ExportError(f"{path}: tokenizer.ggml.{key}[{bad}] is {short(arr[bad])}, not {what}")
    # The pieces as tokenizer.json spells them: SentencePiece's space is U+2581 (llama.cpp's
    # converter writes the added runs of spaces, ids 138..167 in Gemma 3, with plain spaces).
    pieces = [t.replace(" ", "\u2581") for t in tokens]
    vocab = {}
    for i in range(n - 1, -1, -1):
        vocab[pieces[i]] = i  # a piece listed twice: the lowest id
    # GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    # Control, user-defined and unknown pieces are Hugging Face's added tokens (matched
    # literally in the text before BPE); control and unknown ones are marked special.
    types, added = {}, []
    for i, (p, t) in enumerate(zip(pieces, ttypes)):
        if t in (2, 3, 4) and p:
            types[i] = 2 if t == 4 else 3
            added.append(i)
        elif t == 6 and BYTE_PIECE.match(p):
            types[i] = 1
        else:
            types[i] = 0
    merges = derive_merges(pieces, vocab, scores, ttypes)
    return tokenizer_section(dict(enumerate(pieces)), types, added, merges)


def derive_merges(pieces, vocab, scores, ttypes):
    """BPE merges from a SentencePiece vocabulary, as Hugging Face's converter makes
    tokenizer.json's (transformers' generate_merges): every split of every piece into two
    pieces of the vocabulary is a merge, ranked by the piece's score (highest first),
    then by the lengths of the left and right parts in characters (longest first), then
    by the piece's id. Control and user-defined pieces score 0, as SentencePiece stores
    them (llama.cpp's converter writes -1000 for them instead). Returns the merges as one
    array of (left id, right id, merged id), in rank order. On Gemma 3 this reproduces
    tokenizer.json's 514,906 merges in order.

    Time and memory grow linearly with the vocabulary's characters (a piece of n characters
    has at most n - 1 merges), plus the sorts, whatever its pieces: a split is a prefix of
    the piece that is a piece, followed by a suffix that is a piece, and the chains of
    prefix_parents (over the pieces) and of suffix parents (over them reversed) list exactly
    those, each link once. No split is cut out and looked up."""
    strings = [p for p in vocab if p]  # each piece once (vocab holds its lowest id); "" is no part
    where = {p: u for u, p in enumerate(strings)}
    ids = [vocab[p] for p in strings]
    lengths = [len(p) for p in strings]
    pre = prefix_parents(strings)
    suf = prefix_parents([p[::-1] for p in strings])

    def splits(u):
        """The merges of strings[u]: (left length, left id, right id) for every split."""
        lefts = {}
        if suf[u] < 0:
            return []
        j = pre[u]
        while j >= 0:
            lefts[lengths[j]] = ids[j]
            j = pre[j]
        out = []
        n, k = lengths[u], suf[u]
        while k >= 0 and lefts:
            left = lefts.get(n - lengths[k])
            if left is not None:
                out.append((n - lengths[k], left, ids[k]))
            k = suf[k]
        return out

    # pieces by rank: score (highest first), then id; those of one score form a group
    ranked = []
    for i, p in enumerate(pieces):
        if len(p) >= 2:
            ranked.append((-(0.0 if ttypes[i] in (3, 4) else float(scores[i])), i))
    ranked.sort()
    merges = array.array("I")
    g = 0
    while g < len(ranked):
        h = g + 1
        while h < len(ranked) and ranked[h][0] == ranked[g][0]:
            h += 1
        # inside a group: by left length, then right length (longest first), then id; a
        # piece's own splits all differ in left length. Longest pieces first into buckets
        # by left length gives that order in each bucket.
        if h == g + 1:  # a score of its own (most pieces): its splits by left length
            i = ranked[g][1]
            m = vocab[pieces[i]]
            for n_left, a, b in reversed(splits(where[pieces[i]])):
                merges.extend((a, b, m))
            g = h
            continue
        group = sorted((-len(pieces[i]), i) for _, i in ranked[g:h])
        buckets = {}
        for _, i in group:
            m = vocab[pieces[i]]
            for n_left, a, b in splits(where[pieces[i]]):
                buckets.setdefault(n_left, array.array("I")).extend((a, b, m))
        for n_left in sorted(buckets, reverse=True):
            merges.extend(buckets.pop(n_left))
        g = h
    return merges


def prefix_parents(strings):
    """For each string, the index of its longest proper prefix among the (distinct)
    strings, or -1. Sorted, the strings that are prefixes of the current one are a stack:
    all that start it, each a prefix of the next (a prefix sorts first, and everything
    between it and the string starts with it)."""
    parent = [-1] * len(strings)
    stack = []
    for u in sorted(range(len(strings)), key=strings.__getitem__):
        s = strings[u]
        while stack and not s.startswith(strings[stack[-1]]):
            stack.pop()
        if stack:
            parent[u] = stack[-1]
        stack.append(u)
    return parent


class Dequantizer:
    """tools/gguf_dequant run once for the whole file: the jobs go to its stdin, the
    values come back on its stdout, tensor after tensor, read in pieces of 4 MiB."""

    def __init__(self, path, jobs, quiet):
        binary = build_with_make("tools/gguf_dequant", "it dequantizes GGUF tensors", quiet, refresh=True)
        self.proc = subprocess.Popen([binary, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        try:
            self.proc.stdin.write("".join(jobs).encode())
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # it stopped at once; read() reports its error line
        except BaseException:  # interrupted: no Source will close it
            self.close()
            raise

    def read(self, nbytes, name):
        while nbytes > 0:
            chunk = self.proc.stdout.read(min(nbytes, 4 << 20))
            if not chunk:
                self.proc.wait()
                msg = self.proc.stderr.read().decode(errors="replace").strip()
                raise ExportError(f"tensor {name}: " + (msg.splitlines()[-1] if msg else "gguf_dequant stopped early"))
            nbytes -= len(chunk)
            yield chunk

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


def plan_gguf(path, dtype_name, quiet, quant=None):
    """Everything load_gguf learns from the file before its tensors are read: (config,
    vocab size, tokenizer section, special ids, dequantizer jobs, the output tensors as
    (name, HF shape, dtype, bytes, GGUF name)). Every value is checked here."""
    version, meta, tensors = read_gguf(path)
    if "token_embd.weight" not in tensors:
        raise ExportError(f"{path}: missing tensor token_embd.weight")
    emb = tensors["token_embd.weight"][1]
    if len(emb) != 2:
        raise ExportError(f"{path}: tensor token_embd.weight has dimensions {emb}, expected [hidden, vocab]")
    vocab = emb[1]  # the converter may cut unused rows: the tensor is the truth
    cfg = gguf_config(path, meta, tensors)
    if quant:
        check_quantizable(cfg, quant, path)
    D = cfg["hidden_size"]

    # Our names and HF shapes, GGUF names. GGUF lists dimensions fastest-first (ne0 =
    # columns): HF [rows, cols] is GGUF [cols, rows].
    n_layers = cfg["num_hidden_layers"]
    if len(tensors) < 2 + 13 * n_layers:  # too few tensors for block_count: say so before listing them all
        names = (n for i in range(-1, n_layers + 1) for n in
                 (["token_embd.weight"] if i < 0 else ["output_norm.weight"] if i == n_layers else
                  [f"blk.{i}.{g}.weight" for g in GGUF_LAYER_NAMES]))
        raise ExportError(f"{path}: missing tensor {next((n for n in names if n not in tensors), '?')} (block_count "
                          f"{n_layers} needs {2 + 13 * n_layers} tensors, the file has {len(tensors)})")
    wanted = [("embed_tokens.weight", [vocab, D], "token_embd.weight")]
    for i in range(cfg["num_hidden_layers"]):
        hf = dict(LAYER_TENSORS)
        for g, ours in GGUF_LAYER_NAMES.items():
            wanted.append((f"layers.{i}.{ours}.weight", hf[ours + ".weight"](cfg), f"blk.{i}.{g}.weight"))
    wanted.append(("norm.weight", [D], "output_norm.weight"))
    known = {g for _, _, g in wanted} | {"output.weight"}
    for name in tensors:
        if name not in known and not name.startswith(GGUF_SKIP_PREFIXES):
            raise ExportError(f"{path}: unknown tensor {short(name)} (not part of a gemma3 text model with "
                              f"{cfg['num_hidden_layers']} blocks)")
    missing = [g for _, _, g in wanted if g not in tensors]
    if missing:
        raise ExportError(f"{path}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for ours, shape, g in wanted:
        if tensors[g][1] != shape[::-1]:
            raise ExportError(f"{path}: tensor {g} has dimensions {tensors[g][1]}, expected {shape[::-1]}")
    # An untied classifier: output.weight becomes lm_head.weight, unless it is the embedding
    # table again, byte for byte (then the file stays tied, and half the size).
    if "output.weight" in tensors:
        out, embt = tensors["output.weight"], tensors["token_embd.weight"]
        if out[1] != emb:
            raise ExportError(f"{path}: tensor output.weight has dimensions {out[1]}, expected {emb}")
        if not (out[0] == embt[0] and same_bytes(path, out[2], embt[2], out[3])):
            wanted.append(("lm_head.weight", [vocab, D], "output.weight"))

    tok_bytes, special = gguf_tokenizer(path, meta)
    # Where the vocabulary does not name them, the ids tokenizer.ggml.* gives, then Gemma 3's.
    for piece, key in (("<bos>", "bos_token_id"), ("<eos>", "eos_token_id"), ("<end_of_turn>", "eot_token_id")):
        if special.get(piece) is None and f"tokenizer.ggml.{key}" in meta:
            special[piece] = gguf_meta(meta, f"tokenizer.ggml.{key}", int, None, path)
    special_ids(special, cfg, vocab)  # before any work

    keep = dtype_name == "gguf"  # the matrices' own blocks, copied
    out_dtype = None if keep else DTYPE_CODES[dtype_name]
    jobs, plan = [], []
    for ours, shape, g in wanted:
        ttype, dims, offset, nbytes = tensors[g]
        count = 1
        for d in shape:
            count *= d
        if keep and len(shape) == 2:
            dt = {0: DTYPE_F32, 30: DTYPE_BF16}.get(ttype, DTYPE_GGML + ttype)
            plan.append((ours, shape, dt, nbytes, g, offset))  # rows are whole blocks (read_gguf checked)
            # its values decoded only to be checked: a NaN or infinite scale (d, dmin) or
            # F16/BF16/F32 value is refused as the other dtypes refuse it
            jobs.append(f"{offset} {ttype} {count} check 0\n")
            continue
        dt = out_dtype if len(shape) == 2 else DTYPE_F32
        norm = len(shape) == 1  # stored as 1 + w
        jobs.append(f"{offset} {ttype} {count} {'bf16' if dt == DTYPE_BF16 else 'f32'} {1 if norm else 0}\n")
        plan.append((ours, shape, dt, count * ELEM_SIZE[dt], g, None))
    if not quiet:
        general = {k: meta[k][1] for k in ("general.name", "general.size_label", "general.finetune") if k in meta}
        types = sorted({GGML_TYPES[tensors[g][0]][0] for _, _, g in wanted})
        name = " ".join(str(v) for v in general.values())
        print(f"{os.path.basename(path)}: GGUF v{version}, {name + ', ' if name else ''}"
              f"tensor types {', '.join(types)}", file=sys.stderr)
        if cfg["num_hidden_layers"] in (34, 48, 62) and cfg["rope_factor"] == 1.0:
            print("note: no rope.scaling metadata; Gemma 3 4B/12B/27B use linear scaling 8 on global layers, "
                  "but like llama.cpp this export uses none", file=sys.stderr)
        quantized = sorted({GGML_TYPES[tensors[g][0]][0] for _, shape, g in wanted if len(shape) == 2}
                           - {"F32", "F16", "BF16"})
        if quant and quantized:
            print(f"note: {os.path.basename(path)} is already quantized ({', '.join(quantized)}): {quant} quantizes "
                  f"its dequantized values again, and the errors add up; --dtype f32 keeps the file's own values",
                  file=sys.stderr)
    return cfg, vocab, tok_bytes, special, jobs, plan


def copy_bytes(path, offset, nbytes):
    """The nbytes at offset in the file, in pieces of 4 MiB: a kept GGUF tensor."""
    with open(path, "rb") as f:
        f.seek(offset)
        while nbytes > 0:
            chunk = f.read(min(nbytes, 4 << 20))
            if not chunk:
                raise ExportError(f"{path}: file ended early (truncated while being read?)")
            nbytes -= len(chunk)
            yield chunk


def kept_bytes(deq, name, path, offset, nbytes):
    """A kept GGUF tensor's own bytes, once the dequantizer's check job (its one byte) says
    that none of its values is a NaN or an infinity."""
    for _ in deq.read(1, name):
        pass
    yield from copy_bytes(path, offset, nbytes)


def load_gguf(path, dtype_name, quiet, quant=None):
    cfg, vocab, tok_bytes, special, jobs, plan = plan_gguf(path, dtype_name, quiet, quant)
    deq = Dequantizer(path, jobs, quiet)
    # the dequantizer's values come in job order: the tensors are written in plan order
    tensors_out = [(ours, shape, dt, nb, lambda nb=nb, g=g, off=off: kept_bytes(deq, g, path, off, nb) if off is not None
                    else deq.read(nb, g)) for ours, shape, dt, nb, g, off in plan]
    try:
        return Source(cfg, vocab, tok_bytes, special, tensors_out, close=deq.close)
    except BaseException:
        deq.close()
        raise


# ----------------------------------------------------------------------------
# llama.cpp's mmproj GGUF: the vision tower and projector of a Gemma 3 text GGUF, in a file
# of its own (convert_hf_to_gguf.py --mmproj; ggml-org's gemma-3-*-GGUF), read into the same
# vision section and tensors as a Hugging Face checkpoint's

MMPROJ_LAYER_NAMES = {"layer_norm1": "ln1", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                      "self_attn.v_proj": "attn_v", "self_attn.out_proj": "attn_out", "layer_norm2": "ln2",
                      "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
MMPROJ_NAMES = {"embeddings.patch_embedding": "v.patch_embd", "embeddings.position_embedding": "v.position_embd",
                "post_layernorm": "v.post_ln"}


def mmproj_name(name):
    """The mmproj GGUF's name of one of our vision tensors (FORMAT.md's names)."""
    if name == PROJECTOR + "mm_soft_emb_norm.weight":
        return "mm.soft_emb_norm.weight"
    if name == PROJECTOR + "mm_input_projection_weight":
        return "mm.input_projection.weight"
    stem, kind = name[len(VISION_TOWER):].rsplit(".", 1)
    if stem.startswith("encoder.layers."):
        _, _, i, module = stem.split(".", 3)
        return f"v.blk.{i}.{MMPROJ_LAYER_NAMES[module]}.{kind}"
    return f"{MMPROJ_NAMES[stem]}.{kind}"


def mmproj_config(path, meta, vocab, image_ids):
    """The vision hyper-parameters of a Gemma 3 mmproj GGUF (clip.vision.*), checked as
    read_vision_config checks a config.json's; image_ids: the text GGUF's image, boi, eoi."""
    arch = gguf_meta(meta, "general.architecture", str, None, path)
    kind = gguf_meta(meta, "clip.projector_type", str, "", path) or gguf_meta(meta, "clip.vision.projector_type",
                                                                                str, "", path)
    if arch != "clip" or kind != "gemma3":
        raise ExportError(f"{path}: not a Gemma 3 mmproj file (architecture {short(arch)}, projector type "
                          f"{short(kind)}; wanted clip and gemma3)")
    vc = {"hidden_act": "gelu_pytorch_tanh", "num_channels": 3}
    for ours, key in (("image_size", "image_size"), ("patch_size", "patch_size"), ("hidden_size", "embedding_length"),
                      ("intermediate_size", "feed_forward_length"), ("num_hidden_layers", "block_count"),
                      ("num_attention_heads", "attention.head_count")):
        vc[ours] = gguf_meta(meta, "clip.vision." + key, int, None, path)
        if not 1 <= vc[ours] <= MAX_DIM:
            raise ExportError(f"{path}: clip.vision.{key} is {vc[ours]}, not in 1..{MAX_DIM}")
    vc["layer_norm_eps"] = gguf_meta(meta, "clip.vision.attention.layer_norm_epsilon", float, 1e-6, path)
    if not 0 <= vc["layer_norm_eps"] < 1:
        raise ExportError(f"{path}: clip.vision.attention.layer_norm_epsilon {vc['layer_norm_eps']} is not in [0, 1)")
    scale = gguf_meta(meta, "clip.vision.projector.scale_factor", int, 4, path)  # patches a pooled token is wide
    side = vc["image_size"] // vc["patch_size"]
    if not 1 <= scale <= side or side % scale:
        raise ExportError(f"{path}: clip.vision.projector.scale_factor {scale} does not divide {side} patches a side")
    vc["mm_tokens_per_image"] = (side // scale) ** 2
    vc["image_token_index"], vc["boi_token_index"], vc["eoi_token_index"] = image_ids
    for k in ("image_token_index", "boi_token_index", "eoi_token_index"):
        if vc[k] >= vocab:
            raise ExportError(f"{path}: the text model's vocabulary of {vocab} has no {k} {vc[k]} (Gemma 3 4B+ has 262208)")
    for k in ("image_mean", "image_std"):
        v = gguf_meta(meta, "clip.vision." + k, list, [0.5] * 3, path)
        if not (len(v) == 3 and all(is_number(x) and -1e3 < x < 1e3 for x in v) and (k == "image_mean" or min(v) > 0)):
            raise ExportError(f"{path}: clip.vision.{k} is {short(v)}, not three numbers (std > 0)")
        vc["mean" if k == "image_mean" else "std"] = [float(x) for x in v]
    if vc["image_size"] % vc["patch_size"] or vc["hidden_size"] % vc["num_attention_heads"]:
        raise ExportError(f"{path}: inconsistent vision sizes (image_size {vc['image_size']}, patch_size "
                          f"{vc['patch_size']}, embedding_length {vc['hidden_size']}, head_count "
                          f"{vc['num_attention_heads']})")
    return vc


IMAGE_PIECES = ("<image_soft_token>", "<start_of_image>", "<end_of_image>")


def add_mmproj(src, path, dtype_name, quiet, text_path):
    """Give src (the text GGUF's at text_path) the vision section and tensors of the mmproj
    GGUF at path. Its values come through tools/gguf_dequant like the text's; mm.soft_emb_norm
    is stored as 1 + w (llama.cpp adds 1), the other norms as they are. The image token ids
    are the text GGUF's pieces (Gemma 3's 262144, 255999, 256000 where it has no tokenizer)."""
    _, text_meta, _ = read_gguf(text_path)
    pieces = gguf_meta(text_meta, "tokenizer.ggml.tokens", list, [], text_path)
    found = {p: i for i, p in reversed(list(enumerate(pieces))) if p in IMAGE_PIECES}
    image_ids = [found.get(p, d) for p, d in zip(IMAGE_PIECES, (262144, 255999, 256000))]
    _, meta, tensors = read_gguf(path)
    vc = mmproj_config(path, meta, src.vocab, image_ids)
    wanted = [(name, shape, file_shape, mmproj_name(name))
              for name, shape, file_shape in expected_vision_tensors(vc, src.cfg["hidden_size"])]
    known = {g for _, _, _, g in wanted}
    for g in tensors:
        if g not in known:
            raise ExportError(f"{path}: unknown tensor {short(g)} (not part of a {vc['num_hidden_layers']}-layer Gemma 3 "
                              "vision tower and projector)")
    jobs, plan = [], []
    for name, shape, file_shape, g in wanted:
        if g not in tensors:
            raise ExportError(f"{path}: missing tensor {g}")
        ttype, dims, offset, _ = tensors[g]
        if dims != shape[::-1]:
            raise ExportError(f"{path}: tensor {g} has dimensions {dims}, expected {shape[::-1]}")
        dt = DTYPE_CODES[dtype_name] if len(file_shape) == 2 else DTYPE_F32
        count = math.prod(shape)
        jobs.append(f"{offset} {ttype} {count} {'bf16' if dt == DTYPE_BF16 else 'f32'} "
                    f"{1 if g == 'mm.soft_emb_norm.weight' else 0}\n")
        plan.append((name, shape, file_shape, dt, count * ELEM_SIZE[dt], g))
    deq = Dequantizer(path, jobs, quiet)

    def chunks(nb, g, dt, shape, flip):
        if not flip:
            return deq.read(nb, g)
        return iter([transposed(b"".join(deq.read(nb, g)), shape[0], shape[1], ELEM_SIZE[dt])])
    src.tensors = src.tensors + [
        (name, file_shape, dt, nb, lambda nb=nb, g=g, dt=dt, shape=shape: chunks(nb, g, dt, shape, g.startswith("mm.input")))
        for name, shape, file_shape, dt, nb, g in plan]
    src.vision = vision_section(vc)
    text_close = src.close

    def close():
        try:
            text_close()
        finally:
            deq.close()
    src.close = close
    return src


def same_bytes(path, a, b, n):
    """Whether the n bytes at offsets a and b of the file are equal (read 16 MiB at a time)."""
    with open(path, "rb") as f:
        for pos in range(0, n, 16 << 20):
            k = min(16 << 20, n - pos)
            f.seek(a + pos)
            x = f.read(k)
            f.seek(b + pos)
            if x != f.read(k):
                return False
    return True


# ----------------------------------------------------------------------------
# MLX checkpoints (what `mlx_lm convert -q` writes): a Hugging Face directory whose
# quantized matrices are each a packed uint32 `weight` with `scales` (and, in mode affine,
# `biases`)

# mlx.core.quantize's modes: "affine", with the bits per value and values per scale it
# offers; and the floating-point ones, each with its one width, group size and scale type.
MLX_BITS = (1, 2, 3, 4, 5, 6, 8)
MLX_GROUP_SIZES = (32, 64, 128)
MLX_FP_MODES = {"mxfp4": (4, 32, "e8m0"), "nvfp4": (4, 16, "e4m3"), "mxfp8": (8, 32, "e8m0")}
MLX_PARAM_KEYS = ("group_size", "bits", "mode")


def mlx_params(q, where, default=None):
    """(mode, bits, group_size) from a quantization object of config.json: the top-level
    one, or a module's entry, whose absent keys are the top level's (default)."""
    mode = q.get("mode", default[0] if default else "affine")
    if isinstance(mode, str) and mode in MLX_FP_MODES:
        want = MLX_FP_MODES[mode][:2]
        bits, group = q.get("bits", want[0]), q.get("group_size", want[1])
        if (bits, group) != want or not (is_int(bits) and is_int(group)):
            raise ExportError(f"{where}: mode {mode} packs {want[0]}-bit values in groups of {want[1]}, "
                              f"not bits {short(bits)}, group_size {short(group)}")
        return mode, bits, group
    if mode != "affine":
        raise ExportError(f"{where}.mode {short(mode)} is unknown (MLX's modes: affine, {', '.join(MLX_FP_MODES)})")
    bits = q.get("bits", default[1] if default else None)
    group = q.get("group_size", default[2] if default else None)
    if not (is_int(bits) and bits in MLX_BITS):
        raise ExportError(f"{where}.bits {short(bits)} is not one of MLX's affine widths "
                          f"({', '.join(map(str, MLX_BITS))})")
    if not (is_int(group) and group in MLX_GROUP_SIZES):
        raise ExportError(f"{where}.group_size {short(group)} is not one of MLX's affine group sizes "
                          f"({', '.join(map(str, MLX_GROUP_SIZES))})")
    return mode, bits, group


def mlx_quantization(hf_dir):
    """How config.json says the matrices are quantized, as mlx_lm writes it: `quantization`
    (copied to `quantization_config`; mlx_lm also looks in text_config) holds group_size,
    bits and mode for every matrix, plus entries by module name (the tensor's name without
    .weight) that override them or, false, leave that module unquantized (mlx_lm's mixed
    recipes). Returns ((mode, bits, group_size), {canonical module name: (mode, bits,
    group_size) or None}), or (None, {}) when the config names no quantization."""
    path = os.path.join(hf_dir, "config.json")
    raw = read_json(path, "config.json", 1 << 20)
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    q = key = None
    for obj, prefix in ((raw, ""), (text, "text_config.")):
        for k in ("quantization", "quantization_config"):
            if obj.get(k) is not None and q is None:
                q, key = obj[k], prefix + k
    if q is None:
        return None, {}
    where = f"{path}: {key}"
    if not isinstance(q, dict):
        raise ExportError(f"{where} is {short(q)}, not an object")
    if "quant_method" in q:  # Hugging Face's (GPTQ, AWQ, bitsandbytes, fp8, ...), not MLX's
        raise ExportError(f"{where}.quant_method {short(q['quant_method'])} is not supported (export.py reads "
                          "unquantized checkpoints and MLX's quantization)")
    default = mlx_params(q, where)
    modules = {}
    for name, entry in q.items():
        if name in MLX_PARAM_KEYS:
            continue
        if (name + ".").startswith(SKIP_PREFIXES):
            continue  # the vision half's modules: skipped like their tensors
        canon = next((name[len(p):] for p in TEXT_PREFIXES if name.startswith(p)), None)
        if name in ("lm_head", "language_model.lm_head"):
            canon = "lm_head"
        if canon is None:
            raise ExportError(f"{where} names {short(name)}, which is not a module of the text model")
        if entry is False:
            modules[canon] = None
        elif entry is True:
            modules[canon] = default
        elif isinstance(entry, dict):
            modules[canon] = mlx_params(entry, f"{where}.{label(name)}", default)
        else:
            raise ExportError(f"{where}.{label(name)} is {short(entry)}, not an object, true or false")
    return default, modules


def mlx_matrices(hf_dir, cfg, found):
    """Match an MLX checkpoint's packed matrices with its config.json: each module with
    .scales is quantized, with the mode, bits and group size its config entry (or the top
    level) gives. Its .scales and .biases leave `found`, and its .weight gets the
    logical [rows, cols] shape and an "mlx" entry (mode, bits, group size, scales, biases
    or None) for load_hf. Every shape, type and claim is checked here, before any work.
    Returns the (mode, bits, group size) of the packed matrices, sorted, without repeats."""
    path = os.path.join(hf_dir, "config.json")
    default, modules = mlx_quantization(hf_dir)
    # the embedding's and a stored classifier's rows (vocab) are their tensors'
    cols = {"embed_tokens": cfg["hidden_size"], "lm_head": cfg["hidden_size"]}
    rows = {"embed_tokens": None, "lm_head": None}
    for i in range(cfg["num_hidden_layers"]):
        for name, shape in LAYER_TENSORS:
            if len(shape(cfg)) == 2:
                m = f"layers.{i}.{name[:-len('.weight')]}"
                rows[m], cols[m] = shape(cfg)
    for m in modules:
        if m not in cols:
            raise ExportError(f"{path}: quantization names {short(m)}, which is not a matrix of the text model")
    packed_types = set()
    for m in cols:
        w, sc, bi = (found.get(f"{m}.{t}") for t in ("weight", "scales", "biases"))
        entry = modules.get(m, default)
        if sc is None and bi is None:
            if w is not None and w["dtype"] not in ST_FLOATS:
                raise ExportError(f"tensor {m}.weight is packed ({w['dtype']}) but there is no {m}.scales")
            if m in modules and entry is not None and w is not None:
                raise ExportError(f"{path}: quantization gives {m} {entry[1]} bits in groups of {entry[2]}, "
                                  f"but {m}.weight is {w['dtype']} with no scales")
            continue  # a float matrix (mlx_lm leaves those whose rows the groups do not divide)
        if default is None:
            raise ExportError(f"tensor {m}.scales: {m} is quantized, but {path} has no quantization "
                              "(mlx_lm writes its bits and group_size there)")
        if entry is None:
            raise ExportError(f"{path}: quantization marks {m} unquantized, but it has {m}.scales")
        mode, bits, group = entry
        affine = mode == "affine"
        for t, info in (("weight", w), ("scales", sc), ("biases", bi)) if affine else (("weight", w), ("scales", sc)):
            if info is None:
                raise ExportError(f"missing tensor {m}.{t} (an MLX {mode} matrix is weight, scales"
                                  f"{' and biases' if affine else ''})")
        if not affine and bi is not None:
            raise ExportError(f"tensor {m}.biases: quantization mode {mode} has no biases")
        r, c = rows[m] if rows[m] is not None else (w["shape"] or [0])[0], cols[m]
        if c % group:
            raise ExportError(f"{path}: quantization group_size {group} does not divide the rows of {m} ({c} values)")
        if w["dtype"] != "U32" or w["shape"] != [r, c * bits // 32]:
            raise ExportError(f"tensor {m}.weight is {w['dtype']} {short(w['shape'])}, expected U32 "
                              f"[{r}, {c * bits // 32}] ({r} rows of {c} {bits}-bit values packed in 32-bit words)")
        for t, info in (("scales", sc), ("biases", bi)) if affine else (("scales", sc),):
            if (info["dtype"] not in ST_FLOATS if affine else info["dtype"] != "U8") or info["shape"] != [r, c // group]:
                raise ExportError(f"tensor {m}.{t} is {info['dtype']} {short(info['shape'])}, expected "
                                  f"{'a float type' if affine else 'U8'} and [{r}, {c // group}] (one per group of "
                                  f"{group} values)")
        found[f"{m}.weight"] = dict(w, shape=[r, c], mlx=(mode, bits, group, sc, bi))
        del found[f"{m}.scales"]
        found.pop(f"{m}.biases", None)
        packed_types.add(entry)
    if default is not None and not packed_types:
        raise ExportError(f"{path}: quantization says the matrices are {default[1]}-bit ({default[0]}) in groups of "
                          f"{default[2]}, but no tensor is quantized (none has .scales)")
    for name, info in found.items():
        if info["dtype"] not in ST_FLOATS and "mlx" not in info:
            raise ExportError(f"tensor {short(name)} has dtype {info['dtype']}, which only an MLX matrix's packed "
                              "weight and scales have")
    return sorted(packed_types)


def same_matrix(a, b):
    """Whether two matrices found in the checkpoint hold the same values: the same type,
    shape and (MLX) quantization, and the same bytes in each of their tensors."""
    if a["dtype"] != b["dtype"] or a["shape"] != b["shape"] or a.get("mlx", ())[:3] != b.get("mlx", ())[:3]:
        return False
    parts_a = [a] + [t for t in a.get("mlx", ())[3:] if t]
    parts_b = [b] + [t for t in b.get("mlx", ())[3:] if t]
    if len(parts_a) != len(parts_b):
        return False
    for x, y in zip(parts_a, parts_b):
        if x["dtype"] != y["dtype"] or x["nbytes"] != y["nbytes"]:
            return False
        with open(x["file"], "rb") as fx, open(y["file"], "rb") as fy:
            fx.seek(x["offset"])
            fy.seek(y["offset"])
            for pos in range(0, x["nbytes"], 16 << 20):
                n = min(16 << 20, x["nbytes"] - pos)
                if fx.read(n) != fy.read(n):
                    return False
    return True


MLX_JOB_TYPES = {"BF16": "bf16", "F16": "f16", "F32": "f32"}


class MlxDequantizer(Dequantizer):
    """tools/mlx_dequant run once for the whole checkpoint, like gguf_dequant: the packed
    matrices' jobs go to its stdin, their values come back on its stdout in that order."""

    def __init__(self, files, jobs, quiet):
        binary = build_with_make("tools/mlx_dequant", "it unpacks MLX's quantized matrices", quiet, refresh=True)
        self.proc = subprocess.Popen([binary, *files], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        try:
            self.proc.stdin.write("".join(jobs).encode())
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # it stopped at once; read() reports its error line


def mlx_job(info, dt, files):
    """The tools/mlx_dequant job line of a packed matrix (files: the shard paths, by index)."""
    mode, bits, group, sc, bi = info["mlx"]
    index = {f: i for i, f in enumerate(files)}
    rows, cols = info["shape"]
    stype = MLX_JOB_TYPES[sc["dtype"]] if mode == "affine" else MLX_FP_MODES[mode][2]
    biases = f"{index[bi['file']]} {bi['offset']} {MLX_JOB_TYPES[bi['dtype']]}" if bi else "-1 0 -"
    return (f"{mode} {rows} {cols} {bits} {group} {'bf16' if dt == DTYPE_BF16 else 'f32'} "
            f"{index[info['file']]} {info['offset']} {index[sc['file']]} {sc['offset']} {stype} {biases}\n")


def main():
    ap = argparse.ArgumentParser(description="Export a Gemma 3 checkpoint (Hugging Face or MLX directory, or GGUF "
                                             "file) to a gemma3.c model file.")
    ap.add_argument("src", metavar="HF_DIR|MLX_DIR|MODEL.gguf",
                    help="directory with config.json, *.safetensors and (optionally) tokenizer.json, as Hugging Face "
                         "or mlx_lm (quantized or not) write it; or a GGUF file of architecture gemma3 (llama.cpp, "
                         "Ollama)")
    ap.add_argument("out", metavar="OUT", help="output model file, e.g. gemma3-1b.bin, written as .OUT.gemma3-export.tmp beside it "
                                "and renamed when whole (a symlink: its target; a FIFO or character device: "
                                "written directly)")
    ap.add_argument("--dtype", choices=sorted(DTYPE_CODES) + ["gguf", "q4_0", "q8_0"], default="bf16",
                    help="weight type of the matrices (norms stay f32); default bf16. q8_0 / q4_0: "
                         "int8 / int4 in blocks of 32 with a half-precision scale, made by gemma3 --quantize. "
                         "From a GGUF or a quantized MLX checkpoint, f32 keeps the dequantized values exactly; "
                         "from a GGUF, gguf keeps each matrix's own blocks (Q4_K, Q6_K, ...) as they are, at the GGUF's size")
    ap.add_argument("--text-only", action="store_true",
                    help="leave out the vision tower and projector of a multimodal checkpoint")
    ap.add_argument("--mmproj", metavar="MMPROJ.gguf",
                    help="with a GGUF: llama.cpp's mmproj file of the same Gemma 3 4B+ model (its vision tower and "
                         "projector), kept in the output")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    ap.add_argument("--force", action="store_true",
                    help="replace OUT even if it exists and is not a gemma3.c model file (without it, such a file "
                         "is refused; an input or export.py's own files are refused always)")
    args = ap.parse_args()
    catch_stop_signals()
    out = None
    quant = args.dtype if args.dtype in ("q8_0", "q4_0") else None
    try:
        if args.dtype == "gguf" and os.path.isdir(args.src):
            raise ExportError(f"--dtype gguf keeps a GGUF file's own blocks; {args.src} is a directory "
                              f"(choose f32, bf16, q8_0 or q4_0 for a Hugging Face or MLX checkpoint)")
        try:
            out = check_output(args.src, args.out, args.force, quant, args.mmproj)
            out.begin()
            if quant:
                export_quantized(args.src, out, args.dtype, args.quiet, args.text_only, args.mmproj)
            else:
                export(args.src, out, args.dtype, args.quiet, args.text_only, args.mmproj)
        finally:
            if out is not None:
                out.abort()  # (nothing left to do after finish)
    except ExportError as e:
        print(f"export.py: error: {error_line(e)}", file=sys.stderr)
        sys.exit(1)
    except MemoryError:
        print("export.py: error: out of memory", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # cannot write the output (no such directory, disk full, a FIFO's reader gone, ...)
        print(f"export.py: error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, Interrupted) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"export.py: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        sys.exit(128 + signum)


if __name__ == "__main__":
    main()
