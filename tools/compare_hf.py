#!/usr/bin/env python3
"""Compare gemma3.c against Hugging Face transformers on real weights.

Runs where torch and transformers are installed (not part of `make test`: those and the
real weights are not available on the test machines).

    python3 tools/compare_hf.py HF_DIR MODEL.bin [--text "..."] [--tokens N]

HF_DIR is the checkpoint directory MODEL.bin was exported from (python3 export.py HF_DIR
MODEL.bin --dtype f32). The script tokenizes the text with the HF tokenizer (with <bos>),
checks that `gemma3 --encode` gives the same ids, runs both models in float32 on them,
and prints per-position max |diff| of the logits, the argmax agreement and the worst
position. Expect max |diff| around 1e-4 .. 1e-3 of max |logit| for an f32 export
(transformers' eager attention and gemma_pytorch differ at that level too), and
identical argmax; bf16 / q8_0 / q4_0 exports show their documented quantization error.
"""
import argparse
import os
import struct
import subprocess
import sys
import tempfile


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("hf_dir")
    ap.add_argument("model_bin")
    ap.add_argument("--text", default="The capital of France is Paris. The capital of Germany is")
    ap.add_argument("--gemma3", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gemma3"))
    args = ap.parse_args()
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        sys.exit("compare_hf.py needs torch and transformers (pip install torch transformers)")

    tok = AutoTokenizer.from_pretrained(args.hf_dir)
    ids = tok(args.text, return_tensors="pt").input_ids  # starts with <bos>
    print(f"{ids.shape[1]} tokens: {ids[0].tolist()}")

    # the tokenizers must agree too (gemma3 --encode adds no <bos>)
    enc = subprocess.run([args.gemma3, args.model_bin, "--encode"], input=args.text.encode(),
                         capture_output=True, check=True).stdout.split()
    same_ids = [int(x) for x in enc] == ids[0].tolist()[1:]
    print("tokenizer:", "same ids" if same_ids else f"DIFFERENT ids: {enc}")

    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        ref = model(ids).logits[0].float()  # [T, vocab]

    with tempfile.TemporaryDirectory() as tmp:
        tpath, opath = os.path.join(tmp, "tokens.txt"), os.path.join(tmp, "logits.f32")
        with open(tpath, "w") as f:
            f.write(" ".join(str(i) for i in ids[0].tolist()))
        subprocess.run([args.gemma3, args.model_bin, "--logits", tpath, opath], check=True)
        with open(opath, "rb") as f:
            raw = f.read()
    T, V = ref.shape[0], len(raw) // 4 // ref.shape[0]
    ours = torch.tensor(struct.unpack(f"<{T * V}f", raw)).view(T, V)
    if V != ref.shape[1]:  # 4B+: HF pads the vocab to 262208, the embedding decides
        n = min(V, ref.shape[1])
        ours, ref = ours[:, :n], ref[:, :n]
    diff = (ours - ref).abs()
    per_pos = diff.max(dim=1).values
    top = (ours.argmax(1) == ref.argmax(1)).float().mean().item()
    print(f"max|logit| {ref.abs().max():.3f}; max|diff| {per_pos.max():.3g} at position {per_pos.argmax().item()} "
          f"({per_pos.max() / ref.abs().max():.2g} of max|logit|); argmax agreement {100 * top:.1f}%")
    for t in range(T):
        print(f"  pos {t:3d}  max|diff| {per_pos[t]:.3g}  argmax ours {ours[t].argmax().item():6d}  hf {ref[t].argmax().item():6d}")
    return 0 if same_ids and top == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
