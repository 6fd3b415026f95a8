#!/usr/bin/env python3
"""A mutation fuzzer for export.py's readers, in-process, standard library only.

    python3 tests/fuzz_export.py [--seconds N] [--seed S] [--target hf|gguf|all]
    python3 tests/fuzz_export.py --make-seeds      # (re)write the seed corpora in tests/fuzz/

Two targets, each from the seed files in tests/fuzz/:
- hf: a checkpoint directory (config.json, model.safetensors, sometimes
  model.safetensors.index.json) with one or two of its files mutated, exported whole
  (load_hf, every tensor read and converted, write_model into a scratch directory);
  sometimes with a tokenizer.json, mutated too.
- gguf: a GGUF file mutated and exported whole (plan_gguf: header, metadata, tensor
  table, config, tokenizer; then tools/gguf_dequant dequantizing every tensor, and
  write_model into a scratch file).
Mutations are byte-level (bit flips, interesting integers, cuts, splices, JSON tokens)
and structure-aware (a JSON value or a GGUF metadata value replaced by one of another
type or an edge value; a key dropped or added; a tensor's dimensions or type changed; the
tokenizer arrays changed together, so that their lengths still agree: an entry's piece,
score or type, entries inserted or dropped, long pieces appended, an array's element type).
Inputs that reach export.py lines no earlier input reached join the corpus.

The property: every input either exports or raises ExportError with a one-line message;
never another exception, never more than 2 s or 1 GiB for one input. A finding is saved
under tests/build/fuzz/ (the input and its traceback); the exit status is then 1.
"""
import argparse
import contextlib
import copy
import io
import json
import math
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import export as E  # noqa: E402

SEEDS = os.path.join(ROOT, "tests", "fuzz")
FINDINGS = os.path.join(ROOT, "tests", "build", "fuzz")
TIME_BUDGET = 2.0      # seconds per input
MEMORY_BUDGET = 1 << 30  # bytes of address space for the whole process
MAX_DATA = 1 << 20     # zero bytes appended after a mutated safetensors header, at most


class Budget(BaseException):
    """One input took longer than TIME_BUDGET (raised by the timer signal)."""


# ----------------------------------------------------------------------------
# seeds: a tiny Gemma 3 in both layouts and as a GGUF (written by --make-seeds)

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4,
        "sliding_window_pattern": 2, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
        "max_position_embeddings": 64, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-06,
        "attention_bias": False, "attn_logit_softcapping": None, "final_logit_softcapping": None, "bos_token_id": 2,
        "eos_token_id": [1, 106], "vocab_size": 112, "model_type": "gemma3_text"}
VOCAB = 112  # embedding rows: Gemma 3's <start_of_turn> / <end_of_turn> (105, 106) fit without a tokenizer


def tiny_tensors(cfg, prefix):
    shapes = [("embed_tokens.weight", [VOCAB, cfg["hidden_size"]])]
    for i in range(cfg["num_hidden_layers"]):
        shapes += [(f"layers.{i}.{n}", s(cfg)) for n, s in E.LAYER_TENSORS]
    shapes.append(("norm.weight", [cfg["hidden_size"]]))
    return [(prefix + n, s) for n, s in shapes]


MM_VISION = {"hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2,
             "image_size": 8, "patch_size": 2, "model_type": "siglip_vision_model"}


def vision_seed_tensors(text):
    """A whole tiny SigLIP tower and projector, named as google/gemma-3-4b-it names them."""
    vc = dict(E.VISION_CONFIG_DEFAULTS, **MM_VISION)
    out = []
    for name, shape, _ in E.expected_vision_tensors(vc, text["hidden_size"]):
        out.append((name.replace(E.VISION_TOWER, "vision_tower.vision_model.", 1), shape))
    return out


def st_header(tensors, extra=None):
    header, pos = {}, 0
    for name, shape in tensors:
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    header.update(extra or {})
    return header


def gguf_bytes(meta, tensors, data, version=3, align=32):
    """A GGUF file: meta [(key, type, value)] (arrays: (element type, values)), tensors
    [(name, dims fastest-first, ggml type, offset in the data section)], data bytes."""
    def string(s):
        b = s.encode("utf-8", "surrogatepass")
        return struct.pack("<Q", len(b)) + b

    def value(t, v):
        if t in E.GGUF_SCALARS:
            fmt = E.GGUF_SCALARS[t][0]
            try:
                return struct.pack("<" + fmt, v)
            except (struct.error, OverflowError, TypeError):
                return struct.pack("<" + fmt, 0)
        if t == E.GGUF_STRING:
            return string(str(v))
        if t != E.GGUF_ARRAY:
            return b""  # an unknown value type: nothing the reader could know the size of
        et, vals = v
        return struct.pack("<IQ", et, len(vals)) + b"".join(value(et, x) for x in vals)

    u32, u64 = (lambda x: struct.pack("<I", x % (1 << 32))), (lambda x: struct.pack("<Q", x % (1 << 64)))
    out = bytearray(b"GGUF" + u32(version) + u64(len(tensors)) + u64(len(meta)))
    for k, t, v in meta:
        out += string(k) + u32(t) + value(t, v)
    for name, dims, t, off in tensors:
        out += string(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(t) + u64(off)
    out += b"\0" * (E.pad_to(len(out), align) - len(out))
    return bytes(out + data)


GGUF_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<0x41>", "a", "b", "ab",
               "\u2581", "\u2581a", "\u2581ab", "ba", "<mask>", "abab"]


def tiny_gguf():
    c = TINY
    meta = [("general.architecture", 8, "gemma3"), ("general.name", 8, "fuzz seed"),
            ("gemma3.block_count", 4, 1), ("gemma3.embedding_length", 4, c["hidden_size"]),
            ("gemma3.feed_forward_length", 4, c["intermediate_size"]),
            ("gemma3.attention.head_count", 4, c["num_attention_heads"]),
            ("gemma3.attention.head_count_kv", 4, c["num_key_value_heads"]),
            ("gemma3.attention.key_length", 4, c["head_dim"]), ("gemma3.attention.value_length", 4, c["head_dim"]),
            ("gemma3.context_length", 4, 64), ("gemma3.attention.layer_norm_rms_epsilon", 6, 1e-6),
            ("gemma3.rope.freq_base", 6, 1e6), ("gemma3.attention.sliding_window", 4, 4),
            ("gemma3.attention.sliding_window_pattern", 9, (7, [True])),
            ("gemma3.rope.scaling.type", 8, "linear"), ("gemma3.rope.scaling.factor", 6, 8.0),
            ("tokenizer.ggml.model", 8, "llama"), ("tokenizer.ggml.tokens", 9, (8, GGUF_TOKENS)),
            ("tokenizer.ggml.scores", 9, (6, [-float(i) for i in range(len(GGUF_TOKENS))])),
            ("tokenizer.ggml.token_type", 9, (5, [3, 3, 3, 2, 4, 4, 6] + [1] * 9)),
            ("tokenizer.ggml.bos_token_id", 4, 2)]
    names = {ours: g for g, ours in E.GGUF_LAYER_NAMES.items()}
    cfg = dict(c, num_hidden_layers=1)
    tensors, data = [], bytearray()
    for name, shape in tiny_tensors(cfg, ""):
        if name == "embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "norm.weight":
            g = "output_norm.weight"
        else:
            layer, rest = name.split(".", 2)[1:]
            g = f"blk.{layer}.{names[rest[:-len('.weight')]]}.weight"
        count = 1
        for d in shape:
            count *= d
        if len(shape) == 2:  # Q4_0: 18 bytes per 32 values (scale 0: every value 0)
            t, raw = 2, b"\0" * (count // 32 * 18)
        else:
            t, raw = 0, struct.pack(f"<{count}f", *([1.0] * count))
        data += b"\0" * (E.pad_to(len(data), 32) - len(data))
        tensors.append((g, shape[::-1], t, len(data)))
        data += raw
    return gguf_bytes(meta, tensors, bytes(data))


def tiny_tokenizer():
    vocab = {p: i for i, p in enumerate(GGUF_TOKENS)}
    return {"version": "1.0", "added_tokens": [{"id": i, "content": GGUF_TOKENS[i], "special": True} for i in range(6)],
            "model": {"type": "BPE", "byte_fallback": True, "vocab": vocab,
                      "merges": ["a b", ["\u2581", "a"], "\u2581a b", "b a", "ab ab"]}}


def tiny_gguf_untied():
    """The tiny GGUF with an output.weight of its own, a vision tensor of a type export.py
    does not read, the sliding pattern as a period and Ollama's RoPE key."""
    b = tiny_gguf()
    version, kv, tl, data, align = parse_gguf(b)
    kv = [x for x in kv if x[0] not in ("gemma3.attention.sliding_window_pattern", "gemma3.rope.freq_base")]
    kv += [("gemma3.attention.sliding_window_pattern", 4, 2), ("gemma3.rope.global.freq_base", 6, 1e6),
           ("gemma3.rope.local.freq_base", 6, 1e4), ("tokenizer.ggml.eot_token_id", 4, 5)]
    emb = next(t for t in tl if t[0] == "token_embd.weight")
    data = bytearray(data)
    data += b"\0" * (E.pad_to(len(data), align) - len(data))
    tl.append(("output.weight", emb[1], 8, len(data)))  # Q8_0: 34 bytes per 32 values
    data += bytes([0x00, 0x3c] + [1] * 32) * (emb[1][0] * emb[1][1] // 32)
    tl.append(("v.patch_embd.weight", [32, 4], 15, 0))  # Q8_K, skipped with the vision tower
    return gguf_bytes(kv, tl, bytes(data), version, align)


def make_seeds():
    mm_text = dict(TINY, layer_types=["sliding_attention", "full_attention"],
                   rope_scaling={"rope_type": "linear", "factor": 8.0})
    del mm_text["sliding_window_pattern"]
    families = {
        "hf-tiny": (TINY, tiny_tensors(TINY, "model."), {}),
        "hf-multimodal": ({"architectures": ["Gemma3ForConditionalGeneration"], "text_config": mm_text,
                           "vision_config": MM_VISION, "mm_tokens_per_image": 4, "image_token_index": 13,
                           "boi_token_index": 14, "eoi_token_index": 15, "tie_word_embeddings": True},
                          tiny_tensors(mm_text, "language_model.model.") + vision_seed_tensors(mm_text),
                          {"__metadata__": {"format": "pt"}}),
    }
    for fam, (cfg, tensors, extra) in families.items():
        d = os.path.join(SEEDS, fam)
        os.makedirs(d, exist_ok=True)
        header = st_header(tensors, extra)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        with open(os.path.join(d, "header.json"), "w") as f:
            json.dump(header, f, separators=(",", ":"))
        with open(os.path.join(d, "tokenizer.json"), "w") as f:
            json.dump(tiny_tokenizer(), f, separators=(",", ":"))
        with open(os.path.join(d, "index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": {n: "model.safetensors" for n, _ in tensors}}, f,
                      separators=(",", ":"))
    os.makedirs(os.path.join(SEEDS, "gguf"), exist_ok=True)
    with open(os.path.join(SEEDS, "gguf", "tiny.gguf"), "wb") as f:
        f.write(tiny_gguf())
    with open(os.path.join(SEEDS, "gguf", "tiny-untied.gguf"), "wb") as f:
        f.write(tiny_gguf_untied())
    print(f"seeds written under {SEEDS}")


# ----------------------------------------------------------------------------
# mutations

INTERESTING = [0, 1, 2, 3, 7, 8, 16, 31, 32, 33, 63, 64, 127, 128, 255, 256, 1023, 4096, 65535, 65536,
               (1 << 24) - 1, 1 << 24, (1 << 24) + 1, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32,
               (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
JSON_TOKENS = [b'"', b"[", b"]", b"{", b"}", b":", b",", b"null", b"true", b"false", b"0", b"-1", b"1e9", b"1e999",
               b"-0.0", b"NaN", b"Infinity", b"-Infinity", b"1000000000", b"99999999999999999999999", b"0.5",
               b'"../../../etc/passwd"', b'"/etc/passwd"', b'"."', b'".."', b'""', b'"\\n"', b'"\\ud800"',
               b'"\\u0000"', b"[[[[[[[[", b"{}", b"[]", b'"linear"', b'"yarn"', b'"full_attention"', b'"F32"',
               b'"I8"', b'"data_offsets"', b'"shape"', b'"dtype"', b'"weight_map"', b'"text_config"',
               b'"__metadata__"', b'"model.safetensors"', b"1" * 5000]
JSON_VALUES = [None, True, False, 0, 1, -1, 2, 3, 6, 7, 16, 31, 32, 33, 100, 1 << 16, 1 << 24, (1 << 24) + 1, 1 << 31,
               1 << 32, 1 << 63, 1 << 64, 10 ** 9, 10 ** 30, 1e9, 1.5, 2.0, -0.0, 1e-50, 1e50, 1e300, math.nan, math.inf,
               -math.inf, "", "x", "1e-6", "8", "linear", "default", "yarn", "full_attention", "sliding_attention",
               "gelu_pytorch_tanh", "BF16", "F32", "F16", "I8", "F8_E4M3", "model.safetensors", "../../../etc/passwd",
               "/etc/passwd", ".", "..", "a/b", "a\nb", "\ud800", [], {}, [1], [0, 0], [0, 1 << 40], ["0", "128"],
               [1, 2, 3], [-1, 4], [[1]], {"rope_type": "linear", "factor": 8}, {"type": "linear"},
               {"rope_type": "default"}, {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}, {"weight_map": {}}]
JSON_KEYS = list(TINY) + ["model", "vocab", "merges", "added_tokens", "id", "content", "special", "text_config", "layer_types", "hidden_act", "tie_word_embeddings", "weight_map",
                          "dtype", "shape", "data_offsets", "__metadata__", "rope_type", "type", "factor",
                          "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight",
                          "model.layers.9.mlp.up_proj.weight", "vision_tower.x", "language_model.model.norm.weight"]


def mutate_bytes(rnd, b, others):
    b = bytearray(b)
    for _ in range(rnd.choice([1, 1, 1, 2, 3, 6])):
        op = rnd.randrange(10)
        pos = rnd.randrange(len(b) + 1)
        if op == 0 and b:  # flip a bit
            p = rnd.randrange(len(b))
            b[p] ^= 1 << rnd.randrange(8)
        elif op == 1 and b:  # a random or edge byte
            b[rnd.randrange(len(b))] = rnd.choice([0, 0x7f, 0x80, 0xff, ord('"'), ord("\\"), rnd.randrange(256)])
        elif op == 2:  # an interesting integer, little-endian, over what is there
            width = rnd.choice([1, 2, 4, 8])
            v = rnd.choice(INTERESTING) + rnd.choice([0, 0, -1, 1])
            b[pos:pos + width] = (v % (1 << (8 * width))).to_bytes(width, "little")
        elif op == 3:  # a JSON token, inserted or over what is there
            tok = rnd.choice(JSON_TOKENS)
            end = pos + (rnd.randrange(8) if rnd.random() < 0.5 else 0)
            b[pos:end] = tok
        elif op == 4 and b:  # delete a run
            del b[pos:pos + rnd.choice([1, 2, 4, 8, 64, 1024])]
        elif op == 5 and b:  # duplicate a run
            p = rnd.randrange(len(b))
            n = rnd.choice([1, 4, 16, 256])
            b[pos:pos] = b[p:p + n]
        elif op == 6:  # cut short
            b = b[:pos]
        elif op == 7 and others:  # splice with another input
            o = rnd.choice(others)
            if o:
                p = rnd.randrange(len(o))
                b = b[:pos] + o[p:p + rnd.randrange(1, 512)] + b[pos + rnd.randrange(64):]
        elif op == 8:  # random bytes
            b[pos:pos] = bytes(rnd.randrange(256) for _ in range(rnd.choice([1, 4, 16])))
        elif op == 9 and b:  # an ASCII digit changed (numbers in JSON, lengths)
            digits = [i for i in range(max(0, pos - 64), min(len(b), pos + 64)) if 48 <= b[i] <= 57]
            if digits:
                b[rnd.choice(digits)] = rnd.choice(b"0123456789")
    return bytes(b)


def json_nodes(v, path=()):
    yield path, v
    if isinstance(v, dict):
        for k, x in v.items():
            yield from json_nodes(x, path + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from json_nodes(x, path + (i,))


def mutate_json(rnd, text):
    """A JSON value replaced, dropped or added (structure-aware); bytes if it is not JSON."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return None
    for _ in range(rnd.choice([1, 1, 2, 3])):
        nodes = list(json_nodes(doc))
        path, node = rnd.choice(nodes)
        op = rnd.randrange(6)
        new = copy.deepcopy(rnd.choice(JSON_VALUES))
        if op == 0 and isinstance(node, (int, float)) and not isinstance(node, bool):
            new = rnd.choice([node + 1, node - 1, -node, node * 2, node * 32 + 1, float(node), node / 3, 0,
                              int(node) * 1000000007 if math.isfinite(node) else 0])
        elif op == 1 and isinstance(node, dict) and node:
            del node[rnd.choice(list(node))]
            continue
        elif op == 2 and isinstance(node, dict):
            node[rnd.choice(JSON_KEYS)] = new
            continue
        elif op == 3 and isinstance(node, list) and node:
            if rnd.random() < 0.5:
                node.pop()
            else:
                node.append(copy.deepcopy(rnd.choice(node)))
            continue
        elif op == 4:  # the same value in another container
            new = [node] if rnd.random() < 0.5 else {"value": node}
        if not path:
            doc = new
        else:
            parent = doc
            for p in path[:-1]:
                parent = parent[p]
            parent[path[-1]] = new
    if rnd.random() < 0.02:  # deep nesting
        return (b"[" * 50000) + json.dumps(doc).encode() + (b"]" * 50000)
    return json.dumps(doc, allow_nan=True, ensure_ascii=rnd.random() < 0.5).encode("utf-8", "surrogatepass")


GGUF_VALUES = [(0, 0), (0, 255), (1, -1), (2, 65535), (4, 0), (4, 1), (4, 2), (4, 6), (4, 31), (4, 62), (4, 1 << 16),
               (4, 1 << 24), (4, (1 << 32) - 1), (5, -1), (5, -(1 << 31)), (10, (1 << 64) - 1), (10, 1 << 40),
               (11, -1), (6, math.nan), (6, math.inf), (6, -1.0), (6, 0.0), (6, 1e-45), (6, 3e38), (12, 1e300),
               (12, -0.0), (7, True), (7, False), (8, ""), (8, "linear"), (8, "none"), (8, "yarn"), (8, "llama"),
               (8, "gpt2"), (8, "gemma3"), (8, "a\nb"), (8, "\ud800"), (9, (4, [])), (9, (4, [1, 2, 3])),
               (9, (7, [True, False])), (9, (7, [])), (9, (8, ["a", "b"])), (9, (8, [])), (9, (6, [0.5])),
               (9, (9, [(4, [1])])), (9, (13, [])), (13, 0)]
GGUF_KEYS = ["general.alignment", "gemma3.block_count", "gemma3.embedding_length", "gemma3.feed_forward_length",
             "gemma3.attention.head_count", "gemma3.attention.head_count_kv", "gemma3.attention.key_length",
             "gemma3.attention.value_length", "gemma3.context_length", "gemma3.attention.layer_norm_rms_epsilon",
             "gemma3.rope.freq_base", "gemma3.rope.global.freq_base", "gemma3.rope.local.freq_base",
             "gemma3.rope.freq_base_swa", "gemma3.attention.sliding_window", "gemma3.attention.sliding_window_pattern",
             "gemma3.rope.scaling.type", "gemma3.rope.scaling.factor", "gemma3.rope.scale_linear",
             "gemma3.final_logit_softcapping", "tokenizer.ggml.model", "tokenizer.ggml.tokens",
             "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
             "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "general.architecture"]


def parse_gguf(b):
    """A GGUF file as (version, [(key, type, value)], [(name, dims, type, offset)], data, alignment),
    read with export.py's own reader; None if it does not read."""
    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(b)
        f.flush()
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                version, meta, tensors = E.read_gguf(f.name)
        except E.ExportError:
            return None
    align = meta.get("general.alignment", (4, 32))[1]
    align = align if isinstance(align, int) and align > 0 and not align & (align - 1) else 32
    kv = []
    for k, (t, v) in meta.items():
        if t == E.GGUF_ARRAY:
            et = 8 if v and isinstance(v[0], str) else 7 if v and isinstance(v[0], bool) else \
                6 if v and isinstance(v[0], float) else 5
            v = (et, v)
        kv.append((k, t, v))
    starts = [t[2] for t in tensors.values() if t[2] is not None]
    base = min(starts) if starts else len(b)
    base -= base % align
    tl = [(n, list(dims), t, (off - base) if off is not None else 0) for n, (t, dims, off, _) in tensors.items()]
    return version, kv, tl, b[base:], align


TOKEN_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
EDGE_PIECES = ["", " ", "\u2581", "a", "ab", "ba", "<0x41>", "<0xZZ>", "<eos>", "<bos>", "<end_of_turn>",
               "<start_of_turn>", "a\nb", "\ud800", "\u00e9", "\U0001F600", "a" * 1000, "ab" * 3000]
EDGE_SCORES = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e38, -1e38, 1e-45, -1000.0, 5.0]
EDGE_TYPES = [0, 1, 2, 3, 4, 5, 6, 7, 255, -1, 1 << 31]


def mutate_token_arrays(rnd, kv):
    """tokenizer.ggml.tokens / scores / token_type changed together, so that their lengths
    still agree and export.py reads past its length check: an entry's piece, score or type
    set to an edge value, entries inserted or dropped at the same index in all three, a run
    of long pieces appended, or one array's element type changed (same length)."""
    at = {k: i for i, (k, _, _) in enumerate(kv)}
    if not all(k in at and kv[at[k]][1] == E.GGUF_ARRAY for k in TOKEN_ARRAYS):
        return
    arrays = {k: list(kv[at[k]][2][1]) for k in TOKEN_ARRAYS}
    types = {k: kv[at[k]][2][0] for k in TOKEN_ARRAYS}
    n = len(arrays["tokenizer.ggml.tokens"])
    if any(len(v) != n for v in arrays.values()) or n == 0:
        return
    toks, scores, ttypes = (arrays[k] for k in TOKEN_ARRAYS)
    op = rnd.randrange(7)
    i = rnd.randrange(n)
    if op == 0:
        toks[i] = rnd.choice(EDGE_PIECES + [rnd.choice(toks)])
    elif op == 1:
        scores[i] = rnd.choice(EDGE_SCORES)
    elif op == 2:
        ttypes[i] = rnd.choice(EDGE_TYPES)
    elif op == 3:  # an entry inserted in all three
        toks.insert(i, rnd.choice(EDGE_PIECES + toks))
        scores.insert(i, rnd.choice(EDGE_SCORES + [-float(i)]))
        ttypes.insert(i, rnd.choice([1, 1, 3, 4, 6]))
    elif op == 4:  # an entry dropped from all three
        for a in (toks, scores, ttypes):
            del a[i]
    elif op == 5:  # a run of long pieces (every prefix of the next one)
        k = rnd.choice([10, 100, 300])
        unit = rnd.choice(["a", "ab", "\u2581"])
        toks += [unit * j for j in range(1, k + 1)]
        scores += [rnd.choice([0.0, -float(j)]) for j in range(k)]
        ttypes += [1] * k
    else:  # one array of another element type, same length
        key = rnd.choice(TOKEN_ARRAYS)
        types[key] = rnd.choice([k for k in (4, 5, 6, 7, 8, 12) if k != types[key]])
        conv = {8: str, 7: bool, 6: float, 12: float}.get(types[key], lambda v: int(v) if isinstance(v, (int, float)) and
                                                         math.isfinite(v) else 0)
        arrays[key] = [conv(v) if not isinstance(v, str) or types[key] == 8 else len(v) for v in arrays[key]]
    for k in TOKEN_ARRAYS:
        kv[at[k]] = (k, E.GGUF_ARRAY, (types[k], arrays[k]))


def mutate_gguf(rnd, b):
    parsed = parse_gguf(b)
    if parsed is None:
        return None
    version, kv, tl, data, align = parsed
    for _ in range(rnd.choice([1, 1, 2])):
        op = rnd.randrange(9)
        if op >= 7:
            mutate_token_arrays(rnd, kv)
            continue
        if op == 0 and kv:  # a value of another type, or an edge value
            i = rnd.randrange(len(kv))
            t, v = rnd.choice(GGUF_VALUES)
            kv[i] = (kv[i][0], t, v)
        elif op == 1 and kv:
            del kv[rnd.randrange(len(kv))]
        elif op == 2:
            t, v = rnd.choice(GGUF_VALUES)
            kv.append((rnd.choice(GGUF_KEYS), t, v))
        elif op == 3 and tl:  # a tensor's dimensions
            i = rnd.randrange(len(tl))
            dims = list(tl[i][1])
            j = rnd.randrange(len(dims))
            dims[j] = rnd.choice([0, 1, 16, 32, 33, 64, 256, 1 << 32, (1 << 64) - 1, dims[j] * 2, dims[j] // 2])
            if rnd.random() < 0.2:
                dims = dims + [1] if rnd.random() < 0.5 else dims[:1]
            tl[i] = (tl[i][0], dims, tl[i][2], tl[i][3])
        elif op == 4 and tl:  # a tensor's type or offset
            i = rnd.randrange(len(tl))
            n, dims, t, off = tl[i]
            if rnd.random() < 0.5:
                t = rnd.choice(list(E.GGML_TYPES) + [4, 15, 24, 1000])
            else:
                off = rnd.choice([0, off + 32, off - 32, off + 1, len(data), 1 << 40])
            tl[i] = (n, dims, t, max(0, off))
        elif op == 5 and tl:  # a tensor dropped, duplicated or renamed
            i = rnd.randrange(len(tl))
            r = rnd.random()
            if r < 0.4:
                del tl[i]
            elif r < 0.7:
                tl.append(tl[i])
            else:
                tl[i] = (rnd.choice(["blk.5.attn_q.weight", "output.weight", "v.patch", "blk.0.x.weight",
                                     "token_embd.weight", "blk.0.attn_q.weight\n"]),) + tl[i][1:]
        elif op == 6:
            version = rnd.choice([1, 2, 3, 4, 3 << 24])
    return gguf_bytes(kv, tl, data, version, align)


# ----------------------------------------------------------------------------
# running one input: export.py's readers, in-process, under a time and memory budget

EXPORT_FILE = os.path.abspath(E.__file__)


class Coverage:
    """Lines of export.py reached (sys.settrace, export.py's frames only): an input that
    reaches a new one joins the corpus."""

    def __init__(self):
        self.seen, self.new = set(), 0

    def global_trace(self, frame, event, arg):
        if frame.f_code.co_filename == EXPORT_FILE:
            return self.local_trace
        return None

    def local_trace(self, frame, event, arg):
        if event == "line":
            key = (frame.f_code.co_firstlineno, frame.f_lineno)
            if key not in self.seen:
                self.seen.add(key)
                self.new += 1
        return self.local_trace


def build_safetensors(header_text, rnd):
    """model.safetensors from a (mutated) header: its length, the header, and zero bytes
    up to the largest data offset it declares (at most MAX_DATA)."""
    end = 0
    try:
        h = json.loads(header_text)
        if isinstance(h, dict):
            for v in h.values():
                offs = v.get("data_offsets") if isinstance(v, dict) else None
                if isinstance(offs, list):
                    end = max([end] + [o for o in offs if isinstance(o, int) and o <= MAX_DATA])
    except (ValueError, RecursionError):
        pass
    n = len(header_text)
    if rnd.random() < 0.05:
        n = rnd.choice(INTERESTING)
    return struct.pack("<Q", n % (1 << 64)) + header_text + b"\0" * end


def write(src, work, dtype):
    """write_model into a scratch file."""
    path = os.path.join(work, "out.bin")
    with open(path, "wb", buffering=0) as raw:
        E.write_model(src, raw, path, dtype, True)


def run_hf(work, case, rnd):
    config, header, index, tokenizer = case
    d = os.path.join(work, "ckpt")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    with open(os.path.join(d, "config.json"), "wb") as f:
        f.write(config)
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(build_safetensors(header, rnd))
    for name, data in (("model.safetensors.index.json", index), ("tokenizer.json", tokenizer)):
        if data is not None:
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
    dtype = rnd.choice(["bf16", "f32"])  # (--dtype gguf is for GGUF files: main refuses it for a directory)
    quant = rnd.choice([None, None, "q8_0", "q4_0"])
    src = E.load_hf(d, dtype, quant)
    write(src, work, dtype)


def run_gguf(work, case, rnd):
    """The whole export, as load_gguf does it (tools/gguf_dequant dequantizing every
    tensor), into a scratch file; a file whose tensors would be over 64 MiB is planned only."""
    path = os.path.join(work, "in.gguf")
    with open(path, "wb") as f:
        f.write(case)
    dtype = rnd.choice(["bf16", "f32", "gguf"])
    cfg, vocab, tok_bytes, special, jobs, plan = E.plan_gguf(path, dtype, rnd.random() < 0.5,
                                                            rnd.choice([None, "q8_0", "q4_0"]))
    if sum(p[3] for p in plan) <= 64 << 20:
        deq = E.Dequantizer(path, jobs, True)
        tensors = [(ours, shape, dt, nb, lambda nb=nb, g=g, off=off: E.copy_bytes(path, off, nb) if off is not None
                    else deq.read(nb, g)) for ours, shape, dt, nb, g, off in plan]
        try:
            src = E.Source(cfg, vocab, tok_bytes, special, tensors, close=deq.close)
        except BaseException:
            deq.close()
            raise
        write(src, work, dtype)


def on_alarm(signum, frame):
    raise Budget()


def execute(target, work, case, seed, cov):
    """Run one input. Returns None (exported, or refused with a one-line ExportError) or
    the finding (a short description and the traceback)."""
    rnd = random.Random(seed)
    signal.setitimer(signal.ITIMER_REAL, TIME_BUDGET)
    sys.settrace(cov.global_trace)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            (run_hf if target == "hf" else run_gguf)(work, case, rnd)
        return None
    except E.ExportError as e:
        line = E.error_line(e)
        if "\n" in line or "\r" in line or len(line) > 1000:
            return f"ExportError message not one short line ({len(line)} chars)", traceback.format_exc()
        return None
    except Budget:
        return f"over the time budget of {TIME_BUDGET} s", traceback.format_exc()
    except MemoryError:
        return "over the memory budget", traceback.format_exc()
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:200]}", traceback.format_exc()
    finally:
        sys.settrace(None)
        signal.setitimer(signal.ITIMER_REAL, 0)


def where(tb):
    """The innermost export.py line of a traceback: findings are told apart by it."""
    lines = [ln for ln in tb.splitlines() if ln.strip().startswith("File ") and "export.py" in ln]
    return lines[-1].strip() if lines else tb.splitlines()[-1] if tb else "?"


def save_finding(target, case, n, what, tb):
    os.makedirs(FINDINGS, exist_ok=True)
    base = os.path.join(FINDINGS, f"{target}-{n}")
    if target == "hf":
        os.makedirs(base, exist_ok=True)
        for name, data in zip(HF_PARTS, case):
            if data is not None:
                with open(os.path.join(base, name), "wb") as f:
                    f.write(data)
    else:
        with open(base + ".gguf", "wb") as f:
            f.write(case)
    with open(base + ".txt", "w") as f:
        f.write(f"{what}\n\n{tb}")
    return base


# ----------------------------------------------------------------------------
# the loop

HF_PARTS = ("config.json", "header.json", "index.json", "tokenizer.json")


def load_seeds():
    hf = []
    for fam in sorted(os.listdir(SEEDS)):
        d = os.path.join(SEEDS, fam)
        if fam.startswith("hf-"):
            config, header, index, tokenizer = [open(os.path.join(d, n), "rb").read() for n in HF_PARTS]
            hf += [(config, header, None, None), (config, header, index, None), (config, header, None, tokenizer)]
    gguf = [open(os.path.join(SEEDS, "gguf", n), "rb").read() for n in sorted(os.listdir(os.path.join(SEEDS, "gguf")))]
    return {"hf": hf, "gguf": gguf}


def mutate(target, rnd, case, corpus):
    if target == "gguf":
        if rnd.random() < 0.5:
            m = mutate_gguf(rnd, case)
            if m is not None:
                return m
        return mutate_bytes(rnd, case, corpus)
    parts = list(case)
    for i in rnd.sample(range(len(HF_PARTS)), rnd.choice([1, 1, 1, 2])):
        if parts[i] is None:
            parts[i] = rnd.choice(corpus)[i] if rnd.random() < 0.5 else None
            continue
        m = mutate_json(rnd, parts[i]) if rnd.random() < 0.6 else None
        parts[i] = m if m is not None else mutate_bytes(rnd, parts[i], [c[i] for c in corpus if c[i]])
    return tuple(parts)


def main():
    ap = argparse.ArgumentParser(description="Fuzz export.py's readers (safetensors, config, index, GGUF).")
    ap.add_argument("--seconds", type=float, default=60, help="how long to run (default 60)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock; printed)")
    ap.add_argument("--target", choices=["hf", "gguf", "all"], default="all")
    ap.add_argument("--make-seeds", action="store_true", help="write the seed corpora into tests/fuzz/ and exit")
    args = ap.parse_args()
    if args.make_seeds:
        make_seeds()
        return 0
    seed = args.seed if args.seed is not None else int(time.time())
    rnd = random.Random(seed)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > MEMORY_BUDGET:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BUDGET, hard))
    signal.signal(signal.SIGALRM, on_alarm)
    # tools/gguf_dequant, built (or found) once: export.py asks make before every file
    dequant = E.build_with_make("tools/gguf_dequant", "it dequantizes GGUF tensors", True, refresh=True)
    E.build_with_make = lambda *a, **k: dequant
    targets = ["hf", "gguf"] if args.target == "all" else [args.target]
    corpus = load_seeds()
    cov = Coverage()
    execs = {t: 0 for t in targets}
    findings = {}
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    work = tempfile.mkdtemp(prefix="fuzz-export-", dir=shm)
    print(f"fuzz_export: seed {seed}, {args.seconds:g} s, targets {', '.join(targets)}, "
          f"budget {TIME_BUDGET:g} s and {MEMORY_BUDGET >> 20} MiB per input", flush=True)
    t0 = last = time.time()
    try:
        for t in targets:  # the seeds themselves must export
            for case in corpus[t]:
                r = execute(t, work, case, 0, cov)
                if r:
                    print(f"fuzz_export: a seed fails ({t}): {r[0]}\n{r[1]}")
                    return 2
        while time.time() - t0 < args.seconds:
            t = rnd.choice(targets)
            case = mutate(t, rnd, rnd.choice(corpus[t]), corpus[t])
            before = cov.new
            r = execute(t, work, case, rnd.randrange(1 << 30), cov)
            execs[t] += 1
            if r:
                key = (t, r[0].split(":")[0], where(r[1]))
                if key not in findings:
                    findings[key] = save_finding(t, case, len(findings) + 1, *r)
                    print(f"fuzz_export: FINDING ({t}) {r[0]} at {where(r[1])} -> {findings[key]}", flush=True)
            elif cov.new > before and len(corpus[t]) < 5000:
                corpus[t].append(case)
            if time.time() - last > 30:
                last = time.time()
                print(f"fuzz_export: {sum(execs.values())} executions, {len(cov.seen)} lines of export.py, "
                      f"corpus {sum(len(c) for c in corpus.values())}, {len(findings)} findings, "
                      f"{last - t0:.0f} s", flush=True)
    except KeyboardInterrupt:
        print("fuzz_export: interrupted")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = sum(execs.values())
    print(f"fuzz_export: {total} executions ({', '.join(f'{t} {n}' for t, n in execs.items())}) in "
          f"{time.time() - t0:.0f} s, {len(cov.seen)} lines of export.py reached, {len(findings)} findings"
          + (f" (saved under {FINDINGS})" if findings else ""))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
