#!/usr/bin/env python3
"""Export a Hugging Face Gemma 3 checkpoint to the flat gemma3.c model file.

    python3 export.py HF_DIR OUT.bin [--dtype f32|bf16|q8_0|q4_0]

HF_DIR holds config.json, model.safetensors (or model-*-of-*.safetensors plus
model.safetensors.index.json) and, optionally, tokenizer.json. Both the text-only
layout (Gemma3ForCausalLM: 270M, 1B) and the multimodal one
(Gemma3ForConditionalGeneration: 4B, 12B, 27B, config under "text_config") are read;
vision tensors are skipped. The output format is described in FORMAT.md: a header with
every hyper-parameter, the tokenizer, a tensor directory, then 64-byte aligned tensors,
all little-endian.

Standard library only. Tensors are streamed one at a time, so memory stays at the size
of the largest tensor, whatever the model size. The quantized types (q8_0, q4_0) are
made by the C engine itself (`gemma3 --quantize`, built with make if needed) from an
intermediate bf16 export (f32 if any source tensor is not bf16), so they need no numpy.
"""
import argparse
import json
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
    n_tokens = max(pieces) + 1

    merges = []
    for m in model["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        try:
            merges.append((vocab[a], vocab[b], vocab[a + b]))
        except KeyError as e:
            raise ExportError(f"{path}: merge {a!r} + {b!r} uses a piece not in the vocab ({e})")

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


def export(hf_dir, out_path, dtype_name, quiet=False):
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
    # Fall back to Gemma 3's fixed ids when there is no tokenizer (logits-only exports).
    bos = special.get("<bos>") if special.get("<bos>") is not None else int(cfg["bos_token_id"])
    eos = special.get("<eos>") if special.get("<eos>") is not None else 1
    eot = special.get("<end_of_turn>") if special.get("<end_of_turn>") is not None else 106
    sot = special.get("<start_of_turn>") if special.get("<start_of_turn>") is not None else 105

    # Output dtype per tensor: norms (1-D) always stay f32; matrices take --dtype.
    out_dtype = DTYPE_CODES[dtype_name]
    plan = []
    for name, _ in wanted:
        info = found[name]
        dt = out_dtype if len(info["shape"]) == 2 else DTYPE_F32
        count = 1
        for d in info["shape"]:
            count *= d
        plan.append((name, info, dt, count * ELEM_SIZE[dt]))

    n_layers = cfg["num_hidden_layers"]
    layer_types_off = HEADER_SIZE
    tok_off = pad_to(layer_types_off + n_layers, 8)
    dir_off = pad_to(tok_off + len(tok_bytes), 8)
    data_off = pad_to(dir_off + DIR_ENTRY_SIZE * len(plan))
    directory = bytearray()
    pos = data_off
    offsets = []
    for name, info, dt, nbytes in plan:
        shape = list(info["shape"]) + [0] * (4 - len(info["shape"]))
        directory += struct.pack("<64sII4IQQ", name.encode(), dt, len(info["shape"]), *shape, pos, nbytes)
        offsets.append(pos)
        pos = pad_to(pos + nbytes)
    file_size = pos

    header = struct.pack(
        "<4sIQ13I5f2I4Q", MAGIC, FORMAT_VERSION, file_size,
        vocab, cfg["hidden_size"], cfg["intermediate_size"], n_layers,
        cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
        cfg["sliding_window"], cfg["max_position_embeddings"], bos, eos, eot, sot,
        float(cfg["query_pre_attn_scalar"]), float(cfg["rms_norm_eps"]), float(cfg["rope_theta"]),
        float(cfg["rope_local_base_freq"]), cfg["rope_factor"],
        len(plan), 0, tok_off if tok_bytes else 0, len(tok_bytes), dir_off, 0)
    assert len(header) == HEADER_SIZE

    tmp_path = out_path + ".tmp"
    t0 = time.time()
    total = sum(p[3] for p in plan)
    done = 0
    show = not quiet and sys.stderr.isatty()  # a \r progress line only makes sense on a terminal
    last = 0.0
    with open(tmp_path, "wb", buffering=0) as raw:
        f = ChunkedWriter(raw)
        f.write(header)
        f.write(bytes(cfg["is_global"]))
        f.write(b"\0" * (tok_off - f.pos))
        f.write(tok_bytes)
        f.write(b"\0" * (dir_off - f.pos))
        f.write(directory)
        for (name, info, dt, nbytes), off in zip(plan, offsets):
            f.write(b"\0" * (off - f.pos))
            data = convert(read_tensor_bytes(info), info["dtype"], dt)
            assert len(data) == nbytes
            f.write(data)
            done += nbytes
            if show and (time.time() - last > 0.2 or done == total):
                last = time.time()
                pct = 100.0 * done / total
                print(f"\r  {pct:5.1f}%  {done / 1e6:9.1f} MB  {name:<48}", end="", file=sys.stderr, flush=True)
        f.write(b"\0" * (file_size - f.pos))
        f.close()
    os.replace(tmp_path, out_path)
    if not quiet:
        print(f"{chr(13) if show else ''}wrote {out_path}: {file_size / 1e6:.1f} MB, {len(plan)} tensors, vocab {vocab}, "
              f"{n_layers} layers ({sum(cfg['is_global'])} global), dtype {dtype_name}, "
              f"tokenizer {'yes' if tok_bytes else 'no'}, {time.time() - t0:.1f} s", file=sys.stderr)


def export_quantized(hf_dir, out_path, dtype_name, quiet):
    """q8_0 / q4_0: export losslessly, then let the C engine quantize (fast, no numpy)."""
    here = os.path.dirname(os.path.abspath(__file__))
    engine = os.path.join(here, "gemma3")
    if not os.access(engine, os.X_OK):
        if not quiet:
            print("building gemma3 (it does the quantization) ...", file=sys.stderr)
        if subprocess.run(["make", "-C", here, "gemma3"], stdout=subprocess.DEVNULL).returncode != 0:
            raise ExportError("quantized export needs the gemma3 binary: run make in " + here)
    lossless = "bf16" if all(t["dtype"] == "BF16" for t in find_tensors(hf_dir).values()) else "f32"
    tmp = out_path + f".{lossless}.tmp"
    try:
        export(hf_dir, tmp, lossless, quiet)
        if not quiet:
            print(f"quantizing to {dtype_name} ...", file=sys.stderr)
        r = subprocess.run([engine, tmp, "--quantize", dtype_name, out_path], stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            raise ExportError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "gemma3 --quantize failed")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if not quiet:
        print(f"wrote {out_path}: {os.path.getsize(out_path) / 1e6:.1f} MB, dtype {dtype_name}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description="Export a Hugging Face Gemma 3 checkpoint to a gemma3.c model file.")
    ap.add_argument("hf_dir", help="directory with config.json, *.safetensors and (optionally) tokenizer.json")
    ap.add_argument("out", help="output model file, e.g. gemma3-1b.bin")
    ap.add_argument("--dtype", choices=sorted(DTYPE_CODES) + ["q4_0", "q8_0"], default="bf16",
                    help="weight type of the matrices (norms stay f32); default bf16. q8_0 / q4_0: "
                         "int8 / int4 in blocks of 32 with a half-precision scale, made by gemma3 --quantize")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    args = ap.parse_args()
    try:
        if args.dtype in ("q8_0", "q4_0"):
            export_quantized(args.hf_dir, args.out, args.dtype, args.quiet)
        else:
            export(args.hf_dir, args.out, args.dtype, args.quiet)
    except ExportError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
