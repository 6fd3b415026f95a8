#!/usr/bin/env python3
"""Export a Gemma 3 checkpoint (Hugging Face directory or GGUF file) to the flat gemma3.c model file.

    python3 export.py HF_DIR OUT.bin [--dtype f32|bf16|q8_0|q4_0]
    python3 export.py MODEL.gguf OUT.bin [--dtype f32|bf16|q8_0|q4_0]

HF_DIR holds config.json, model.safetensors (or model-*-of-*.safetensors plus
model.safetensors.index.json) and, optionally, tokenizer.json. Both the text-only
layout (Gemma3ForCausalLM: 270M, 1B) and the multimodal one
(Gemma3ForConditionalGeneration: 4B, 12B, 27B, config under "text_config") are read;
vision tensors are skipped. The output format is described in FORMAT.md: a header with
every hyper-parameter, the tokenizer, a tensor directory, then 64-byte aligned tensors,
all little-endian.

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
"""
import argparse
import json
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


# ----------------------------------------------------------------------------
# config.json

def read_config(hf_dir):
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path, "r", encoding="utf-8") as f:
            raw = json.load(f)
    except OSError as e:
        raise ExportError(f"cannot read {path}: {e.strerror}")
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON: {e}")
    # Multimodal checkpoints (Gemma3ForConditionalGeneration) nest the text model's config.
    text = raw.get("text_config", raw)
    if text is None:
        text = {}
    cfg = dict(TEXT_CONFIG_DEFAULTS)
    cfg.update({k: v for k, v in text.items() if v is not None or k in ("rope_scaling",)})
    # Older transformers name the activation hidden_act.
    if "hidden_activation" not in text and "hidden_act" in text:
        cfg["hidden_activation"] = text["hidden_act"]

    if cfg["hidden_activation"] not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ExportError(f"unsupported hidden_activation {cfg['hidden_activation']!r} (Gemma 3 uses gelu_pytorch_tanh)")
    if cfg["attention_bias"]:
        raise ExportError("attention_bias=true is not Gemma 3 and is not supported")
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg[cap] is not None:
            raise ExportError(f"{cap}={cfg[cap]} is set, but Gemma 3 has no soft-capping; refusing to guess")
    if not raw.get("tie_word_embeddings", cfg["tie_word_embeddings"]):
        raise ExportError("tie_word_embeddings=false: Gemma 3 ties the classifier to the embedding")

    n_layers = int(cfg["num_hidden_layers"])
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ExportError("num_attention_heads must be a multiple of num_key_value_heads")

    # Per-layer attention type: the newer layer_types list wins over the pattern rule.
    if cfg["layer_types"] is not None:
        kinds = {"sliding_attention": 0, "full_attention": 1}
        if len(cfg["layer_types"]) != n_layers:
            raise ExportError(f"layer_types has {len(cfg['layer_types'])} entries, num_hidden_layers is {n_layers}")
        try:
            cfg["is_global"] = [kinds[t] for t in cfg["layer_types"]]
        except KeyError as e:
            raise ExportError(f"unknown layer type {e.args[0]!r} in layer_types")
    else:
        pattern = int(cfg["sliding_window_pattern"])
        if pattern <= 0:
            raise ExportError(f"sliding_window_pattern must be positive, got {pattern}")
        cfg["is_global"] = [1 if (i + 1) % pattern == 0 else 0 for i in range(n_layers)]

    # RoPE scaling: Gemma 3 4B+ use linear scaling (factor 8), on global layers only.
    rs = cfg["rope_scaling"]
    if rs is None:
        cfg["rope_factor"] = 1.0
    else:
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "default":
            cfg["rope_factor"] = 1.0
        elif kind == "linear":
            cfg["rope_factor"] = float(rs["factor"])
        else:
            raise ExportError(f"unsupported rope_scaling type {kind!r} (only 'linear' is Gemma 3)")
    return cfg


# ----------------------------------------------------------------------------
# safetensors reading (header parse + byte ranges; no third-party code)

ST_DTYPES = {"F32": 4, "BF16": 2, "F16": 2}


def read_safetensors_header(path):
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ExportError(f"cannot open {path}: {e.strerror}")
    with f:
        head = f.read(8)
        if len(head) != 8:
            raise ExportError(f"{path}: truncated safetensors file")
        n = struct.unpack("<Q", head)[0]
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise ExportError(f"{path}: safetensors header length {n} exceeds the file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ExportError(f"{path}: bad safetensors header: {e}")
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ST_DTYPES:
            raise ExportError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        count = 1
        for d in shape:
            count *= d
        if end - start != count * ST_DTYPES[dtype] or 8 + n + end > size:
            raise ExportError(f"{path}: tensor {name} has inconsistent size or lies past the end of the file")
        tensors[name] = {"file": path, "dtype": dtype, "shape": shape, "offset": 8 + n + start, "nbytes": end - start}
    return tensors


def find_tensors(hf_dir):
    """Map canonical name (prefix stripped) -> where its bytes are, over all shards."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, "r", encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ExportError(f"no model.safetensors or model.safetensors.index.json in {hf_dir}")
    found = {}
    for fn in files:
        for name, info in read_safetensors_header(os.path.join(hf_dir, fn)).items():
            if name.startswith(SKIP_PREFIXES) or name == "lm_head.weight":
                continue  # vision half; lm_head is a copy of the tied embedding
            for p in TEXT_PREFIXES:
                if name.startswith(p):
                    canon = name[len(p):]
                    break
            else:
                raise ExportError(f"unknown tensor {name!r} in {fn}")
            if canon in found:
                raise ExportError(f"tensor {canon!r} appears twice")
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
    with open(path, "r", encoding="utf-8") as f:
        tok = json.load(f)
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"{path}: expected a BPE tokenizer, got {model.get('type')!r}")
    vocab = model["vocab"]
    pieces = {i: p for p, i in vocab.items()}
    types = {i: (1 if BYTE_PIECE.match(p) else 0) for p, i in vocab.items()}
    added = []
    for a in tok.get("added_tokens", []):
        pieces[a["id"]] = a["content"]
        types[a["id"]] = 3 if a.get("special") else 2
        added.append(a["id"])

    merges = []
    for m in model["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        try:
            merges.append((vocab[a], vocab[b], vocab[a + b]))
        except KeyError as e:
            raise ExportError(f"{path}: merge {a!r} + {b!r} uses a piece not in the vocab ({e})")
    return tokenizer_section(pieces, types, added, merges)


def tokenizer_section(pieces, types, added, merges):
    """The tokenizer section (FORMAT.md) from {id: piece}, {id: type}, the added ids and
    the merges (left id, right id, merged id) in rank order; also the ids of the four
    pieces the header names (None where absent)."""
    n_tokens = max(pieces) + 1
    blob = bytearray()
    offsets = [0]
    for i in range(n_tokens):
        blob += pieces.get(i, "").encode("utf-8")
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


def load_hf(hf_dir, dtype_name):
    cfg = read_config(hf_dir)
    found = find_tensors(hf_dir)
    wanted = expected_tensors(cfg)
    wanted_names = {n for n, _ in wanted}
    for name in found:
        if name not in wanted_names:
            raise ExportError(f"unknown tensor {name!r} (not part of a Gemma 3 text model with {cfg['num_hidden_layers']} layers)")
    missing = [n for n, _ in wanted if n not in found]
    if missing:
        raise ExportError(f"missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    emb = found["embed_tokens.weight"]["shape"]
    if len(emb) != 2 or emb[1] != cfg["hidden_size"]:
        raise ExportError(f"embed_tokens.weight has shape {emb}, expected [vocab, {cfg['hidden_size']}]")
    vocab = emb[0]  # 262,144 for 270M/1B, 262,208 for 4B+: the tensor is the truth
    for name, shape in wanted[1:]:
        if found[name]["shape"] != shape:
            raise ExportError(f"tensor {name!r} has shape {found[name]['shape']}, expected {shape}")

    tok_path = os.path.join(hf_dir, "tokenizer.json")
    tok_bytes, special = (pack_tokenizer(tok_path) if os.path.exists(tok_path) else (b"", {}))

    # Output dtype per tensor: norms (1-D) always stay f32; matrices take --dtype.
    out_dtype = DTYPE_CODES[dtype_name]
    tensors = []
    for name, _ in wanted:
        info = found[name]
        dt = out_dtype if len(info["shape"]) == 2 else DTYPE_F32
        count = 1
        for d in info["shape"]:
            count *= d
        tensors.append((name, list(info["shape"]), dt, count * ELEM_SIZE[dt],
                        lambda info=info, dt=dt: iter([convert(read_tensor_bytes(info), info["dtype"], dt)])))
    return Source(cfg, vocab, tok_bytes, special, tensors)


def write_model(src, out_path, dtype_name, quiet):
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
        print(f"{chr(13) if show else ''}wrote {out_path}: {file_size / 1e6:.1f} MB, {len(tensors)} tensors, vocab {src.vocab}, "
              f"{n_layers} layers ({sum(cfg['is_global'])} global), dtype {dtype_name}, "
              f"tokenizer {'yes' if src.tok_bytes else 'no'}, {time.time() - t0:.1f} s", file=sys.stderr)


def load(path, dtype_name, quiet):
    if os.path.isdir(path):
        return load_hf(path, dtype_name)
    if os.path.exists(path):
        return load_gguf(path, dtype_name, quiet)
    raise ExportError(f"cannot read {path}: no such file or directory")


def export(src_path, out_path, dtype_name, quiet=False):
    write_model(load(src_path, dtype_name, quiet), out_path, dtype_name, quiet)


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
    engine = build_with_make("gemma3", "it does the quantization", quiet)
    if os.path.isdir(src_path):
        lossless = "bf16" if all(t["dtype"] == "BF16" for t in find_tensors(src_path).values()) else "f32"
    else:
        lossless = "f32"  # a GGUF's dequantized values are float32; bf16 would round them
    stem = os.path.join(os.path.dirname(os.path.abspath(out_path)), f".{os.path.basename(out_path)}.{os.getpid()}")
    tmp, qtmp = f"{stem}.{lossless}.tmp", f"{stem}.{dtype_name}.tmp"
    try:
        export(src_path, tmp, lossless, quiet)
        if not quiet:
            print(f"quantizing to {dtype_name} ...", file=sys.stderr)
        r = subprocess.run([engine, tmp, "--quantize", dtype_name, qtmp], stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            raise ExportError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "gemma3 --quantize failed")
        os.replace(qtmp, out_path)
    finally:
        for t in (tmp, qtmp):
            if os.path.exists(t):
                os.remove(t)
    if not quiet:
        print(f"wrote {out_path}: {os.path.getsize(out_path) / 1e6:.1f} MB, dtype {dtype_name}", file=sys.stderr)


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
        if size < 4 or f.read(4) != GGUF_MAGIC:
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
            vtype = r.u32(f"type of {key}")
            if key in meta:
                raise ExportError(f"{path}: metadata key {key!r} appears twice")
            meta[key] = (vtype, r.value(vtype, key))
        tensors = {}
        for i in range(n_tensors):
            name = r.string(f"tensor {i} name")
            n_dims = r.u32(f"tensor {name} dimension count")
            if not 1 <= n_dims <= 4:
                raise ExportError(f"{path}: tensor {name} has {n_dims} dimensions (1 to 4 allowed)")
            dims = [r.u64(f"tensor {name} dimensions") for _ in range(n_dims)]
            ttype = r.u32(f"tensor {name} type")
            offset = r.u64(f"tensor {name} offset")
            if name in tensors:
                raise ExportError(f"{path}: tensor {name!r} appears twice")
            tensors[name] = [ttype, dims, offset, None]
        align = gguf_meta(meta, "general.alignment", int, GGUF_DEFAULT_ALIGNMENT, path)
        if align <= 0 or align & (align - 1):
            raise ExportError(f"{path}: general.alignment {align} is not a power of two")
        data_start = pad_to(r.pos, align)
        for name, t in tensors.items():
            ttype, dims, offset, _ = t
            count = 1
            for d in dims:
                count *= d
            if ttype not in GGML_TYPES:
                if name.startswith(GGUF_SKIP_PREFIXES):
                    t[2] = t[3] = None  # a vision tensor we skip: its type does not matter
                    continue
                tname = GGML_OTHER_TYPES.get(ttype, f"number {ttype}")
                raise ExportError(f"{path}: tensor {name} has type {tname}, which export.py cannot read "
                                  f"(supported: {', '.join(n for n, _, _ in GGML_TYPES.values())})")
            tname, block_values, block_bytes = GGML_TYPES[ttype]
            if count == 0 or dims[0] % block_values:
                raise ExportError(f"{path}: tensor {name} has dimensions {dims}, not whole {tname} blocks of {block_values}")
            nbytes = count // block_values * block_bytes
            if offset % align:
                raise ExportError(f"{path}: tensor {name} data offset {offset} is not a multiple of the alignment {align}")
            if data_start + offset + nbytes > size:
                raise ExportError(f"{path}: tensor {name} data ({nbytes} bytes at {data_start + offset}) lies past the "
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
            raise ExportError(f"{path}: {key} varies per layer ({vals[:8]}...); gemma3.c needs one value")
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
    return cfg


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
    for i, p in enumerate(pieces):
        if len(p) < 2:
            continue
        score = 0.0 if ttypes[i] in (3, 4) else float(scores[i])
        local = []
        for k in range(1, len(p)):
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


def load_gguf(path, dtype_name, quiet):
    version, meta, tensors = read_gguf(path)
    if "token_embd.weight" not in tensors:
        raise ExportError(f"{path}: missing tensor token_embd.weight")
    emb = tensors["token_embd.weight"][1]
    if len(emb) != 2:
        raise ExportError(f"{path}: tensor token_embd.weight has dimensions {emb}, expected [hidden, vocab]")
    vocab = emb[1]  # the converter may cut unused rows: the tensor is the truth
    cfg = gguf_config(path, meta, tensors)
    D = cfg["hidden_size"]

    # Our names and HF shapes, GGUF names. GGUF lists dimensions fastest-first (ne0 =
    # columns): HF [rows, cols] is GGUF [cols, rows].
    wanted = [("embed_tokens.weight", [vocab, D], "token_embd.weight")]
    for i in range(cfg["num_hidden_layers"]):
        hf = dict(LAYER_TENSORS)
        for g, ours in GGUF_LAYER_NAMES.items():
            wanted.append((f"layers.{i}.{ours}.weight", hf[ours + ".weight"](cfg), f"blk.{i}.{g}.weight"))
    wanted.append(("norm.weight", [D], "output_norm.weight"))
    known = {g for _, _, g in wanted} | {"output.weight"}
    for name in tensors:
        if name not in known and not name.startswith(GGUF_SKIP_PREFIXES):
            raise ExportError(f"{path}: unknown tensor {name!r} (not part of a gemma3 text model with "
                              f"{cfg['num_hidden_layers']} blocks)")
    missing = [g for _, _, g in wanted if g not in tensors]
    if missing:
        raise ExportError(f"{path}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for ours, shape, g in wanted:
        if tensors[g][1] != shape[::-1]:
            raise ExportError(f"{path}: tensor {g} has dimensions {tensors[g][1]}, expected {shape[::-1]}")
    # An untied classifier: gemma3.c's format has none (the classifier is the embedding
    # table), so output.weight is accepted only when it is the same table, byte for byte.
    if "output.weight" in tensors:
        out, embt = tensors["output.weight"], tensors["token_embd.weight"]
        if not (out[0] == embt[0] and out[1] == embt[1] and same_bytes(path, out[2], embt[2], out[3])):
            raise ExportError(f"{path}: output.weight differs from token_embd.weight (an untied classifier); "
                              "the gemma3.c format ties the classifier to the embedding")

    tok_bytes, special = gguf_tokenizer(path, meta)
    # Where the vocabulary does not name them, the ids tokenizer.ggml.* gives, then Gemma 3's.
    for piece, key in (("<bos>", "bos_token_id"), ("<eos>", "eos_token_id"), ("<end_of_turn>", "eot_token_id")):
        if special.get(piece) is None and f"tokenizer.ggml.{key}" in meta:
            special[piece] = gguf_meta(meta, f"tokenizer.ggml.{key}", int, None, path)
    if special.get("<bos>") is not None and special["<bos>"] >= vocab or \
            special.get("<eos>") is not None and special["<eos>"] >= vocab:
        raise ExportError(f"{path}: bos / eos token id out of range for a vocabulary of {vocab}")

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
    deq = Dequantizer(path, jobs, quiet)
    tensors_out = [(ours, shape, dt, nb, lambda nb=nb, g=g: deq.read(nb, g)) for ours, shape, dt, nb, g in plan]
    if not quiet:
        general = {k: meta[k][1] for k in ("general.name", "general.size_label", "general.finetune") if k in meta}
        types = sorted({GGML_TYPES[tensors[g][0]][0] for _, _, g in wanted})
        name = " ".join(str(v) for v in general.values())
        print(f"{os.path.basename(path)}: GGUF v{version}, {name + ', ' if name else ''}"
              f"tensor types {', '.join(types)}", file=sys.stderr)
        if cfg["num_hidden_layers"] in (34, 48, 62) and cfg["rope_factor"] == 1.0:
            print("note: no rope.scaling metadata; Gemma 3 4B/12B/27B use linear scaling 8 on global layers, "
                  "but like llama.cpp this export uses none", file=sys.stderr)
    return Source(cfg, vocab, tok_bytes, special, tensors_out, close=deq.close)


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


def main():
    ap = argparse.ArgumentParser(description="Export a Gemma 3 checkpoint (Hugging Face directory or GGUF file) "
                                             "to a gemma3.c model file.")
    ap.add_argument("src", metavar="HF_DIR|MODEL.gguf",
                    help="directory with config.json, *.safetensors and (optionally) tokenizer.json; "
                         "or a GGUF file of architecture gemma3 (llama.cpp, Ollama)")
    ap.add_argument("out", help="output model file, e.g. gemma3-1b.bin")
    ap.add_argument("--dtype", choices=sorted(DTYPE_CODES) + ["q4_0", "q8_0"], default="bf16",
                    help="weight type of the matrices (norms stay f32); default bf16. q8_0 / q4_0: "
                         "int8 / int4 in blocks of 32 with a half-precision scale, made by gemma3 --quantize. "
                         "From a GGUF, f32 keeps the dequantized values exactly")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    args = ap.parse_args()
    try:
        if args.dtype in ("q8_0", "q4_0"):
            export_quantized(args.src, args.out, args.dtype, args.quiet)
        else:
            export(args.src, args.out, args.dtype, args.quiet)
    except ExportError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # cannot write the output (no such directory, disk full, ...)
        print(f"export.py: error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("export.py: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
