#!/usr/bin/env python3
"""Copy a Hugging Face checkpoint directory with one thing broken, for export.py's
bad-input tests. Standard library only.

    python3 tests/mutate_checkpoint.py SRC_DIR DST_DIR drop TENSOR      # remove a tensor
    python3 tests/mutate_checkpoint.py SRC_DIR DST_DIR add TENSOR       # add an unknown 1-D tensor
    python3 tests/mutate_checkpoint.py SRC_DIR DST_DIR reshape TENSOR   # declare a wrong shape
    python3 tests/mutate_checkpoint.py SRC_DIR DST_DIR config KEY JSON  # set a config.json key
    python3 tests/mutate_checkpoint.py SRC_DIR DST_DIR rawconfig TEXT   # config.json is TEXT
    python3 tests/mutate_checkpoint.py SRC_DIR DST_DIR header TEXT      # the safetensors header is TEXT
    python3 tests/mutate_checkpoint.py SRC_DIR DST_DIR entry TENSOR FIELD JSON  # set a field of a tensor's header entry
    python3 tests/mutate_checkpoint.py SRC_DIR DST_DIR alias TENSOR OTHER   # TENSOR's data_offsets are OTHER's
    python3 tests/mutate_checkpoint.py SRC_DIR DST_DIR index TEXT       # add model.safetensors.index.json, TEXT
"""
import json
import os
import shutil
import struct
import sys


def main():
    src, dst, op, name = sys.argv[1:5]
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    if op == "config":
        path = os.path.join(dst, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg[name] = json.loads(sys.argv[5])
        with open(path, "w") as f:
            json.dump(cfg, f)
        return
    if op in ("rawconfig", "index"):
        fn = "config.json" if op == "rawconfig" else "model.safetensors.index.json"
        with open(os.path.join(dst, fn), "w") as f:
            f.write(name)
        return
    path = os.path.join(dst, "model.safetensors")
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    if op == "header":
        raw = name.encode()
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw + data)
        return
    if op == "entry":
        header[name][sys.argv[5]] = json.loads(sys.argv[6])
    elif op == "alias":
        header[name]["data_offsets"] = header[sys.argv[5]]["data_offsets"]
    elif op == "drop":
        del header[name]
    elif op == "add":
        header[name] = {"dtype": "F32", "shape": [1], "data_offsets": [len(data), len(data) + 4]}
        data += b"\0\0\0\0"
    elif op == "reshape":
        shape = header[name]["shape"]
        header[name]["shape"] = [shape[-1]] + shape[:-1] if len(shape) > 1 else shape
        if header[name]["shape"] == shape:
            header[name]["shape"] = shape + [1]
        if header[name]["shape"] == shape:
            sys.exit("cannot reshape " + name)
    else:
        sys.exit("unknown operation " + op)
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


if __name__ == "__main__":
    main()
