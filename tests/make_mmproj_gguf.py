#!/usr/bin/env python3
"""Write a multimodal checkpoint of tests/fixtures/vision as llama.cpp's converter lays it out:
the text model as a gemma3 GGUF, the vision tower and projector as an mmproj GGUF
(architecture clip, projector gemma3), for export.py MODEL.gguf --mmproj MMPROJ.gguf.

    tests/data/venv-gguf/bin/python tests/make_mmproj_gguf.py HF_DIR TEXT.gguf MMPROJ.gguf [--f16]

Runs in test_gguf.sh's venv (gguf-py, numpy). As convert_hf_to_gguf.py: RMSNorm weights
stored as 1 + w (the text's norms and mm.soft_emb_norm; SigLIP's LayerNorms as they are),
tensors under gguf-py's names, dimensions fastest-first. The tokenizer holds just the
checkpoint's vocabulary as placeholder pieces, with <start_of_image>, <end_of_image> and
<image_soft_token> at the config's ids. F32 throughout; --f16: the projection in F16 and the
other matrices too (as the converter's default), the embeddings in F32 (as it forces).
"""
import json
import os
import struct
import sys

import gguf
import numpy as np

TEXT = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
VISION = {"layer_norm1": "ln1", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.out_proj": "attn_out", "layer_norm2": "ln2", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = np.frombuffer(data[a:b], dtype="<u2" if info["dtype"] == "BF16" else "<f4")
        arr = (raw.astype(np.uint32) << 16).view(np.float32) if info["dtype"] == "BF16" else raw
        out[name] = arr.reshape(info["shape"]).astype(np.float32)
    return out


def strip(name):
    for p in ("model.language_model.", "language_model.model.", "model."):
        if name.startswith(p) and "vision" not in name and "projector" not in name:
            return "text", name[len(p):]
    for p in ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.", "vision_tower."):
        if name.startswith(p):
            return "vision", name[len(p):]
    return "projector", name.split("multi_modal_projector.", 1)[1]


def main():
    hf, text_path, mmproj_path = sys.argv[1:4]
    f16 = "--f16" in sys.argv[4:]
    cfg = json.load(open(os.path.join(hf, "config.json")))
    tc, vc = cfg["text_config"], cfg["vision_config"]
    weights = read_safetensors(os.path.join(hf, "model.safetensors"))

    w = gguf.GGUFWriter(text_path, "gemma3")
    w.add_context_length(tc["max_position_embeddings"])
    w.add_embedding_length(tc["hidden_size"])
    w.add_block_count(tc["num_hidden_layers"])
    w.add_feed_forward_length(tc["intermediate_size"])
    w.add_head_count(tc["num_attention_heads"])
    w.add_head_count_kv(tc["num_key_value_heads"])
    w.add_key_length(tc["head_dim"])
    w.add_value_length(tc["head_dim"])
    w.add_layer_norm_rms_eps(tc["rms_norm_eps"])
    w.add_rope_freq_base(tc["rope_theta"])
    w.add_sliding_window(tc["sliding_window"])
    w.add_uint32("gemma3.attention.sliding_window_pattern", tc["sliding_window_pattern"])
    if tc.get("rope_scaling"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(tc["rope_scaling"]["factor"])
    vocab = tc["vocab_size"]
    pieces = [f"<unused{i}>" for i in range(vocab)]
    for key, piece in (("boi_token_index", "<start_of_image>"), ("eoi_token_index", "<end_of_image>"),
                       ("image_token_index", "<image_soft_token>")):
        pieces[cfg[key]] = piece
    pieces[0], pieces[1], pieces[2] = "<pad>", "<eos>", "<bos>"
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([3] * vocab)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)

    m = gguf.GGUFWriter(mmproj_path, "clip")
    m.add_string("clip.projector_type", "gemma3")
    m.add_bool("clip.has_vision_encoder", True)
    m.add_uint32("clip.vision.image_size", vc["image_size"])
    m.add_uint32("clip.vision.patch_size", vc["patch_size"])
    m.add_uint32("clip.vision.embedding_length", vc["hidden_size"])
    m.add_uint32("clip.vision.feed_forward_length", vc["intermediate_size"])
    m.add_uint32("clip.vision.block_count", vc["num_hidden_layers"])
    m.add_uint32("clip.vision.attention.head_count", vc["num_attention_heads"])
    m.add_float32("clip.vision.attention.layer_norm_epsilon", vc.get("layer_norm_eps", 1e-6))
    m.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    m.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    side, pooled = vc["image_size"] // vc["patch_size"], int(round(cfg["mm_tokens_per_image"] ** 0.5))
    if side // pooled != 4:
        m.add_uint32("clip.vision.projector.scale_factor", side // pooled)
    m.add_bool("clip.use_gelu", True)

    for name, arr in weights.items():
        part, rest = strip(name)
        if part == "text":
            if rest == "embed_tokens.weight":
                g = "token_embd.weight"
            elif rest == "norm.weight":
                g = "output_norm.weight"
            else:
                _, i, module = rest.split(".", 2)
                g = f"blk.{i}.{TEXT[module.rsplit('.', 1)[0]]}.weight"
            if rest.endswith("norm.weight"):
                arr = arr + np.float32(1.0)
            w.add_tensor(g, arr.astype(np.float16 if f16 and arr.ndim == 2 and g != "token_embd.weight" else np.float32))
            continue
        if part == "projector":
            g = "mm.soft_emb_norm.weight" if rest.startswith("mm_soft_emb_norm") else "mm.input_projection.weight"
            if g == "mm.soft_emb_norm.weight":
                arr = arr + np.float32(1.0)
        elif rest.startswith("encoder.layers."):
            _, _, i, module = rest.split(".", 3)
            stem, kind = module.rsplit(".", 1)
            g = f"v.blk.{i}.{VISION[stem]}.{kind}"
        else:
            stem, kind = rest.rsplit(".", 1)
            g = {"embeddings.patch_embedding": "v.patch_embd", "embeddings.position_embedding": "v.position_embd",
                 "post_layernorm": "v.post_ln"}[stem] + "." + kind
        half = f16 and arr.ndim >= 2 and ".patch_embd" not in g and ".position_embd" not in g
        m.add_tensor(g, arr.astype(np.float16 if half else np.float32))
    for wr in (w, m):
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_tensors_to_file()
        wr.close()


if __name__ == "__main__":
    main()
