#!/usr/bin/env python3
"""Development aid: write the tokenizer section of a gemma3.c model file.

This exists only so tokenizer.c can be tested before export.py lands; the
function pack_tokenizer() is meant to be moved into export.py unchanged, and
this file deleted afterwards.  Standard library only.

Usage: python3 tests/pack_tokenizer.py tokenizer.json out.bin
The output is exactly the "Tokenizer section" of FORMAT.md (no file header).
"""
import json
import re
import struct
import sys

# Base-vocab pieces of this exact shape are the byte-fallback tokens (type 1).
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>\Z")

TOK_NORMAL, TOK_BYTE, TOK_ADDED, TOK_SPECIAL = 0, 1, 2, 3


def pack_tokenizer(tokenizer_json_path):
    """Return the bytes of the tokenizer section for a HF tokenizer.json."""
    with open(tokenizer_json_path, "r", encoding="utf-8") as f:
        tj = json.load(f)
    model = tj["model"]
    if model.get("type") != "BPE":
        raise ValueError("tokenizer model type %r, expected BPE" % model.get("type"))
    vocab = model["vocab"]                    # piece -> id
    added = tj.get("added_tokens") or []      # [{id, content, special, ...}]

    n_tokens = 1 + max([int(i) for i in vocab.values()] + [int(a["id"]) for a in added])
    pieces = [b""] * n_tokens                 # ids missing everywhere: empty piece, type 0
    types = bytearray(n_tokens)
    for piece, i in vocab.items():
        pieces[i] = piece.encode("utf-8")
        if _BYTE_PIECE.match(piece):
            types[i] = TOK_BYTE
    # Added tokens win over the base vocab for the same id (HF decode looks
    # them up first); for Gemma 3 the strings are identical anyway.
    for a in added:
        i = int(a["id"])
        pieces[i] = a["content"].encode("utf-8")
        types[i] = TOK_SPECIAL if a.get("special") else TOK_ADDED

    # Merges come either as [a, b] pairs (new format) or "a b" strings (old).
    merges = []
    for rank, m in enumerate(model.get("merges") or []):
        if isinstance(m, str):
            parts = m.split(" ")
            if len(parts) != 2:
                raise ValueError("merge %d: %r is not 'a b'" % (rank, m))
            a, b = parts
        else:
            a, b = m
        for p in (a, b, a + b):
            if p not in vocab:
                raise ValueError("merge %d (%r, %r): %r not in vocab" % (rank, a, b, p))
        merges.append((vocab[a], vocab[b], vocab[a + b]))

    out = bytearray()
    out += struct.pack("<4I", n_tokens, len(merges), len(added), 0)
    off = 0
    offsets = [0]
    for p in pieces:
        off += len(p)
        offsets.append(off)
    if off >= 1 << 32:
        raise ValueError("string blob over 4 GiB")
    out += struct.pack("<%dI" % len(offsets), *offsets)
    for m in merges:
        out += struct.pack("<3I", *m)
    out += struct.pack("<%dI" % len(added), *[int(a["id"]) for a in added])
    out += types
    out += b"".join(pieces)
    return bytes(out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: pack_tokenizer.py tokenizer.json out.bin")
    data = pack_tokenizer(sys.argv[1])
    with open(sys.argv[2], "wb") as f:
        f.write(data)
    print("wrote %d bytes to %s" % (len(data), sys.argv[2]))
