"""The block convolution of DFlash2 drafters: a dynamic depthwise causal convolution
along the draft block, wrapped around each sublayer (attention and MLP).

A draft block ``[bonus, MASK x (B-1)]`` is denoised in one non-causal pass; the
convolution gives every block position a cheap, position-ordered view of the
``T - 1`` positions before it. For a sublayer with normed input ``x`` ([B, H] per
block), one projection of ``x`` yields per-position, per-group coefficients for both
sides, and

    conv_s(y, C)[p, c] = sum_t (base[s, t, c] + C[p, t, c // group]) * y[p - t, c]

(zero where ``p - t < 0``: the block start, never context tokens) is applied to the
sublayer's input (side 0, coefficients from ``x``) and to its output (side 1,
coefficients also from ``x``). Context tokens never pass through it; their K/V come
from the projected target features as in DFlash. With ``base = [1, 0, ...]`` and a
zero projection the layer is exactly a DFlash (v1) layer.

Checkpoint layout (z-lab, SGLang): ``base_kernel`` [2, T, H] (side, tap, channel) and
``kernel_projection.weight`` [2*T*G, H], output row ``side*T*G + t*G + g``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F


class BlockConvolution(nn.Module):
    def __init__(self, hidden_size: int, taps: int, group_size: int) -> None:
        super().__init__()
        if hidden_size % group_size:
            raise ValueError(f"conv_group_size={group_size} does not divide hidden_size={hidden_size}")
        self.taps = int(taps)
        self.group_size = int(group_size)
        self.num_groups = hidden_size // self.group_size
        base = torch.zeros(2, self.taps, hidden_size)
        base[:, 0] = 1.0  # identity: a fresh convolution leaves the layer unchanged
        self.base_kernel = nn.Parameter(base)
        self.kernel_projection = nn.Linear(hidden_size, 2 * self.taps * self.num_groups, bias=False)

    def around(self, sublayer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, block_size: int) -> torch.Tensor:
        """``conv_1(sublayer(conv_0(x)))``, both sides' coefficients projected from ``x``.

        x: [N, H], N = blocks * block_size, rows block-major (each block contiguous).
        """
        coefficients = self.kernel_projection(x).view(*x.shape[:-1], 2, self.taps, self.num_groups)
        inner = self.convolve(x, coefficients[..., 0, :, :], side=0, block_size=block_size)
        return self.convolve(sublayer(inner), coefficients[..., 1, :, :], side=1, block_size=block_size)

    def convolve(self, x: torch.Tensor, delta: torch.Tensor, *, side: int, block_size: int) -> torch.Tensor:
        """x: [N, H]; delta: [N, T, G] dynamic coefficients -> [N, H], causal within each block."""
        if x.shape[0] % block_size:
            raise ValueError(f"{x.shape[0]} rows are not whole blocks of {block_size}")
        taps, groups, width = self.taps, self.num_groups, self.group_size
        blocks = x.view(-1, block_size, groups, width)
        kernel = self.base_kernel[side].view(1, 1, taps, groups, width) + delta.view(-1, block_size, taps, groups, 1)
        out = kernel[:, :, 0] * blocks
        for tap in range(1, min(taps, block_size)):  # taps reaching past the block start add zero
            earlier = F.pad(blocks[:, :-tap], (0, 0, 0, 0, tap, 0))  # zero before the block start
            out = out + kernel[:, :, tap] * earlier
        return out.reshape(x.shape)
