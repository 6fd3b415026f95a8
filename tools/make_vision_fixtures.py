#!/usr/bin/env python3
"""Make tests/fixtures/vision/: tiny random multimodal Gemma 3 checkpoints and what
transformers' Gemma3ForConditionalGeneration computes from them in float32.

Not run by `make test` or CI (it needs torch, torchvision and transformers); the test
suite reads the small files it writes.  Run it in a venv outside the repository:

    python3 -m venv /work/venv-vision
    /work/venv-vision/bin/pip install torch torchvision transformers
    /work/venv-vision/bin/python tools/make_vision_fixtures.py [OUT_DIR]

OUT_DIR (default tests/fixtures/vision) gets, per model (see MODELS):
  NAME/config.json, NAME/model.safetensors   the checkpoint (tools/make_checkpoint.py --vision)
  NAME/image-K.ppm                            the images of the prompt (image_size square, P6:
                                              the processor keeps their pixels, checked here)
  NAME/vision-K.f32                           the tower's output (last_hidden_state) [patches][vision hidden]
  NAME/projected-K.f32                        the projector's output (image features) [mm_tokens][hidden]
  NAME/ids.txt                                the prompt's ids, image tokens in place (as input_ids)
  NAME/logits.f32                             the logits of every prompt position [T][vocab]
  NAME/greedy.txt                             the greedy continuation (GREEDY ids)
and resize/: odd-sized PPM/PGM images, and the processor's pixel values for each at one
size (resize/cases.txt: file, target size, pixel file).  All floats are float32 LE.
"""

import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import torch

import transformers
from transformers import Gemma3ForConditionalGeneration
from transformers.models.gemma3.image_processing_gemma3 import Gemma3ImageProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = 8

# Token ids of the tiny vocabularies: image, <start_of_image>, <end_of_image>
IMAGE_TOKENS = (310, 300, 301)

# name: (make_checkpoint.py arguments, number of images in the prompt)
MODELS = {
    # 56 px, 16 patches pooled 2x2 to 4 tokens; vision head_dim 12; window 8 > 4 image tokens
    "mm1": (["--vocab", "320", "--hidden", "64", "--inter", "128", "--layers", "3", "--heads", "2",
             "--kv-heads", "1", "--head-dim", "32", "--qpas", "32", "--window", "8", "--pattern", "3",
             "--vision", "56,14,36,80,2,3,4", "--layout", "nested", "--seed", "31"], 1),
    # 112 px, 64 patches pooled 2x2 to 16 tokens; 4B-style rope scaling (linear 8 on global
    # layers); window 6 < 16 image tokens; two images
    "mm2": (["--vocab", "320", "--hidden", "64", "--inter", "160", "--layers", "6", "--heads", "4",
             "--kv-heads", "2", "--head-dim", "16", "--qpas", "16", "--window", "6", "--pattern", "3",
             "--rope-scaling", "8", "--vision", "112,14,64,144,3,4,16", "--layout", "nested-v5",
             "--seed", "32"], 2),
}

# Odd-sized images for the resize check: (file, width, height, gray, target size)
RESIZE_CASES = [("a-37x23.ppm", 37, 23, False, 56), ("b-200x75.ppm", 200, 75, False, 56),
                ("c-13x61.ppm", 13, 61, False, 112), ("d-150x151.ppm", 150, 151, False, 112),
                ("e-29x31.pgm", 29, 31, True, 56), ("f-331x97.ppm", 331, 97, False, 112)]


def image_bytes(w, h, channels, seed):
    """A smooth pattern with noise and hard edges (so resizing has something to do)."""
    rng = random.Random(seed)
    fx, fy, ph = rng.uniform(0.05, 0.4), rng.uniform(0.05, 0.4), rng.uniform(0, 6.3)
    out = bytearray()
    for y in range(h):
        for x in range(w):
            for c in range(channels):
                v = 128 + 90 * math.sin(fx * x + ph + c) * math.cos(fy * y - c) + rng.uniform(-30, 30)
                if (x // 7 + y // 5) % 4 == 0:
                    v = 255 - v
                out.append(max(0, min(255, int(v))))
    return bytes(out)


def write_pnm(path, w, h, gray, data):
    with open(path, "wb") as f:
        f.write(b"%s\n%d %d\n255\n" % (b"P5" if gray else b"P6", w, h))
        f.write(data)


def pixels(processor, w, h, gray, data):
    """The processor's pixel values [3][S][S] for 8-bit pixels (gray: one channel)."""
    arr = np.frombuffer(data, dtype=np.uint8).reshape(h, w, 1 if gray else 3)
    if gray:
        arr = np.repeat(arr, 3, axis=2)  # the processor's convert-to-RGB of a gray image
    return processor(images=[torch.from_numpy(arr.copy()).permute(2, 0, 1)], return_tensors="pt")["pixel_values"][0]


def make_processor(size):
    return Gemma3ImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                image_std=[0.5] * 3, do_pan_and_scan=False)


def save_f32(path, t):
    np.ascontiguousarray(t.detach().numpy().astype("<f4")).tofile(path)


def model_fixture(out, name, args, n_images):
    d = os.path.join(out, name)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_checkpoint.py"), d,
                    "--image-tokens", ",".join(map(str, IMAGE_TOKENS))] + args, check=True)
    model = Gemma3ForConditionalGeneration.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    cfg = model.config
    S, mm = cfg.vision_config.image_size, cfg.mm_tokens_per_image
    proc = make_processor(S)
    image_id, boi, eoi = IMAGE_TOKENS
    rng = random.Random(name)
    pv = []
    for k in range(n_images):
        data = image_bytes(S, S, 3, "%s-%d" % (name, k))
        write_pnm(os.path.join(d, "image-%d.ppm" % k), S, S, False, data)
        p = pixels(proc, S, S, False, data)
        # same size: the processor's resize keeps the pixels, so these are (p / 255 - 0.5) / 0.5
        direct = torch.from_numpy(np.frombuffer(data, np.uint8).reshape(S, S, 3).astype(np.float32)).permute(2, 0, 1)
        assert torch.allclose(p, (direct / 255 - 0.5) / 0.5, atol=1e-6), "resize to the same size changed pixels"
        pv.append(p)
    pv = torch.stack(pv)
    ids = [2] + [rng.randrange(3, 290) for _ in range(5)]
    for k in range(n_images):
        ids += [108, boi] + [image_id] * mm + [eoi, 108] + [rng.randrange(3, 290) for _ in range(4 + 3 * k)]
    with torch.no_grad():
        vis = model.model.vision_tower(pixel_values=pv).last_hidden_state
        proj = model.model.multi_modal_projector(vis)
        for k in range(n_images):
            save_f32(os.path.join(d, "vision-%d.f32" % k), vis[k])
            save_f32(os.path.join(d, "projected-%d.f32" % k), proj[k])
        seq = list(ids)
        for step in range(GREEDY + 1):
            x = torch.tensor([seq])
            tt = (x == image_id).long()
            logits = model(input_ids=x, pixel_values=pv, token_type_ids=tt).logits[0]
            if step == 0:
                save_f32(os.path.join(d, "logits.f32"), logits)
            if step < GREEDY:
                nxt = int(torch.argmax(logits[-1]))
                assert nxt != image_id, "greedy produced the image token: pick another seed"
                seq.append(nxt)
    with open(os.path.join(d, "ids.txt"), "w") as f:
        f.write(" ".join(map(str, ids)) + "\n")
    with open(os.path.join(d, "greedy.txt"), "w") as f:
        f.write(" ".join(map(str, seq[len(ids):])) + "\n")
    print("%s: %d ids, %d images, max|logit| %.3f" % (name, len(ids), n_images, float(logits.abs().max())))


def resize_fixture(out):
    d = os.path.join(out, "resize")
    os.makedirs(d, exist_ok=True)
    lines = []
    for fn, w, h, gray, size in RESIZE_CASES:
        data = image_bytes(w, h, 1 if gray else 3, fn)
        write_pnm(os.path.join(d, fn), w, h, gray, data)
        p = pixels(make_processor(size), w, h, gray, data)
        pf = fn.rsplit(".", 1)[0] + "-%d.f32" % size
        save_f32(os.path.join(d, pf), p)
        lines.append("%s %d %s\n" % (fn, size, pf))
    with open(os.path.join(d, "cases.txt"), "w") as f:
        f.writelines(lines)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests", "fixtures", "vision")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    for name, (args, n_images) in MODELS.items():
        model_fixture(out, name, args, n_images)
    resize_fixture(out)
    with open(os.path.join(out, "versions.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                   "torchvision": __import__("torchvision").__version__, "numpy": np.__version__,
                   "python": sys.version.split()[0]}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
