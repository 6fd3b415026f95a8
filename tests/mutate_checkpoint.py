#!/usr/bin/env python3
"""Copy a Hugging Face checkpoint directory with one thing broken, for export.py's
bad-input tests. Standard library only.

    python3 tests/mutate_checkpoint.py SRC_DIR DST_DIR drop TENSOR      # remove a tensor
    python3 tests/mutate_checkpoint.py SRC_DIR DST_DIR add TENSOR       # add an unknown 1-D tensor
    python3 tests/mutate_checkpoint.py SRC_DIR DST_DIR reshape TENSOR   # declare a wrong shape
    python3 tests/mutate_checkpoint.py SRC_DIR DST_DIR config KEY JSON  # set a config.json key
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
    path = os.path.join(dst, "model.safetensors")
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    if op == "drop":
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
