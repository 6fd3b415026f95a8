#!/usr/bin/env python3
"""MLX import: bad checkpoints (test_all.c checks the good ones' logits).

    python3 tests/test_mlx.py

Each case copies a checkpoint of tests/fixtures/mlx (made by mlx_lm, see its README) or
tests/fixtures/tiny with one thing broken, runs export.py on it and wants: exit status 1,
one line on stderr naming the problem, no traceback, no output or temporary file left.
Standard library only. Prints one line per check ("ok - ..." / "not ok - ...") and ends
with "N passed, N failed".
"""
import json
import os
import shutil
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "mlx")
TINY = os.path.join(ROOT, "tests", "fixtures", "tiny")
W = os.path.join(ROOT, "tests", "build", "mlx")
passed = failed = 0


def check(cond, what, detail=""):
    global passed, failed
    if cond:
        passed += 1
        print(f"ok - {what}")
    else:
        failed += 1
        print(f"not ok - {what}" + (f": {detail}" if detail else ""))
    return cond


def copy(src):
    dst = os.path.join(W, "bad")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def edit_config(d, change):
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    change(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f)


def edit_header(d, change):
    """Rewrite model.safetensors with its header changed by change(header, data) (which
    may return new data bytes)."""
    path = os.path.join(d, "model.safetensors")
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    new = change(header, data)
    data = new if isinstance(new, bytes) else data
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def expect_error(what, d, needle, *extra):
    out = os.path.join(W, "bad.bin")
    if os.path.exists(out):
        os.remove(out)
    r = subprocess.run(["python3", "export.py", d, out, "-q", *extra], cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    err = r.stderr.decode("utf-8", "replace")
    lines = err.strip().splitlines()
    left = [n for n in os.listdir(W) if n.startswith(".bad.bin")] + (["bad.bin"] if os.path.exists(out) else [])
    print("#", lines[-1] if lines else "")
    check(r.returncode == 1 and len(lines) == 1 and lines[0].startswith("export.py: error: ") and needle in lines[0]
          and not left, f"{what}: refused", f"exit {r.returncode}, left {left}, stderr {err.strip()[-400:]!r}")


def quantized_name(d, module):
    """The full tensor name prefix of a module (flat or multimodal layout)."""
    with open(os.path.join(d, "model.safetensors"), "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        names = json.loads(f.read(n))
    return next(k[:-len(".scales")] for k in names if k.endswith(module + ".scales"))


def main():
    os.makedirs(W, exist_ok=True)
    q4 = os.path.join(FIX, "q4-g64-mqa")  # flat, hidden 64, 4-bit groups of 64
    mixed = os.path.join(FIX, "mixed_3_6-g64-gqa-mm")  # multimodal layout, per-module entries

    d = copy(q4)
    m = quantized_name(d, "layers.0.mlp.up_proj")

    def truncate_words(h, data):
        e = h[m + ".weight"]
        e["shape"][1] -= 1
        e["data_offsets"][1] -= 4 * e["shape"][0]
    edit_header(d, truncate_words)
    expect_error("packed weight one word short per row", d, f"tensor layers.0.mlp.up_proj.weight is U32 [64, 7], "
                 "expected U32 [64, 8]")

    d = copy(q4)
    with open(os.path.join(d, "model.safetensors"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(d, "model.safetensors")) - 100)
    expect_error("file cut short (its last tensor past the end)", d, "lies past the end of the file")

    d = copy(q4)
    edit_header(d, lambda h, data: h[m + ".scales"].update(shape=[32, 2]))
    expect_error("scales of the wrong shape", d, "tensor layers.0.mlp.up_proj.scales is BF16 [32, 2], expected")

    d = copy(q4)
    edit_header(d, lambda h, data: h[m + ".biases"].update(dtype="U32", shape=[32, 1]))
    expect_error("biases not floats", d, "tensor layers.0.mlp.up_proj.biases is U32")

    d = copy(q4)
    edit_header(d, lambda h, data: h.pop(m + ".biases"))
    expect_error("biases missing", d, "missing tensor layers.0.mlp.up_proj.biases")

    d = copy(q4)
    edit_header(d, lambda h, data: h.pop(m + ".scales"))
    expect_error("scales missing", d, "missing tensor layers.0.mlp.up_proj.scales")

    d = copy(q4)
    edit_config(d, lambda c: [c[k].update(group_size=128) for k in ("quantization", "quantization_config")])
    expect_error("group size that does not divide the row", d, "group_size 128 does not divide the rows of embed_tokens (64 values)")

    d = copy(q4)
    edit_config(d, lambda c: [c[k].update(bits=7) for k in ("quantization", "quantization_config")])
    expect_error("bits 7", d, "quantization.bits 7 is not one of MLX's affine widths")

    d = copy(q4)
    edit_config(d, lambda c: [c[k].update(group_size=48) for k in ("quantization", "quantization_config")])
    expect_error("group size 48", d, "quantization.group_size 48 is not one of MLX's")

    d = copy(q4)
    edit_config(d, lambda c: [c[k].update(mode="fancy") for k in ("quantization", "quantization_config")])
    expect_error("unknown mode", d, "quantization.mode 'fancy' is unknown")

    d = copy(q4)
    edit_config(d, lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}, quantization=None))
    expect_error("Hugging Face quantization (GPTQ)", d, "quantization_config.quant_method 'gptq' is not supported")

    d = copy(q4)
    edit_config(d, lambda c: [c.pop(k) for k in ("quantization", "quantization_config")])
    expect_error("packed tensors, config without quantization", d, "is quantized, but")

    d = copy(TINY)
    edit_config(d, lambda c: c.update(quantization={"group_size": 64, "bits": 4, "mode": "affine"}))
    expect_error("config says quantized, tensors are not", d, "but no tensor is quantized")

    d = copy(mixed)
    key = quantized_name(d, "layers.1.mlp.down_proj")
    edit_config(d, lambda c: [c[k].update({key: False}) for k in ("quantization", "quantization_config")])
    expect_error("a module marked unquantized has scales", d, "marks layers.1.mlp.down_proj unquantized")

    d = copy(mixed)
    edit_config(d, lambda c: [c[k][key].update(bits=4) for k in ("quantization", "quantization_config")])
    expect_error("a module's entry disagrees with its tensors", d, "tensor layers.1.mlp.down_proj.weight is U32 [64, 12], "
                 "expected U32 [64, 8]")

    d = copy(mixed)
    edit_config(d, lambda c: [c[k].update({"language_model.model.layers.9.mlp.up_proj": False})
                              for k in ("quantization", "quantization_config")])
    expect_error("an entry for a module the model lacks", d, "names 'layers.9.mlp.up_proj', which is not a matrix")

    d = copy(q4)
    edit_header(d, lambda h, data: h[m + ".scales"].update(dtype="U32", shape=[32, 1]))
    expect_error("scales not floats", d, "tensor layers.0.mlp.up_proj.scales is U32")

    d = copy(TINY)
    edit_header(d, lambda h, data: h["model.layers.0.input_layernorm.weight"].update(dtype="U32", shape=[32]))
    expect_error("a U32 norm", d, "tensor 'layers.0.input_layernorm.weight' has dtype U32")

    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
