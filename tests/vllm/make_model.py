#!/usr/bin/env python3
"""Write a tiny random-weight Llama that vLLM can load without a hub.

    python tests/vllm/make_model.py DIR [--init-std 0.1] [--seed 1234]

DIR gets config.json, generation_config.json and model.safetensors (float32).
No tokenizer: start vLLM with skip_tokenizer_init=True and give prompts as
token ids.  The files are byte-for-byte the same on every run with the same
arguments (fixed seed, sorted tensor names, fixed JSON formatting).

Why a larger init range than transformers' 0.02: with std 0.02 the residual
stream is dominated by the token embedding and the attention output is tiny,
so most prompts collapse to one repeated greedy token.  With std ~0.1 the
greedy continuation depends on the whole context, so a KV cache that is
wrong (or missing) shows up as different tokens, and the logprobs differ
even where the tokens agree.
"""
import argparse
import hashlib
import json
import os
import sys

# Geometry.  head_dim 64 is supported by the CPU attention backend
# (32, 64, 80, ...); 2 KV heads < 4 query heads exercises GQA.
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 1024,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def build_tensors(cfg, seed, std):
    import torch

    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    h = cfg["hidden_size"]
    inter = cfg["intermediate_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg["num_key_value_heads"]
    hd = cfg["head_dim"]
    v = cfg["vocab_size"]

    def rnd(*shape, s=std):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * s).contiguous()

    t = {}
    # Fixed creation order => fixed random stream => fixed bytes.
    t["model.embed_tokens.weight"] = rnd(v, h, s=1.0)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = rnd(nh * hd, h)
        t[p + "self_attn.k_proj.weight"] = rnd(nkv * hd, h)
        t[p + "self_attn.v_proj.weight"] = rnd(nkv * hd, h)
        t[p + "self_attn.o_proj.weight"] = rnd(h, nh * hd)
        t[p + "mlp.gate_proj.weight"] = rnd(inter, h)
        t[p + "mlp.up_proj.weight"] = rnd(inter, h)
        t[p + "mlp.down_proj.weight"] = rnd(h, inter)
        t[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.float32)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float32)
    t["model.norm.weight"] = torch.ones(h, dtype=torch.float32)
    t["lm_head.weight"] = rnd(v, h)
    return t


def write_model(out_dir, seed=1234, std=0.1):
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    cfg = dict(CONFIG)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False},
                  f, indent=2, sort_keys=True)
        f.write("\n")
    tensors = build_tensors(cfg, seed, std)
    tensors = {k: tensors[k] for k in sorted(tensors)}
    # One metadata key only: safetensors keeps metadata in a hash map, so
    # several keys come out in a random order and the bytes would differ.
    save_file(tensors, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, "kvx_model_info.json"), "w") as f:
        json.dump({"seed": seed, "init_std": std, "embed_std": 1.0},
                  f, indent=2, sort_keys=True)
        f.write("\n")
    return out_dir


def digest(out_dir):
    h = hashlib.sha256()
    for name in ("config.json", "generation_config.json", "kvx_model_info.json",
                 "model.safetensors"):
        with open(os.path.join(out_dir, name), "rb") as f:
            h.update(name.encode())
            h.update(f.read())
    return h.hexdigest()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--init-std", type=float, default=0.1)
    a = ap.parse_args(argv)
    write_model(a.dir, a.seed, a.init_std)
    print(f"{a.dir}: sha256 {digest(a.dir)}")


if __name__ == "__main__":
    sys.exit(main())
