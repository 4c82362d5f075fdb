"""Per-row sampling distributions, filtered exactly as SGLang's torch sampler does.

Lossless speculative sampling must reproduce the distribution plain decoding samples
from. SGLang 0.5.23 (``top_k_top_p_min_p_sampling_from_probs_torch``) takes
``softmax(logits / T)``, sorts it, zeroes ranks ``>= top_k``, zeroes entries whose
*unfiltered* cumulative mass before them exceeds ``top_p``, zeroes entries below
``min_p * max_prob``, and samples proportionally to what is left. :func:`filtered_probs`
returns that normalised distribution for every row at once.

Greedy requests are encoded by SGLang as ``top_k == 1``; their distribution is the
one-hot argmax, so the same code treats greedy and sampled rows of a mixed batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowSampling:
    """Sampling parameters, one row per logits row. Shapes: [R]."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor

    @property
    def greedy(self) -> torch.Tensor:
        return self.top_k == 1

    def repeat_interleave(self, n: int) -> "RowSampling":
        """Per-request params -> per-verify-row params (each request owns n rows)."""
        return RowSampling(*(t.repeat_interleave(n, dim=0) for t in (self.temperature, self.top_k, self.top_p, self.min_p)))

    def select(self, rows: torch.Tensor) -> "RowSampling":
        return RowSampling(*(t[rows] for t in (self.temperature, self.top_k, self.top_p, self.min_p)))

    @classmethod
    def from_sglang(cls, sampling_info) -> "RowSampling":
        return cls(
            temperature=sampling_info.temperatures.view(-1).float(),
            top_k=sampling_info.top_ks.view(-1).long(),
            top_p=sampling_info.top_ps.view(-1).float(),
            min_p=sampling_info.min_ps.view(-1).float(),
        )


def filtered_probs(logits: torch.Tensor, params: RowSampling) -> torch.Tensor:
    """logits: [R, V] -> the normalised distribution SGLang samples each row from (float32)."""
    scores = logits.float() / params.temperature.clamp_min(1e-6)[:, None]
    probs = torch.softmax(scores, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    ranks = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    keep = (ranks < params.top_k[:, None]) & (before <= params.top_p[:, None])
    keep &= sorted_probs >= (sorted_probs[:, :1] * params.min_p[:, None])
    keep[:, 0] = True  # the most likely token always survives
    sorted_probs = sorted_probs * keep
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
