"""A random LoRA adapter for a local HF model, in PEFT's on-disk layout (no peft needed).

``adapter_config.json`` plus ``adapter_model.safetensors`` with
``base_model.model.model.layers.{i}.self_attn.{q,v}_proj.lora_{A,B}.weight``: the layout
SGLang's LoRA manager loads for ``--lora-paths``. ``scale`` sets how far the adapter moves
the model: large enough to change greedy output, small enough that a drafter trained on
the base model still has drafts accepted.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def build_lora_adapter(
    out: str | Path,
    *,
    base_model: str | Path,
    rank: int = 8,
    alpha: int = 16,
    scale: float = 0.05,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(base_model) / "config.json").read_text())
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    out_dims = {
        "q_proj": config["num_attention_heads"] * head_dim,
        "k_proj": config["num_key_value_heads"] * head_dim,
        "v_proj": config["num_key_value_heads"] * head_dim,
        "o_proj": hidden,
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in target_modules:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) / hidden**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_dims[module], rank, generator=gen) * scale
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(target_modules),
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out
