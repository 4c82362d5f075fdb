"""Rotary position embedding for the drafter, with transformers' frequency tables.

The inverse frequencies come from transformers' own RoPE initialisers (default, linear,
dynamic, yarn, llama3, ...), so a checkpoint's ``rope_parameters`` mean exactly what
they meant when the drafter was distilled. Rotation is the neox ``rotate_half`` layout
used by Qwen3 and by the reference drafter; a layout mismatch does not crash, it
silently collapses acceptance.
"""

from __future__ import annotations

import torch
from torch import nn


def _inv_freq(hf_config) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = hf_config.rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        base = float(hf_config.rope_parameters["rope_theta"])
        dim = hf_config.head_dim
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv, 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for absolute positions: frequencies and tables in float32, the
    tables cast to the activation dtype at the end, like the reference (HF Qwen3).

    ``Module.to(dtype)`` casts floating buffers; in bfloat16 the frequencies lose enough
    bits that the angle at position 1,000 is off by ~0.9 rad, which silently lowers
    acceptance with context length. :meth:`_apply` keeps them float32 whatever the
    module is cast to (devices still move).
    """

    def __init__(self, hf_config) -> None:
        super().__init__()
        inv_freq, scaling = _inv_freq(hf_config)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = float(scaling)

    def _apply(self, fn, recurse: bool = True):
        original = self.inv_freq
        super()._apply(fn, recurse)
        if not original.is_meta:
            self.inv_freq = original.to(device=self.inv_freq.device, dtype=torch.float32)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> (cos, sin): [T, head_dim]."""
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, head_dim]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + rotate_half(x) * sin
