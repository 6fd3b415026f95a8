#!/usr/bin/env python3
"""MLX import: edge-case values, bf16 and sharded exports, bad checkpoints (test_all.c
checks the logits).

    python3 tests/test_mlx.py

On checkpoints of tests/fixtures/mlx (made by mlx_lm, see its README): each matrix of
fixtures/mlx/edges (every code, scales at the formats' edges), swapped into its fixture,
exports to what mx.dequantize made of it in float32, bit for bit; a quantized vision
tower as mlx-vlm keeps one (and its config entries) is skipped; a stored lm_head is
exported only where it differs from the embedding; the bf16 export
holds the f32 export's matrices rounded to bf16, and the same checkpoint split into two
shards (each weight in the other shard than its scales) gives the same f32 export. Then
each bad case copies a fixture (or tests/fixtures/tiny) with one thing broken, runs
export.py on it and wants: exit status 1, one line on stderr naming the problem (printed
as a "#" line), no traceback, no output or temporary file left. Standard library only. Prints one line per check ("ok - ..." / "not ok - ...") and ends
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


def export(d, out, *extra):
    r = subprocess.run(["python3", "export.py", d, out, "-q", *extra], cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    return r.returncode, r.stderr.decode("utf-8", "replace").strip()


def model_tensors(path):
    """{name: (dtype code, raw bytes)} of a gemma3.c model file (FORMAT.md)."""
    with open(path, "rb") as f:
        blob = f.read()
    n, dir_off = struct.unpack_from("<I", blob, 88)[0], struct.unpack_from("<Q", blob, 112)[0]
    out = {}
    for i in range(n):
        e = dir_off + 104 * i
        name = blob[e:e + 64].rstrip(b"\0").decode()
        dtype = struct.unpack_from("<I", blob, e + 64)[0]
        off, nbytes = struct.unpack_from("<QQ", blob, e + 88)
        out[name] = (dtype, blob[off:off + nbytes])
    return out


def bf16_of(raw):
    """float32 bytes -> bf16 bytes, rounded to nearest even (no NaNs here)."""
    words = struct.unpack(f"<{len(raw) // 4}I", raw)
    return struct.pack(f"<{len(words)}H", *(((w + 0x7FFF + ((w >> 16) & 1)) >> 16) & 0xFFFF for w in words))


def reshard(src, dst):
    """src's model.safetensors split in two shards with an index, each module's weight
    in the other shard than its scales and biases."""
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    with open(os.path.join(src, "model.safetensors"), "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    shards = [{}, {}]
    for name, e in header.items():
        shards[0 if name.endswith(".weight") else 1][name] = data[e["data_offsets"][0]:e["data_offsets"][1]]
    weight_map = {}
    for i, tensors in enumerate(shards):
        fn = f"model-0000{i + 1}-of-00002.safetensors"
        head, blob = {}, b""
        for name, raw in tensors.items():
            head[name] = {"dtype": header[name]["dtype"], "shape": header[name]["shape"],
                          "data_offsets": [len(blob), len(blob) + len(raw)]}
            blob += raw
            weight_map[name] = fn
        raw_head = json.dumps(head).encode()
        with open(os.path.join(dst, fn), "wb") as f:
            f.write(struct.pack("<Q", len(raw_head)) + raw_head + blob)
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)


def read_safetensors(path):
    """{name: (dtype, shape, raw bytes)} of a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    return {k: (e["dtype"], e["shape"], data[e["data_offsets"][0]:e["data_offsets"][1]]) for k, e in header.items()}


def check_edges():
    """Each file of fixtures/mlx/edges (tools/make_mlx_fixtures.py) holds one matrix of a
    fixture with every code and edge-case scales, and what mx.dequantize makes of it in
    float32: swapped into a copy of the fixture, its f32 export must hold exactly that."""
    for fn in sorted(os.listdir(os.path.join(FIX, "edges"))):
        edge = read_safetensors(os.path.join(FIX, "edges", fn))
        fixture, matrix = {"affine-f16": ("q6-g64-mqa-mm", "layers.0.mlp.up_proj"),
                           "affine-bf16": ("q4-g64-mqa", "layers.0.mlp.up_proj"),
                           "mxfp4": ("mxfp4-mqa", "layers.0.mlp.up_proj"),
                           "nvfp4": ("nvfp4-mqa-mm", "embed_tokens"),
                           "mxfp8": ("mxfp8-mqa", "layers.0.mlp.up_proj")}[fn[:-len(".safetensors")]]
        d = copy(os.path.join(FIX, fixture))
        prefix = quantized_name(d, matrix)
        path = os.path.join(d, "model.safetensors")
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        with open(path, "r+b") as f:
            for t in ("weight", "scales", "biases"):
                if t in edge:
                    e = header[f"{prefix}.{t}"]
                    assert [e["dtype"], e["shape"]] == list(edge[t][:2]), (fn, t)
                    f.seek(8 + n + e["data_offsets"][0])
                    f.write(edge[t][2])
        out = os.path.join(W, "edges.bin")
        rc, err = export(d, out, "--dtype", "f32")
        if not check(rc == 0, f"edges {fn}: export", err):
            continue
        got = model_tensors(out)[matrix + ".weight"][1]
        want = edge["expected"][2]
        differ = sum(a != b for a, b in zip(struct.iter_unpack("<I", got), struct.iter_unpack("<I", want)))
        check(len(got) == len(want) and not differ, f"edges {fn}: {len(want) // 4} values bit for bit mx.dequantize's",
              f"{differ} differ")


def check_vision_tower():
    """mlx-vlm keeps the vision tower of a multimodal checkpoint, quantized too, and names
    its modules in config.json's quantization: skipped, the export is the text model's."""
    src = os.path.join(FIX, "q6-g64-mqa-mm")
    d = copy(src)

    def add_tower(h, data):
        for name, dtype, shape, size in (("vision_tower.encoder.layers.0.mlp.fc1.weight", "U32", [8, 12], 384),
                                         ("vision_tower.encoder.layers.0.mlp.fc1.scales", "F16", [8, 1], 16),
                                         ("vision_tower.encoder.layers.0.mlp.fc1.biases", "F16", [8, 1], 16),
                                         ("multi_modal_projector.mm_input_projection_weight", "F16", [4, 4], 32)):
            h[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + size]}
            data += bytes(size)
        return data
    edit_header(d, add_tower)
    entry = {"group_size": 64, "bits": 6, "mode": "affine"}
    edit_config(d, lambda c: [c[k].update({"vision_tower.encoder.layers.0.mlp.fc1": entry,
                                           "multi_modal_projector": False}) for k in ("quantization",
                                                                                       "quantization_config")])
    want, got = os.path.join(W, "mm.bin"), os.path.join(W, "mm-vision.bin")
    (rc1, e1), (rc2, e2) = export(src, want, "--dtype", "f32"), export(d, got, "--dtype", "f32")
    same = False
    if rc1 == 0 and rc2 == 0:
        with open(want, "rb") as fa, open(got, "rb") as fb:
            same = fa.read() == fb.read()
    check(same, "a quantized vision tower and its config entries: skipped, the same export", f"{e1} {e2}")


def check_classifier():
    """mlx-vlm stores the text model's lm_head, quantized like the embedding (the fixture
    vlm-mixed_3_6-mqa-mm): the same bytes, so the export stays tied. With its scales and
    biases doubled, its values are the embedding's times 2, exactly: the export then has
    an lm_head.weight of those values, which gemma3 loads."""
    src = os.path.join(FIX, "vlm-mixed_3_6-mqa-mm")
    tied = os.path.join(W, "vlm-tied.bin")
    rc, err = export(src, tied, "--dtype", "f32")
    check(rc == 0 and "lm_head.weight" not in model_tensors(tied), "mlx-vlm's lm_head, the embedding again: tied", err)

    d = copy(src)

    def double(raw):  # bf16 values times 2 (normal numbers and zeros: exact)
        out = []
        for (u,) in struct.iter_unpack("<H", raw):
            f = struct.unpack("<f", struct.pack("<I", u << 16))[0] * 2
            out.append(struct.unpack("<I", struct.pack("<f", f))[0] >> 16)
        return struct.pack(f"<{len(out)}H", *out)

    def double_head(h, data):
        data = bytearray(data)
        for t in ("scales", "biases"):
            a, b = h[f"language_model.lm_head.{t}"]["data_offsets"]
            data[a:b] = double(bytes(data[a:b]))
        return bytes(data)
    edit_header(d, double_head)
    untied = os.path.join(W, "vlm-untied.bin")
    rc, err = export(d, untied, "--dtype", "f32")
    t = model_tensors(untied) if rc == 0 else {}
    twice = b""
    if "embed_tokens.weight" in t:
        words = struct.iter_unpack("<f", t["embed_tokens.weight"][1])
        twice = struct.pack(f"<{len(t['embed_tokens.weight'][1]) // 4}f", *(2 * x for (x,) in words))
    check("lm_head.weight" in t and t["lm_head.weight"][1] == twice,
          "an lm_head unlike the embedding: exported untied, its values exactly", err)
    r = subprocess.run(["./gemma3", untied, "--logits", os.path.join(src, "tokens.txt"), os.path.join(W, "untied.f32")],
                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    check(r.returncode == 0, "gemma3 runs the untied export", r.stderr.decode("utf-8", "replace").strip())


def main():
    os.makedirs(W, exist_ok=True)
    check_edges()
    check_vision_tower()
    check_classifier()

    # good checkpoints: the bf16 export is the f32 one rounded; shards change nothing
    for name in ("q3-g32-gqa", "nvfp4-mqa-mm"):
        src = os.path.join(FIX, name)
        f32, bf16, sharded = (os.path.join(W, f"{name}-{t}.bin") for t in ("f32", "bf16", "sharded"))
        results = [export(src, f32, "--dtype", "f32"), export(src, bf16, "--dtype", "bf16")]
        reshard(src, os.path.join(W, "sharded"))
        results.append(export(os.path.join(W, "sharded"), sharded, "--dtype", "f32"))
        if not check(all(rc == 0 for rc, _ in results), f"{name}: export f32, bf16, sharded f32",
                     "; ".join(err for _, err in results)):
            continue
        a, b = model_tensors(f32), model_tensors(bf16)
        matrices = [n for n in a if a[n][0] == 0 and len(b[n][1]) * 2 == len(a[n][1])]
        check(len(matrices) == 15 and all(b[n][1] == bf16_of(a[n][1]) for n in matrices),
              f"{name}: bf16 export = f32 export rounded to bf16, all 15 matrices")
        with open(f32, "rb") as fa, open(sharded, "rb") as fb:
            check(fa.read() == fb.read(), f"{name}: weights and scales in different shards: the same f32 export")
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

    fp4 = os.path.join(FIX, "mxfp4-mqa")  # mode mxfp4: U8 scales, no biases
    d = copy(fp4)
    edit_config(d, lambda c: [c[k].update(bits=8) for k in ("quantization", "quantization_config")])
    expect_error("mxfp4 with 8 bits", d, "mode mxfp4 packs 4-bit values in groups of 32, not bits 8")

    d = copy(fp4)
    edit_config(d, lambda c: [c[k].update(mode="nvfp4", group_size=16) for k in ("quantization", "quantization_config")])
    expect_error("mxfp4 tensors, config says nvfp4", d, "tensor embed_tokens.scales is U8 [256, 1], expected U8 and "
                 "[256, 2]")

    d = copy(fp4)
    e = quantized_name(d, "layers.0.mlp.up_proj")
    def add_biases(h, data):
        h[e + ".biases"] = {"dtype": "BF16", "shape": [32, 1], "data_offsets": [len(data), len(data) + 64]}
        return data + bytes(64)
    edit_header(d, add_biases)
    expect_error("biases in mode mxfp4", d, "tensor layers.0.mlp.up_proj.biases: quantization mode mxfp4 has no biases")

    d = copy(fp4)
    edit_header(d, lambda h, data: h[e + ".scales"].update(dtype="BF16", shape=[16, 1]))
    expect_error("mxfp4 scales not U8", d, "tensor layers.0.mlp.up_proj.scales is BF16 [16, 1], expected U8")

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
