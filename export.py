#!/usr/bin/env python3
"""Export a Gemma 3 checkpoint (Hugging Face or MLX directory, or GGUF file) to the flat gemma3.c model file.

    python3 export.py HF_DIR|MLX_DIR OUT.bin [--dtype f32|bf16|q8_0|q4_0]
    python3 export.py MODEL.gguf OUT.bin [--dtype f32|bf16|q8_0|q4_0]

HF_DIR holds config.json, model.safetensors (or model-*-of-*.safetensors plus
model.safetensors.index.json) and, optionally, tokenizer.json. Both the text-only
layout (Gemma3ForCausalLM: 270M, 1B) and the multimodal one
(Gemma3ForConditionalGeneration: 4B, 12B, 27B, config under "text_config") are read;
vision tensors are skipped. The output format is described in FORMAT.md: a header with
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
Its tensors may be F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K,
Q6_K, IQ4_NL or IQ4_XS: tools/gguf_dequant (C, built with make when needed) turns them
into exactly the float32 values of gguf-py's gguf.quants.dequantize; --dtype f32 keeps
those, the other types convert from them. The norms, stored as 1 + w, become w again;
the tokenizer is rebuilt from tokenizer.ggml.* (BPE merges derived from the
SentencePiece scores, as Hugging Face derives tokenizer.json's). Vision tensors (v.*,
mm.*) are skipped.

Standard library only. Tensors are streamed one at a time, so memory stays at the size
of the largest tensor, whatever the model size. The quantized types (q8_0, q4_0) are
made by the C engine itself (`gemma3 --quantize`, built with make if needed) from an
intermediate bf16 export (f32 if any source tensor is not bf16, and always for GGUF),
so they need no numpy. The output is written under a temporary name in the same
directory and renamed at the end: a failed or interrupted export leaves no OUT.bin.

Every value read from the input is checked where it enters (check_config for the
hyper-parameters, against what gemma3's loader accepts; the safetensors, index, GGUF and
tokenizer readers for their own fields): a bad input is one line naming the key or field,
exit status 1, before any work. tests/fuzz_export.py fuzzes these readers.
"""
import argparse
import json
import math
import mmap
import os
import re
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
        except OverflowError:
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
        pieces[a["id"]] = a["content"]
        types[a["id"]] = 3 if a.get("special") else 2
        added.append(a["id"])

    merges = []
    for m in merges_in:
        if isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            a, b = m
        elif isinstance(m, str) and " " in m:
            a, b = m.split(" ", 1)
        else:
            raise ExportError(f"{path}: merge {short(m)} is neither \"left right\" nor [left, right]")
        try:
            merges.append((vocab[a], vocab[b], vocab[a + b]))
        except KeyError as e:
            raise ExportError(f"{path}: merge {short(a)} + {short(b)} uses a piece not in the vocab ({short(e.args[0])})")
    return tokenizer_section(pieces, types, added, merges)


def tokenizer_section(pieces, types, added, merges):
    """The tokenizer section (FORMAT.md) from {id: piece}, {id: type}, the added ids and
    the merges (left id, right id, merged id) in rank order; also the ids of the four
    pieces the header names (None where absent)."""
    n_tokens = max(pieces) + 1
    blob = bytearray()
    offsets = [0]
    for i in range(n_tokens):
        try:
            blob += pieces.get(i, "").encode("utf-8")
        except UnicodeEncodeError:
            raise ExportError(f"token {i} {short(pieces[i])} is not valid UTF-8 (a lone surrogate)")
        offsets.append(len(blob))
    out = bytearray(struct.pack("<4I", n_tokens, len(merges), len(added), 0))
    out += struct.pack(f"<{n_tokens + 1}I", *offsets)
    out += struct.pack(f"<{3 * len(merges)}I", *[x for m in merges for x in m])
    out += struct.pack(f"<{len(added)}I", *added)
    out += bytes(types.get(i, 0) for i in range(n_tokens))
    out += blob
    ids = {p: i for i, p in pieces.items()}
    special = {name: ids.get(name) for name in ("<bos>", "<eos>", "<end_of_turn>", "<start_of_turn>")}
    return bytes(out), special


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
        # Fall back to Gemma 3's fixed ids when the tokenizer does not name them.
        self.bos = special.get("<bos>") if special.get("<bos>") is not None else int(cfg["bos_token_id"])
        self.eos = special.get("<eos>") if special.get("<eos>") is not None else 1
        self.eot = special.get("<end_of_turn>") if special.get("<end_of_turn>") is not None else 106
        self.sot = special.get("<start_of_turn>") if special.get("<start_of_turn>") is not None else 105
        if not 1 <= vocab <= MAX_DIM:
            raise ExportError(f"the embedding table has {vocab} rows (1 to {MAX_DIM} allowed)")
        for what, v, hi in (("bos", self.bos, vocab), ("eos", self.eos, vocab),  # as gemma3's loader requires
                            ("end-of-turn", self.eot, MAX_DIM), ("start-of-turn", self.sot, MAX_DIM)):
            if not is_int(v) or not 0 <= v < hi:
                raise ExportError(f"{what} token id {short(v)} out of range (0 to {hi - 1}; vocabulary of {vocab})")


def load_hf(hf_dir, dtype_name, quant=None, quiet=True):
    cfg = read_config(hf_dir)
    if quant:
        check_quantizable(cfg, quant, os.path.join(hf_dir, "config.json"))
    found = find_tensors(hf_dir)
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
    n_layers = cfg["num_hidden_layers"]
    if len(found) < 2 + 13 * n_layers:  # too few tensors for the layer count: say so before listing them all
        names = (n for i in range(-1, n_layers + 1) for n in
                 (["embed_tokens.weight"] if i < 0 else ["norm.weight"] if i == n_layers else
                  [f"layers.{i}.{t}" for t, _ in LAYER_TENSORS]))
        raise ExportError(f"missing tensor {next((n for n in names if n not in found), '?')!r} (num_hidden_layers "
                          f"{n_layers} needs {2 + 13 * n_layers} tensors, the checkpoint has {len(found)})")
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
            read = lambda nb=count * ELEM_SIZE[dt], name=name: deq.read(nb, name)
        else:
            read = lambda info=info, dt=dt: iter([convert(read_tensor_bytes(info), info["dtype"], dt)])
        tensors.append((name, list(info["shape"]), dt, count * ELEM_SIZE[dt], read))
    try:
        return Source(cfg, vocab, tok_bytes, special, tensors, close=deq.close if deq else lambda: None)
    except BaseException:
        if deq:
            deq.close()
        raise


def write_model(src, out_path, dtype_name, quiet, label=None):
    """Write src as a model file at out_path (through a temporary name). label: what the
    log calls it instead of "wrote OUT_PATH" (an intermediate file)."""
    cfg, tensors = src.cfg, src.tensors
    n_layers = cfg["num_hidden_layers"]
    layer_types_off = HEADER_SIZE
    tok_off = pad_to(layer_types_off + n_layers, 8)
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
        len(tensors), 0, tok_off if src.tok_bytes else 0, len(src.tok_bytes), dir_off, 0)
    assert len(header) == HEADER_SIZE

    # A temporary name in the same directory, renamed at the end: an error or Ctrl-C
    # part-way leaves no OUT.bin (and removes the temporary file).
    tmp_path = os.path.join(os.path.dirname(os.path.abspath(out_path)), f".{os.path.basename(out_path)}.{os.getpid()}.tmp")
    t0 = time.time()
    total = sum(t[3] for t in tensors)
    done = 0
    show = not quiet and sys.stderr.isatty()  # a \r progress line only makes sense on a terminal
    last = 0.0
    try:
        try:
            raw = open(tmp_path, "wb", buffering=0)
        except OSError as e:
            raise ExportError(f"cannot write {out_path}: {e.strerror}")
        with raw:
            f = ChunkedWriter(raw)
            f.write(header)
            f.write(bytes(cfg["is_global"]))
            f.write(b"\0" * (tok_off - f.pos))
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
        src.close()
        os.replace(tmp_path, out_path)
    except BaseException:
        src.close()
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        if show:
            print(file=sys.stderr)
        raise
    if not quiet:
        print(f"{chr(13) if show else ''}{label or 'wrote ' + out_path}: {file_size / 1e6:.1f} MB, {len(tensors)} tensors, vocab {src.vocab}, "
              f"{n_layers} layers ({sum(cfg['is_global'])} global), dtype {dtype_name}, "
              f"tokenizer {'yes' if src.tok_bytes else 'no'}, {time.time() - t0:.1f} s", file=sys.stderr)


def load(path, dtype_name, quiet, quant=None):
    """The checkpoint at path as a Source; quant (q8_0, q4_0): the type it is going to be
    quantized to after, checked against the config before any work."""
    if os.path.isdir(path):
        return load_hf(path, dtype_name, quant, quiet)
    if os.path.exists(path):
        return load_gguf(path, dtype_name, quiet, quant)
    raise ExportError(f"cannot read {path}: no such file or directory")


def export(src_path, out_path, dtype_name, quiet=False, quant=None, label=None):
    write_model(load(src_path, dtype_name, quiet, quant), out_path, dtype_name, quiet, label)


def check_output(src_path, out_path):
    """Before any work: the output is a file name we can create, and not the input."""
    if os.path.isdir(out_path):
        raise ExportError(f"{out_path} is a directory: give the output file's name, e.g. {os.path.join(out_path, 'gemma3.bin')}")
    if os.path.exists(out_path):
        try:
            inputs = [os.path.join(src_path, n) for n in os.listdir(src_path)] if os.path.isdir(src_path) else [src_path]
            for i in inputs:
                if os.path.samefile(i, out_path):
                    raise ExportError(f"{out_path} is the input {i}: refusing to overwrite it")
        except OSError:
            pass  # unreadable input: load() says so
    d = os.path.dirname(os.path.abspath(out_path))
    probe = os.path.join(d, f".{os.path.basename(out_path)}.{os.getpid()}.probe")
    try:
        open(probe, "xb").close()
        os.remove(probe)
    except OSError as e:
        raise ExportError(f"cannot write {out_path}: {e.strerror}")


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


def export_quantized(src_path, out_path, dtype_name, quiet):
    """q8_0 / q4_0: export losslessly, then let the C engine quantize (fast, no numpy)."""
    t0 = time.time()
    if os.path.isdir(src_path):
        check_quantizable(read_config(src_path), dtype_name, os.path.join(src_path, "config.json"))
        lossless = "bf16" if all(t["dtype"] == "BF16" for t in find_tensors(src_path).values()) else "f32"
    else:
        lossless = "f32"  # a GGUF's dequantized values are float32; bf16 would round them
    engine = build_with_make("gemma3", "it does the quantization", quiet)
    stem = os.path.join(os.path.dirname(os.path.abspath(out_path)), f".{os.path.basename(out_path)}.{os.getpid()}")
    tmp, qtmp = f"{stem}.{lossless}.tmp", f"{stem}.{dtype_name}.tmp"
    try:
        export(src_path, tmp, lossless, quiet, quant=dtype_name, label=f"step 1 of 2, {lossless} export")
        quantize_file(engine, tmp, qtmp, dtype_name, out_path, lossless, quiet)
        os.replace(qtmp, out_path)
    finally:
        for t in (tmp, qtmp):
            if os.path.exists(t):
                os.remove(t)
    if not quiet:
        print(f"wrote {out_path}: {os.path.getsize(out_path) / 1e6:.1f} MB, dtype {dtype_name}, "
              f"{time.time() - t0:.1f} s", file=sys.stderr)


def quantized_size(path, dtype_name):
    """The size gemma3 --quantize gives the model file at path: its layout (FORMAT.md)
    with every matrix row as n/32 blocks of 34 (q8_0) or 18 (q4_0) bytes."""
    with open(path, "rb") as f:
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


def quantize_file(engine, tmp, qtmp, dtype_name, out_path, lossless, quiet):
    """gemma3 TMP --quantize DTYPE QTMP, with a progress line of our own on a terminal
    (gemma3's shows only on its terminal, and its stderr is ours to read): the share of
    the output written so far. Its error line, if any, names the files the user knows."""
    show = not quiet and sys.stderr.isatty()
    total = quantized_size(tmp, dtype_name)
    if not quiet and not show:
        print(f"step 2 of 2, quantizing to {dtype_name} ...", file=sys.stderr)
    proc = subprocess.Popen([engine, tmp, "--quantize", dtype_name, qtmp], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        while True:
            try:
                _, err = proc.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                part = qtmp + ".partial"  # gemma3 writes there, and renames it when whole
                if show and os.path.exists(part):
                    done = os.path.getsize(part)
                    print(f"\r  step 2 of 2, quantizing to {dtype_name}  {100.0 * min(done, total) / total:5.1f}%  "
                          f"{done / 1e6:9.1f} MB", end="", file=sys.stderr, flush=True)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if show:
        print(f"\r  step 2 of 2, quantizing to {dtype_name}  100.0%  {total / 1e6:9.1f} MB", file=sys.stderr)
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        msg = lines[-1] if lines else f"gemma3 --quantize failed (exit status {proc.returncode})"
        if msg.startswith("gemma3: error: "):
            msg = "gemma3 --quantize: " + msg[len("gemma3: error: "):]
        raise ExportError(msg.replace(qtmp + ".partial", out_path).replace(qtmp, out_path)
                          .replace(tmp, f"the {lossless} export"))


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
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 20: ("IQ4_NL", 32, 18),
    23: ("IQ4_XS", 256, 136), 30: ("BF16", 1, 2),
}
GGML_OTHER_TYPES = {
    4: "Q4_2", 5: "Q4_3", 9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    21: "IQ3_S", 22: "IQ2_S", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8", 34: "TQ1_0", 35: "TQ2_0", 36: "IQ4_NL_4_4",
    37: "IQ4_NL_4_8", 38: "IQ4_NL_8_8", 39: "MXFP4",
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
    if not all(isinstance(t, str) for t in tokens):
        raise ExportError(f"{path}: tokenizer.ggml.tokens is not an array of strings")
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
    by the ids of the left and right parts. Control and user-defined pieces score 0, as
    SentencePiece stores them (llama.cpp's converter writes -1000 for them instead).
    On Gemma 3 this reproduces tokenizer.json's 514,906 merges in order."""
    cands = []
    # Only the lengths some piece has can be a left part's: a piece of a million characters
    # then costs as little as a short one (trying every split would take minutes).
    lengths = sorted({len(p) for p in pieces})
    has_length = set(lengths)
    for i, p in enumerate(pieces):
        if len(p) < 2:
            continue
        score = 0.0 if ttypes[i] in (3, 4) else float(scores[i])
        local = []
        for k in lengths:
            if k >= len(p):
                break
            if k == 0 or len(p) - k not in has_length:
                continue
            left, right = p[:k], p[k:]
            if left in vocab and right in vocab:
                local.append((vocab[left], vocab[right]))
        if local:
            local.sort()
            merged = vocab[p]
            for a, b in local:
                cands.append((score, len(pieces[a]), len(pieces[b]), a, b, merged))
    # stable sort, highest first: ties keep the order above (by piece, then left/right id)
    cands.sort(key=lambda c: (c[0], c[1], c[2]), reverse=True)
    return [(a, b, m) for _, _, _, a, b, m in cands]


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
    if any(special.get(p) is not None and not 0 <= special[p] < (vocab if p in ("<bos>", "<eos>") else MAX_DIM)
           for p in ("<bos>", "<eos>", "<end_of_turn>")):
        raise ExportError(f"{path}: bos / eos / end-of-turn token id out of range for a vocabulary of {vocab} "
                          f"({', '.join(f'{p} {special.get(p)}' for p in ('<bos>', '<eos>', '<end_of_turn>'))})")

    out_dtype = DTYPE_CODES[dtype_name]
    jobs, plan = [], []
    for ours, shape, g in wanted:
        ttype, dims, offset, nbytes = tensors[g]
        dt = out_dtype if len(shape) == 2 else DTYPE_F32
        count = 1
        for d in shape:
            count *= d
        norm = len(shape) == 1  # stored as 1 + w
        jobs.append(f"{offset} {ttype} {count} {'bf16' if dt == DTYPE_BF16 else 'f32'} {1 if norm else 0}\n")
        plan.append((ours, shape, dt, count * ELEM_SIZE[dt], g))
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


def load_gguf(path, dtype_name, quiet, quant=None):
    cfg, vocab, tok_bytes, special, jobs, plan = plan_gguf(path, dtype_name, quiet, quant)
    deq = Dequantizer(path, jobs, quiet)
    tensors_out = [(ours, shape, dt, nb, lambda nb=nb, g=g: deq.read(nb, g)) for ours, shape, dt, nb, g in plan]
    try:
        return Source(cfg, vocab, tok_bytes, special, tensors_out, close=deq.close)
    except BaseException:
        deq.close()
        raise


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
    ap.add_argument("out", help="output model file, e.g. gemma3-1b.bin")
    ap.add_argument("--dtype", choices=sorted(DTYPE_CODES) + ["q4_0", "q8_0"], default="bf16",
                    help="weight type of the matrices (norms stay f32); default bf16. q8_0 / q4_0: "
                         "int8 / int4 in blocks of 32 with a half-precision scale, made by gemma3 --quantize. "
                         "From a GGUF or a quantized MLX checkpoint, f32 keeps the dequantized values exactly")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    args = ap.parse_args()
    try:
        check_output(args.src, args.out)
        if args.dtype in ("q8_0", "q4_0"):
            export_quantized(args.src, args.out, args.dtype, args.quiet)
        else:
            export(args.src, args.out, args.dtype, args.quiet)
    except ExportError as e:
        print(f"export.py: error: {error_line(e)}", file=sys.stderr)
        sys.exit(1)
    except MemoryError:
        print("export.py: error: out of memory", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # cannot write the output (no such directory, disk full, ...)
        print(f"export.py: error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("export.py: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
