#!/usr/bin/env python3
"""Write a Hugging Face Gemma 3 checkpoint as a GGUF file, as llama.cpp's converter and
llama-quantize would, without llama.cpp: for the benchmarks (tools/bench.sh,
tools/bench_llamacpp.sh), on the random checkpoints of tools/make_checkpoint.py.

    python3 tools/make_gguf.py CHECKPOINT_DIR OUT.gguf [--type TYPE] [--tokenizer tokenizer.json]

TYPE (default q4_k_m) is the file's mix, chosen per tensor by llama.cpp's rules
(src/llama-quant.cpp, llama_tensor_get_type, without an importance matrix):
  f32, f16, bf16  every matrix in that type (the converter's --outtype)
  q8_0, q4_0      every matrix in that type; the tied token embedding, which is also the
                  output matrix, Q6_K (Q8_0 for q8_0)
  q4_k_m          Q4_K for most matrices; Q6_K for the token embedding, and for attn_v
                  and ffn_down in the layers use_more_bits picks (the first and last
                  eighth, and every third layer between: about half of them)
Then llama.cpp's shape fallback: a matrix whose rows (GGUF's ne0, the input size) are not
a multiple of its type's block takes Q5_0 for Q4_K and Q8_0 for Q6_K. On Gemma 3 1B and
270M (hidden 1152 and 640, not multiples of 256) that leaves Q4_K / Q6_K only to attn_output
and ffn_down, and the file holds Q5_0, Q8_0, Q4_K and Q6_K, as the published Q4_K_M files do.
1-D tensors (the norms) are F32, stored as 1 + w as the converter does.

The blocks are made by tools/gguf_quantize (C, built with make if missing), which follows
ggml's reference quantizers. The tokenizer (tokenizer.ggml.*, SentencePiece style) comes
from tokenizer.json (--tokenizer, default CHECKPOINT_DIR/tokenizer.json; none if absent):
the pieces in id order; added tokens marked special are control tokens (type 3), the other
added tokens user-defined (4), <0xNN> bytes (6), the rest normal (1) with the score
-(their rank in id order), which orders them as Gemma's SentencePiece scores do, so the
BPE merges derived from the scores are the same.

The output is written to OUT.gguf.tmp and renamed at the end: an interrupted run leaves no
partial OUT.gguf. Standard library only.
"""

import argparse
import json
import os
import struct
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ALIGN = 32

# ggml type: (number, values per block, bytes per block)
GGML = {"F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q5_0": (6, 32, 22),
        "Q8_0": (8, 32, 34), "Q4_K": (12, 256, 144), "Q6_K": (14, 256, 210), "BF16": (30, 1, 2)}
FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}  # llama.cpp's tensor_type_fallback, for these
# --type: (default matrix type, general.file_type as llama.cpp numbers its ftypes)
MIXES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7),
         "q4_0": ("Q4_0", 2), "q4_k_m": ("Q4_K", 15)}

# Hugging Face tensor name (after the model prefix) -> GGUF name; N is the layer
NAMES = {"embed_tokens": "token_embd", "norm": "output_norm",
         "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
         "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
         "post_feedforward_layernorm": "post_ffw_norm", "mlp.gate_proj": "ffn_gate",
         "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
PREFIXES = ("model.language_model.", "language_model.model.", "model.")
SRC_DTYPES = {"BF16": "bf16", "F16": "f16", "F32": "f32"}


class Error(Exception):
    pass


def use_more_bits(i, n):
    """llama.cpp's choice of the layers that get more bits in the _M mixes."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(gguf_name, layer, n_layers, cols, mix):
    """The ggml type llama.cpp gives a matrix of this name (cols = its ne0) in this mix."""
    base, _ = MIXES[mix]
    t = base
    if mix in ("q8_0", "q4_0", "q4_k_m"):
        if gguf_name == "token_embd":  # tied: quantized as the output matrix
            t = "Q8_0" if cols % GGML[base][1] else ("Q8_0" if base == "Q8_0" else "Q6_K")
        elif mix == "q4_k_m" and gguf_name in ("attn_v", "ffn_down") and use_more_bits(layer, n_layers):
            t = "Q6_K"
        if cols % GGML[t][1]:
            t = FALLBACK.get(t)
            if t is None or cols % GGML[t][1]:
                t = "F16"
    return t


# ---- reading the checkpoint --------------------------------------------------------------

def load_config(ckpt):
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = json.load(f)
    cfg = cfg.get("text_config", cfg)
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in need if k not in cfg]
    if missing:
        raise Error(f"{ckpt}/config.json has no {missing[0]}")
    return cfg


def safetensors_files(ckpt):
    index = os.path.join(ckpt, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.exists(os.path.join(ckpt, "model.safetensors")):
        return ["model.safetensors"]
    raise Error(f"{ckpt}: no model.safetensors or model.safetensors.index.json")


def checkpoint_tensors(ckpt):
    """{canonical name: (file, absolute data offset, dtype, shape)} of the text model."""
    out = {}
    for fn in safetensors_files(ckpt):
        path = os.path.join(ckpt, fn)
        with open(path, "rb") as f:
            n, = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            for p in PREFIXES:
                if name.startswith(p):
                    name = name[len(p):]
                    break
            else:
                continue  # vision tower, projector
            if info["dtype"] not in SRC_DTYPES:
                raise Error(f"{path}: tensor {name} is {info['dtype']}; bf16, f16 or f32 expected")
            out[name] = (path, 8 + n + info["data_offsets"][0], info["dtype"], info["shape"])
    return out


def gguf_name_of(name):
    """(GGUF tensor name, layer or -1, short name) of a canonical HF name, or None."""
    if not name.endswith(".weight"):
        return None
    stem = name[:-len(".weight")]
    if stem.startswith("layers."):
        _, n, rest = stem.split(".", 2)
        short = NAMES.get(rest)
        return (f"blk.{n}.{short}.weight", int(n), short) if short else None
    short = NAMES.get(stem)
    return (short + ".weight", -1, short) if short else None


# ---- the tokenizer --------------------------------------------------------------------------

def tokenizer_arrays(path, n_vocab):
    """(pieces, scores, token types, {bos, eos, unk, pad: id}) from tokenizer.json."""
    with open(path, encoding="utf-8") as f:
        tok = json.load(f)
    vocab = tok["model"]["vocab"]
    pieces = [None] * n_vocab
    for piece, i in vocab.items():
        if i < n_vocab:
            pieces[i] = piece
    added = {a["id"]: a for a in tok.get("added_tokens", []) if a["id"] < n_vocab}
    for i, a in added.items():
        pieces[i] = a["content"]
    if any(p is None for p in pieces):
        raise Error(f"{path}: no token for id {pieces.index(None)} of the model's {n_vocab}")
    scores, types, rank = [], [], 0
    for i, p in enumerate(pieces):
        if i in added:
            types.append(3 if added[i]["special"] else 4)
            scores.append(-1000.0)
        elif len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
            types.append(6)
            scores.append(0.0)
        else:
            types.append(1)
            scores.append(-float(rank))
            rank += 1
    where = {p: i for i, p in reversed(list(enumerate(pieces)))}
    special = {k: where[p] for k, p in (("bos", "<bos>"), ("eos", "<eos>"), ("unk", "<unk>"), ("pad", "<pad>"))
               if p in where}
    return pieces, scores, types, special


# ---- writing GGUF ------------------------------------------------------------------------------

def gguf_string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, value):
    """One metadata entry: 4 uint32, 5 int32, 6 float32, 7 bool, 8 string, 9 array."""
    out = gguf_string(key) + struct.pack("<I", vtype)
    if vtype == 4:
        return out + struct.pack("<I", value)
    if vtype == 6:
        return out + struct.pack("<f", value)
    if vtype == 7:
        return out + struct.pack("<B", 1 if value else 0)
    if vtype == 8:
        return out + gguf_string(value)
    etype, items = value  # array
    out += struct.pack("<IQ", etype, len(items))
    if etype == 8:
        return out + b"".join(gguf_string(s) for s in items)
    fmt = {5: "i", 6: "f"}[etype]
    return out + struct.pack("<%d%s" % (len(items), fmt), *items)


def metadata(cfg, mix, tokenizer):
    a = "gemma3."
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // heads)
    out = [kv("general.architecture", 8, "gemma3"), kv("general.type", 8, "model"),
           kv("general.name", 8, "random Gemma 3 (tools/make_gguf.py)"),
           kv(a + "context_length", 4, cfg.get("max_position_embeddings", 131072)),
           kv(a + "embedding_length", 4, cfg["hidden_size"]),
           kv(a + "block_count", 4, cfg["num_hidden_layers"]),
           kv(a + "feed_forward_length", 4, cfg["intermediate_size"]),
           kv(a + "attention.head_count", 4, heads),
           kv(a + "attention.head_count_kv", 4, cfg.get("num_key_value_heads", heads)),
           kv(a + "attention.key_length", 4, head_dim), kv(a + "attention.value_length", 4, head_dim),
           kv(a + "attention.layer_norm_rms_epsilon", 6, cfg.get("rms_norm_eps", 1e-6)),
           kv(a + "rope.freq_base", 6, cfg.get("rope_theta", 1e6)),
           kv(a + "attention.sliding_window", 4, cfg.get("sliding_window", 4096))]
    rs = cfg.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type")) == "linear":
        out += [kv(a + "rope.scaling.type", 8, "linear"), kv(a + "rope.scaling.factor", 6, rs["factor"])]
    if tokenizer:
        pieces, scores, types, special = tokenizer
        out += [kv("tokenizer.ggml.model", 8, "llama"), kv("tokenizer.ggml.pre", 8, "default"),
                kv("tokenizer.ggml.tokens", 9, (8, pieces)), kv("tokenizer.ggml.scores", 9, (6, scores)),
                kv("tokenizer.ggml.token_type", 9, (5, types))]
        out += [kv(f"tokenizer.ggml.{k}_token_id", 4, i) for k, i in
                (("bos", special.get("bos")), ("eos", special.get("eos")), ("unknown", special.get("unk")),
                 ("padding", special.get("pad"))) if i is not None]
        out += [kv("tokenizer.ggml.add_bos_token", 7, True), kv("tokenizer.ggml.add_eos_token", 7, False),
                kv("tokenizer.ggml.add_space_prefix", 7, False)]
    out += [kv("general.quantization_version", 4, 2), kv("general.file_type", 4, MIXES[mix][1])]
    return out


def quantizer():
    binary = os.path.join(HERE, "gguf_quantize")
    src = os.path.join(HERE, "gguf_quantize.c")
    if not os.path.exists(binary) or os.path.getmtime(binary) < os.path.getmtime(src):
        r = subprocess.run(["make", "-s", "-C", ROOT, "tools/gguf_quantize"], stdout=sys.stderr)
        if r.returncode != 0:
            raise Error("cannot build tools/gguf_quantize (make tools/gguf_quantize)")
    return binary


def write_gguf(ckpt, out_path, mix, tok_path, quiet):
    cfg = load_config(ckpt)
    src = checkpoint_tensors(ckpt)
    n_layers = cfg["num_hidden_layers"]
    plan = []  # (gguf name, type, ne, src entry, is norm)
    for name, entry in src.items():
        g = gguf_name_of(name)
        if g is None:
            raise Error(f"{ckpt}: unexpected tensor {name}")
        gname, layer, short = g
        shape = entry[3]
        if len(shape) == 1:
            plan.append((gname, "F32", [shape[0]], entry, True))
        else:
            rows, cols = shape
            plan.append((gname, tensor_type(short, layer, n_layers, cols, mix), [cols, rows], entry, False))

    def order(p):  # token_embd, the layers in order, output_norm
        n = p[0]
        return (0, 0, n) if n.startswith("token_embd") else (1, int(n.split(".")[1]), n) if n.startswith("blk.") else (2, 0, n)
    plan.sort(key=order)
    if not any(p[0] == "token_embd.weight" for p in plan):
        raise Error(f"{ckpt}: no embed_tokens.weight")
    n_vocab = next(p[2][1] for p in plan if p[0] == "token_embd.weight")
    tokenizer = tokenizer_arrays(tok_path, n_vocab) if tok_path else None

    infos, offset, sizes = [], 0, []
    for gname, t, ne, _, _ in plan:
        num, block, nbytes = GGML[t]
        size = ne[0] // block * nbytes * (ne[1] if len(ne) > 1 else 1)
        infos.append(gguf_string(gname) + struct.pack("<I", len(ne)) + struct.pack("<%dQ" % len(ne), *ne)
                     + struct.pack("<IQ", num, offset))
        sizes.append(size)
        offset += -(-size // ALIGN) * ALIGN
    meta = metadata(cfg, mix, tokenizer)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(plan), len(meta)) + b"".join(meta) + b"".join(infos)
    head += b"\0" * (-len(head) % ALIGN)

    binary = quantizer()
    tmp = out_path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for (gname, t, ne, (path, off, dtype, shape), is_norm), size in zip(plan, sizes):
                start = f.tell()
                if is_norm:  # stored as 1 + w, in float32
                    with open(path, "rb") as s:
                        s.seek(off)
                        raw = s.read(shape[0] * (4 if dtype == "F32" else 2))
                    if dtype == "F32":
                        vals = struct.unpack("<%df" % shape[0], raw)
                    elif dtype == "BF16":
                        vals = [struct.unpack("<f", b"\0\0" + raw[2 * i:2 * i + 2])[0] for i in range(shape[0])]
                    else:
                        vals = struct.unpack("<%de" % shape[0], raw)
                    f.write(struct.pack("<%df" % shape[0], *[1.0 + v for v in vals]))
                else:
                    f.flush()
                    r = subprocess.run([binary, path, str(off), SRC_DTYPES[dtype], str(shape[0]), str(shape[1]), t],
                                       stdout=f, stderr=subprocess.PIPE)
                    if r.returncode != 0:
                        raise Error(f"tensor {gname}: " + r.stderr.decode(errors="replace").strip())
                    f.seek(0, os.SEEK_END)
                if f.tell() - start != size:
                    raise Error(f"tensor {gname}: wrote {f.tell() - start} bytes, expected {size}")
                f.write(b"\0" * (-size % ALIGN))
                if not quiet:
                    print(f"make_gguf: {gname} {t} {ne}", file=sys.stderr)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--type", choices=sorted(MIXES), default="q4_k_m")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's, if it has one)")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    tok = a.tokenizer or os.path.join(a.checkpoint, "tokenizer.json")
    if not os.path.exists(tok):
        if a.tokenizer:
            print(f"make_gguf: error: no {tok}", file=sys.stderr)
            return 1
        tok = None
    try:
        write_gguf(a.checkpoint, a.out, a.type, tok, a.quiet)
    except (Error, OSError, ValueError, KeyError) as e:
        print(f"make_gguf: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
