#!/usr/bin/env python3
"""Run one GGUF through llama.cpp and through gemma3.c's f32 export of it, on the same ids.

Not a test (no pass/fail bound): llama.cpp multiplies quantized weights by activations that it
quantizes too (Q8 blocks), so its logits differ from an exact float32 forward by more than
gemma3.c's do. This prints, per position, whether llama.cpp's top-1 token is gemma3.c's, and
the largest logit difference; then, per layer, how far llama.cpp's residual stream is from
gemma3.c's (`--dump-hidden`), where it first exceeds 1 % and which layer adds the most. With
--ref it also runs tests/ref_gguf.py's numpy forward, a third opinion on both.

Needs llama-cpp-python (builds llama.cpp from source: minutes to an hour) and numpy, e.g.

    python3 -m venv /work/cache/llamacpp-venv
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_CURL=OFF" \\
      /work/cache/llamacpp-venv/bin/pip install llama-cpp-python==0.3.36 numpy gguf==0.19.0
    python3 export.py MODEL.gguf model-f32.bin --dtype f32
    /work/cache/llamacpp-venv/bin/python tools/compare_llamacpp.py MODEL.gguf model-f32.bin \\
      [--text tests/real/pride-and-prejudice-ch1.txt] [-n 256] [--ref] [--all-positions]

The ids are gemma3.c's encoding of the text, with <bos> first; llama.cpp's own tokenization
of the same text is compared with them too.
"""

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class GGMLTensor(ctypes.Structure):
    """struct ggml_tensor of ggml.h (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10,
    GGML_MAX_NAME 64), enough to read a CPU tensor's name, shape and data in the eval callback."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
                ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10),
                ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
                ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def llamacpp_forward(gguf_path, ids, threads, want_hidden):
    """llama.cpp's logits [T][vocab] for ids at positions 0..T-1 in one batch (f32 KV cache),
    and, if want_hidden, its residual stream {name: [T][hidden]} ("inp_scaled", "l_out-N")."""
    import llama_cpp
    import llama_cpp.llama_cpp as lc

    hidden = {}

    def on_tensor(ptr, ask, _user):
        t = GGMLTensor.from_address(ptr)
        name = t.name.decode(errors="replace")
        wanted = name == "inp_scaled" or name.startswith("l_out-")
        if ask or not wanted:
            return wanted if ask else True
        ne0, ne1 = t.ne[0], t.ne[1]
        if t.type != 0 or t.nb[1] != 4 * ne0 or not t.data:      # F32, rows contiguous, on CPU
            return True
        buf = (ctypes.c_float * (ne0 * ne1)).from_address(t.data)
        hidden[name] = np.ctypeslib.as_array(buf).reshape(ne1, ne0).copy()
        return True

    callback = lc.ggml_backend_sched_eval_callback(on_tensor)
    default_params = lc.llama_context_default_params

    def params_with_callback():
        p = default_params()
        if want_hidden:
            p.cb_eval = callback
            p.cb_eval_user_data = None
        return p

    lc.llama_context_default_params = params_with_callback   # Llama() takes no cb_eval
    try:
        n = len(ids)
        llm = llama_cpp.Llama(gguf_path, n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True,
                              n_threads=threads, n_threads_batch=threads,
                              type_k=0, type_v=0, verbose=False)   # GGML_TYPE_F32 KV
        llm.eval(ids)
        logits = np.array(llm.scores[:n], dtype=np.float32)
    finally:
        lc.llama_context_default_params = default_params
    return llm, logits, hidden


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("f32_bin", help="export.py GGUF OUT.bin --dtype f32")
    ap.add_argument("--text", default=os.path.join(ROOT, "tests/real/pride-and-prejudice-ch1.txt"))
    ap.add_argument("-n", type=int, default=256, help="number of ids, <bos> included")
    ap.add_argument("--gemma3", default=os.path.join(ROOT, "gemma3"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--ref", action="store_true", help="also run tests/ref_gguf.py's forward")
    ap.add_argument("--all-positions", action="store_true", help="one line per position")
    args = ap.parse_args()

    with open(args.text, "rb") as f:
        text = f.read()
    enc = subprocess.run([args.gemma3, args.f32_bin, "--encode"], input=text,
                         capture_output=True, check=True)
    all_ids = [2] + [int(t) for t in enc.stdout.split()]
    ids = all_ids[:args.n]
    T = len(ids)
    tmp = tempfile.mkdtemp(prefix="compare_llamacpp.")
    ids_path, logits_path, hidden_path = (os.path.join(tmp, n) for n in
                                          ("ids.txt", "logits.f32", "hidden.f32"))
    with open(ids_path, "w") as f:
        f.write(" ".join(map(str, ids)) + "\n")
    subprocess.run([args.gemma3, args.f32_bin, "--logits", ids_path, logits_path,
                    "--dump-hidden", hidden_path], check=True, capture_output=True)
    ours = np.fromfile(logits_path, dtype="<f4").reshape(T, -1)
    ours_hidden = np.fromfile(hidden_path, dtype="<f4")     # [T][n_layers + 1][hidden]
    for p in (ids_path, logits_path, hidden_path):
        os.remove(p)
    os.rmdir(tmp)

    llm, theirs, hidden = llamacpp_forward(args.gguf, ids, args.threads, want_hidden=True)
    import llama_cpp
    print(f"llama-cpp-python {llama_cpp.__version__}; {T} ids of {args.text}")

    their_ids = llm.tokenize(text, add_bos=True, special=False)
    same = their_ids == all_ids
    print(f"tokenizer: llama.cpp's ids of the whole text {'equal' if same else 'DIFFER from'} "
          f"gemma3.c's ({len(their_ids)} vs {len(all_ids)} with <bos>)"
          + ("" if same else f", first difference at {next((i for i, (a, b) in enumerate(zip(their_ids, all_ids)) if a != b), min(len(their_ids), len(all_ids)))}"))

    if theirs.shape[1] != ours.shape[1]:
        sys.exit(f"vocab sizes differ: llama.cpp {theirs.shape[1]}, gemma3.c {ours.shape[1]}")

    def agreement(name, a, b):
        top_a, top_b = a.argmax(-1), b.argmax(-1)
        scale = float(np.abs(b).max())
        diff = np.abs(a.astype(np.float64) - b).max(-1)
        print(f"{name}: top-1 equal at {int((top_a == top_b).sum())}/{T} positions; "
              f"max|diff| {diff.max():.4g} (position {int(diff.argmax())}) = "
              f"{diff.max() / scale:.3g} of max|logit| {scale:.4g}; median over positions "
              f"{np.median(diff):.4g}")
        return top_a, top_b, diff

    def perplexity(logits):
        x = logits[:-1].astype(np.float64)
        m = x.max(-1)
        lse = m + np.log(np.exp(x - m[:, None]).sum(-1))
        return float(np.exp(np.mean(lse - x[np.arange(T - 1), ids[1:]])))

    top_l, top_g, diff = agreement("llama.cpp vs gemma3.c f32", theirs, ours)
    print(f"perplexity of these {T - 1} next tokens: gemma3.c f32 {perplexity(ours):.4f}, "
          f"llama.cpp {perplexity(theirs):.4f}")
    pieces = lambda t: llm.detokenize([int(t)]).decode(errors="replace")   # noqa: E731
    print("  pos  token            gemma3.c top-1   llama.cpp top-1  max|diff|")
    for i in range(T):
        if args.all_positions or top_l[i] != top_g[i] or i in (0, T - 1) or i % 32 == 0:
            mark = "" if top_l[i] == top_g[i] else "   <- differ"
            print(f"  {i:3d}  {pieces(ids[i])!r:15.15}  {pieces(top_g[i])!r:15.15}  "
                  f"{pieces(top_l[i])!r:15.15}  {diff[i]:8.4f}{mark}")

    h = ours_hidden.reshape(T, -1, llm.n_embd())
    n_layers = h.shape[1] - 1
    names = ["inp_scaled"] + [f"l_out-{i}" for i in range(n_layers)]
    if all(n in hidden for n in names):
        print("residual stream, llama.cpp vs gemma3.c, over all positions and dimensions:")
        print("                   max|diff|/max|x|  rms(diff)/rms(x)      max|x|")
        departed, jump, prev = None, (0.0, None), 0.0
        for k, name in enumerate(names):
            a, b = hidden[name], h[:, k]
            d = a.astype(np.float64) - b
            rel = float(np.abs(d).max() / np.abs(b).max())
            rms = float(np.sqrt(np.mean(d * d) / np.mean(b.astype(np.float64) ** 2)))
            label = "embedding" if k == 0 else f"layer {k - 1}"
            print(f"  after {label:>9}: {rel:16.3g}  {rms:16.3g}  {np.abs(b).max():10.4g}")
            if departed is None and rms > 1e-2:
                departed = label
            if rms - prev > jump[0]:
                jump = (rms - prev, label)
            prev = rms
        print(f"rms difference first above 1 %: after {departed or 'no layer'}; "
              f"largest rise in one step: {jump[0]:.3g}, {jump[1]}")
    else:
        print(f"residual stream: llama.cpp's callback gave {sorted(hidden)[:4]}...; not compared")

    if args.ref:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        import ref_gguf
        cfg, w, _ = ref_gguf.load_gguf(args.gguf)
        ref = ref_gguf.forward(ids, cfg, w)
        agreement("gemma3.c f32 vs numpy reference", ours, ref)
        agreement("llama.cpp vs numpy reference", theirs, ref)


if __name__ == "__main__":
    main()
