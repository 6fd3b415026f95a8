#!/usr/bin/env python3
"""Make the MLX fixtures in tests/fixtures/mlx/ (run by hand, not in CI).

    python3 -m venv /work/venv-mlx
    /work/venv-mlx/bin/pip install 'mlx[cpu]==0.32.4' mlx-lm==0.32.2
    /work/venv-mlx/bin/python tools/make_mlx_fixtures.py [--out tests/fixtures/mlx] [NAME ...]

Each fixture is a small random Gemma 3 checkpoint (tools/make_checkpoint.py, Hugging Face
layout, bf16) quantized by mlx_lm's own converter (mlx_lm.convert.convert, what
`mlx_lm.convert -q` runs), with:

  config.json, model.safetensors, model.safetensors.index.json   as mlx_lm wrote them
  tokens.txt    token ids (<bos> first)
  logits.f32    float32 logits of every position, row-major [T][vocab], from
                tests/ref_forward.py (the project's independent numpy forward) over the
                weights mx.dequantize gives in float32 (scales and biases upcast to
                float32 first: the values MLX's quantized matmul computes with)
  greedy.txt    the 8 tokens a greedy decode appends

The tokenizer files mlx_lm copies are dropped (a copy of the real Gemma 3 tokenizer.json,
33 MB, which the converter needs to run). tests/fixtures/mlx/README.md lists the fixtures.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOKENIZER = os.path.join(ROOT, "tests", "data", "tokenizer.json")
N_TOKENS, N_GREEDY = 10, 8

# Shapes (make_checkpoint.py arguments), vocab 256, kept small: a fixture is 20-80 KB.
# MQA: one kv head; GQA: two kv heads for four query heads. Groups of 64 need rows of 64
# values (hidden and ffn 64), groups of 32 and 16 do with 32; WIDE has rows of 128 values,
# for groups of 128 (its down_proj rows are 32 wide: mlx_lm leaves it unquantized, bf16).
MQA = "--vocab 256 --hidden 64 --inter 64 --layers 2 --heads 2 --kv-heads 1 --head-dim 32 --window 4 --pattern 2"
GQA = "--vocab 256 --hidden 64 --inter 64 --layers 2 --heads 4 --kv-heads 2 --head-dim 16 --window 4 --pattern 2"
MQA32 = "--vocab 256 --hidden 32 --inter 32 --layers 2 --heads 2 --kv-heads 1 --head-dim 16 --window 4 --pattern 2"
GQA32 = "--vocab 256 --hidden 32 --inter 32 --layers 2 --heads 4 --kv-heads 2 --head-dim 16 --window 4 --pattern 2"
WIDE = "--vocab 256 --hidden 128 --inter 32 --layers 2 --heads 2 --kv-heads 1 --head-dim 64 --window 4 --pattern 2"
# name: (shape, layout, bits, group size, mlx_lm quant predicate, dtype of the float tensors
# and of the affine scales and biases, mode). "mm": the multimodal layout
# (Gemma3ForConditionalGeneration). The floating-point modes have one width and group size.
FIXTURES = {
    "q4-g64-mqa": (MQA, "flat", 4, 64, None, "bfloat16"),
    "q8-g32-gqa-mm": (GQA32, "nested", 8, 32, None, "bfloat16"),
    "q3-g32-gqa": (GQA32, "flat", 3, 32, None, "float32"),
    "q6-g64-mqa-mm": (MQA, "nested", 6, 64, None, "float16"),
    "q5-g32-mqa": (MQA32, "flat", 5, 32, None, "bfloat16"),
    "q2-g128-wide": (WIDE, "flat", 2, 128, None, "bfloat16"),
    "mixed_3_6-g64-gqa-mm": (GQA, "nested", 3, 64, "mixed_3_6", "bfloat16"),
    "mixed_4_6-g32-mqa": (MQA32, "flat", 4, 32, "mixed_4_6", "bfloat16"),
    "q1-g64-gqa": (GQA, "flat", 1, 64, None, "bfloat16"),
    "mxfp4-mqa": (MQA32, "flat", None, None, None, "bfloat16", "mxfp4"),
    "nvfp4-mqa-mm": (MQA32, "nested", None, None, None, "bfloat16", "nvfp4"),
    "mxfp8-mqa": (MQA32, "flat", None, None, None, "float16", "mxfp8"),
}
# Made by mlx-vlm instead (make_vlm): name: (shape, quant predicate).
VLM_FIXTURES = {
    "vlm-mixed_3_6-mqa-mm": (MQA, "mixed_3_6"),
}


def sh(*cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def make_hf(work, shape, layout, seed):
    """A random bf16 checkpoint in Hugging Face layout, with the real tokenizer (mlx_lm's
    loader needs one). The multimodal layout's top-level vocab_size is the text model's
    (mlx_lm's gemma3 model takes the embedding's rows from it, default 262208)."""
    hf = os.path.join(work, "hf")
    sh(sys.executable, os.path.join(HERE, "make_checkpoint.py"), hf, *shape.split(), "--layout", layout,
       "--seed", str(seed), "--tokenizer", TOKENIZER)
    if layout != "flat":
        path = os.path.join(hf, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["vocab_size"] = cfg["text_config"]["vocab_size"]
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
    return hf


def quantize(hf, out, bits, group, recipe, dtype, mode):
    from mlx_lm.convert import convert
    convert(hf, out, quantize=True, q_bits=bits, q_group_size=group, quant_predicate=recipe, dtype=dtype, q_mode=mode)
    keep = {"config.json", "model.safetensors", "model.safetensors.index.json"}
    for name in os.listdir(out):
        if name not in keep:
            os.remove(os.path.join(out, name))


def make_vlm(hf, out, recipe):
    """What `mlx_vlm.convert --quantize --quant-predicate RECIPE` writes, made from its own
    parts: mlx-vlm's Gemma 3 model (the vision tower as mlx initialises it, the text model's
    weights from hf), cast to bf16 as convert casts it, quantized by mlx_vlm.quant_utils'
    quantize_model with convert's mixed predicate, saved by mlx_vlm.utils' save_weights and
    save_config. (convert itself also loads an image processor, which these random
    checkpoints lack.) mlx-vlm keeps the vision tower, unquantized, and the text model's
    lm_head, quantized like the embedding."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from pathlib import Path
    from mlx_vlm.convert import mixed_quant_predicate_builder
    from mlx_vlm.models.gemma3 import Model, ModelConfig, TextConfig, VisionConfig
    from mlx_vlm.quant_utils import quantize_model
    from mlx_vlm.utils import save_config, save_weights
    with open(os.path.join(hf, "config.json")) as f:
        config = json.load(f)
    mc = ModelConfig.from_dict(config)
    mc.text_config = TextConfig.from_dict(config["text_config"])
    mc.vision_config = VisionConfig.from_dict(config["vision_config"])
    mc.text_config.mm_tokens_per_image = config["mm_tokens_per_image"]
    model = Model(mc)
    w = mx.load(os.path.join(hf, "model.safetensors"))
    text = {k: v for k, v in w.items() if k.startswith("language_model.")}
    model.load_weights(list(model.language_model.sanitize(text).items()), strict=False)
    model.update(tree_map(lambda a: a.astype(mx.bfloat16) if mx.issubdtype(a.dtype, mx.floating) else a,
                          model.parameters()))
    model, config = quantize_model(model, config, 64, 4, quant_predicate=mixed_quant_predicate_builder(recipe, model))
    save_weights(Path(out), model, donate_weights=True)
    save_config(config, config_path=Path(out) / "config.json")


def dequantized_checkpoint(mlx_dir, dst):
    """The float32 Hugging Face checkpoint whose every matrix is mx.dequantize of the
    packed one in float32: in mode affine with its scales and biases upcast to float32
    first (so scale * q + bias is computed in float32, as mlx's quantized matmul does:
    mx.dequantize on bf16 scales would round the values to bf16)."""
    import mlx.core as mx
    with open(os.path.join(mlx_dir, "config.json")) as f:
        cfg = json.load(f)
    q = cfg["quantization"]
    w = mx.load(os.path.join(mlx_dir, "model.safetensors"))
    out = {}
    for name, arr in w.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name[:-len(".weight")]
        if name.endswith(".weight") and module + ".scales" in w:
            p = q.get(module, q)
            if p.get("mode", "affine") == "affine":
                arr = mx.dequantize(arr, w[module + ".scales"].astype(mx.float32),
                                    w[module + ".biases"].astype(mx.float32), group_size=p["group_size"], bits=p["bits"])
            else:
                arr = mx.dequantize(arr, w[module + ".scales"], group_size=p["group_size"], bits=p["bits"],
                                    mode=p["mode"], dtype=mx.float32)
        out[name] = arr.astype(mx.float32)
    os.makedirs(dst)
    mx.save_safetensors(os.path.join(dst, "model.safetensors"), out)
    cfg.pop("quantization")
    cfg.pop("quantization_config", None)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)


def make_fixture(name, out_root, seed):
    if name in VLM_FIXTURES:
        (shape, recipe), layout = VLM_FIXTURES[name], "nested"
    else:
        shape, layout, bits, group, recipe, dtype, mode = (FIXTURES[name] + ("affine",))[:7]
    out = os.path.join(out_root, name)
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as work:
        hf = make_hf(work, shape, layout, seed)
        if name in VLM_FIXTURES:
            make_vlm(hf, out, recipe)
        else:
            quantize(hf, out, bits, group, recipe, dtype, mode)
        deq = os.path.join(work, "deq")
        dequantized_checkpoint(out, deq)
        vocab = int(shape.split("--vocab ")[1].split()[0])
        rng = random.Random(seed)
        tokens = [2] + [rng.randrange(vocab) for _ in range(N_TOKENS - 1)]
        with open(os.path.join(out, "tokens.txt"), "w") as f:
            f.write(" ".join(map(str, tokens)) + "\n")
        # a stored lm_head (mlx-vlm's) is the classifier mlx computes the logits with
        with open(os.path.join(out, "model.safetensors.index.json")) as f:
            untied = ["--untied"] if any("lm_head." in k for k in json.load(f)["weight_map"]) else []
        sh(sys.executable, os.path.join(ROOT, "tests", "ref_forward.py"), deq, "--tokens",
           os.path.join(out, "tokens.txt"), "--out", os.path.join(out, "logits.f32"), "--greedy", str(N_GREEDY),
           "--greedy-out", os.path.join(out, "greedy.txt"), *untied)
        mlx_diff = mlx_forward_diff(out, tokens)
        n_same, n_matrices, export_diff = export_vs_mlx(out, deq, work)
    size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    print(f"{name}: {size} bytes; export.py f32 vs mx.dequantize: {n_same} of {n_matrices} matrices bit-identical, "
          f"max|diff| {export_diff:.3g}; mlx_lm's own forward (float32) vs logits.f32: max|diff| {mlx_diff:.3g}",
          file=sys.stderr)


def export_vs_mlx(mlx_dir, deq, work):
    """export.py --dtype f32 of the fixture against the float32 dequantized checkpoint,
    matrix by matrix: (how many are bit-identical, how many, the largest difference)."""
    import struct
    import numpy as np
    import mlx.core as mx
    out = os.path.join(work, "export.bin")
    sh(sys.executable, os.path.join(ROOT, "export.py"), mlx_dir, out, "--dtype", "f32", "-q")
    with open(out, "rb") as f:
        blob = f.read()
    n_tensors, dir_off = struct.unpack_from("<I", blob, 88)[0], struct.unpack_from("<Q", blob, 112)[0]
    ref = {k.split("model.", 2)[-1]: np.array(v)  # without model. / language_model.model.
           for k, v in mx.load(os.path.join(deq, "model.safetensors")).items()}
    same, count, worst = 0, 0, 0.0
    for i in range(n_tensors):
        e = dir_off + 104 * i
        name = blob[e:e + 64].rstrip(b"\0").decode()
        ndim, rows, cols = struct.unpack_from("<3I", blob, e + 68)
        off, nbytes = struct.unpack_from("<QQ", blob, e + 88)
        if ndim != 2:
            continue
        got = np.frombuffer(blob, dtype="<f4", count=rows * cols, offset=off).reshape(rows, cols)
        want = ref[name]
        same += bool((got.view(np.uint32) == want.view(np.uint32)).all())
        count += 1
        worst = max(worst, float(np.abs(got - want).max()))
    return same, count, worst


def mlx_forward_diff(mlx_dir, tokens):
    """A cross-check of the reference: mlx_lm's own Gemma 3 forward on the quantized
    checkpoint, every float (scales, biases, norms) cast to float32, against logits.f32:
    the largest difference. mlx_lm multiplies the embedding by sqrt(hidden) rounded to
    bf16 (5.65625 for hidden 32, where gemma_pytorch in float32 and the reference use
    5.656854); the embeddings it is given here carry the ratio, so that only its rounding
    (an ulp) remains. (Its embedding lookup in the floating-point modes returns bf16, which
    would run the whole forward in bf16: the embeddings are float32 here.)"""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_map
    from mlx_lm.utils import load_model
    from pathlib import Path
    model, _ = load_model(Path(mlx_dir))
    model.update(tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a,
                          model.parameters()))
    inner = model.language_model.model if hasattr(model, "language_model") else model.model
    root = float(np.float32(inner.args.hidden_size ** 0.5))
    ratio = root / mx.array(root, mx.bfloat16).astype(mx.float32).item()
    ids = mx.array(tokens)[None]
    emb = inner.embed_tokens(ids).astype(mx.float32) * ratio  # the fp modes' lookup gives bf16
    logits = np.array(model(ids, cache=model.make_cache(), input_embeddings=emb)[0].astype(mx.float32))
    ref = np.fromfile(os.path.join(mlx_dir, "logits.f32"), dtype="<f4").reshape(logits.shape)
    return float(np.abs(logits - ref).max())


# The edge cases of each mode's decoding, one matrix each: every code, and scales (and
# biases) from the smallest to the largest the format holds whose products stay finite:
# name: (the fixture whose matrix it replaces, that matrix, mode, bits, group size).
# nvfp4 takes the embedding: its 512 scales hold each of E4M3's 254 finite codes.
EDGES = {
    "affine-f16": ("q6-g64-mqa-mm", "layers.0.mlp.up_proj", "affine", 6, 64),
    "affine-bf16": ("q4-g64-mqa", "layers.0.mlp.up_proj", "affine", 4, 64),
    "mxfp4": ("mxfp4-mqa", "layers.0.mlp.up_proj", "mxfp4", 4, 32),
    "nvfp4": ("nvfp4-mqa-mm", "embed_tokens", "nvfp4", 4, 16),
    "mxfp8": ("mxfp8-mqa", "layers.0.mlp.up_proj", "mxfp8", 8, 32),
}


def make_edges(out_root):
    """edges/NAME.safetensors: `weight`, `scales` (and `biases`) of the shapes of one of
    the fixture's matrices, holding every code and edge-case scales, and
    `expected`, what mx.dequantize gives for them in float32 (tests/test_mlx.py swaps them
    into the fixture and compares its f32 export with `expected`, bit for bit)."""
    import mlx.core as mx
    import numpy as np
    os.makedirs(os.path.join(out_root, "edges"), exist_ok=True)
    for name, (fixture, matrix, mode, bits, group) in EDGES.items():
        w = mx.load(os.path.join(out_root, fixture, "model.safetensors"))
        prefix = next(k[:-len(".scales")] for k in w if k.endswith(matrix + ".scales"))
        scales0 = w[prefix + ".scales"]
        rows, n_groups = scales0.shape
        cols = n_groups * group
        codes = np.arange(rows * cols) % (1 << bits)
        if mode == "mxfp8":
            codes[(codes & 0x7f) == 0x7f] = 0  # E4M3 NaN
        bitstream = ((codes[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
        weight = np.packbits(bitstream, bitorder="little").view("<u4").reshape(rows, cols * bits // 32)
        k = np.arange(rows * n_groups).reshape(rows, n_groups)
        tensors = {"weight": mx.array(weight)}
        if mode == "affine":
            ftype = scales0.dtype
            if ftype == mx.float16:  # subnormal, smallest normal, max, negatives, zero
                pool = np.array([5.96e-8, 6.1e-5, 0.0, -1.0, 0.0137, 65504.0 / 63, -3.0e-6, 1.0], np.float32)
            else:  # bf16: a subnormal (2^-130), the smallest normals, up to 1e30
                pool = np.array([1.2e-38, -3.4e-30, 0.0, 1.0, -0.0137, 1e30, 9.2e-40, 2.0], np.float32)
            tensors["scales"] = mx.array(pool[k % len(pool)]).astype(ftype)
            tensors["biases"] = mx.array(-pool[(k + 3) % len(pool)]).astype(ftype)
            expected = mx.dequantize(tensors["weight"], tensors["scales"].astype(mx.float32),
                                     tensors["biases"].astype(mx.float32), group_size=group, bits=bits)
        else:
            if mode == "nvfp4":  # E4M3 scales: every finite code (subnormals, negatives, 448)
                pool = np.array([c for c in range(256) if c & 0x7f != 0x7f], np.uint8)
            else:  # E8M0 scales: 2^-127 (a subnormal) ... 2^118 (fp8's 448 * 2^118 is finite)
                pool = np.array([0, 1, 2, 3, 60, 126, 127, 128, 129, 200, 245], np.uint8)
            tensors["scales"] = mx.array(pool[k % len(pool)])
            expected = mx.dequantize(tensors["weight"], tensors["scales"], group_size=group, bits=bits, mode=mode,
                                     dtype=mx.float32)
        tensors["expected"] = expected.astype(mx.float32)
        assert np.isfinite(np.array(tensors["expected"])).all(), name
        mx.save_safetensors(os.path.join(out_root, "edges", name + ".safetensors"), tensors)
        print(f"edges/{name}: {fixture} {matrix}, {rows} x {cols}, {mode}, {bits} bits, groups of {group}",
              file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description="Make the MLX fixtures (needs mlx and mlx-lm).")
    ap.add_argument("names", nargs="*", help=f"fixtures to make (default all: {', '.join(FIXTURES)}, "
                                             f"{', '.join(VLM_FIXTURES)}, edges)")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "mlx"))
    args = ap.parse_args()
    for name in args.names or list(FIXTURES) + list(VLM_FIXTURES) + ["edges"]:
        if name == "edges":
            make_edges(args.out)
        elif name in FIXTURES:
            make_fixture(name, args.out, seed=list(FIXTURES).index(name) + 1)
        elif name in VLM_FIXTURES:
            make_fixture(name, args.out, seed=101 + list(VLM_FIXTURES).index(name))
        else:
            sys.exit(f"unknown fixture {name}")


if __name__ == "__main__":
    main()
