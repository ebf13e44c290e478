#!/usr/bin/env python3
"""Writes a LoRA adapter for the tiny Llama of make-tiny-llama.py, in the
format PEFT saves (adapter_config.json and adapter_model.safetensors, rank
8 on q_proj and v_proj of every layer), with random weights, so that vLLM
can load it at run time (`/v1/load_lora_adapter`).

Usage: make-tiny-lora.py MODEL_DIR OUT_DIR   (torch and safetensors come with vLLM)
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

RANK = 8


def main(model_dir, out_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = hidden // heads
    out_features = {"q_proj": heads * head_dim, "v_proj": kv_heads * head_dim}
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, out in out_features.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, hidden, generator=generator) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, RANK, generator=generator) * 0.01
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": os.path.abspath(model_dir),
        "r": RANK,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": sorted(out_features),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=2)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
