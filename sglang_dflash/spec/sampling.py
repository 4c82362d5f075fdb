"""Sampling for speculative decoding: per-row distributions and the batch's sampled rows.

* :func:`filtered_probs`: the distribution plain decoding samples each row from,
  filtered exactly as SGLang's torch sampler does;
* :class:`SampledRows`: which requests of a batch sample (the rest are greedy), their
  parameters and their random numbers, shared by drafting and verification, which
  must agree on the rule.

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
from typing import Optional, Sequence

import torch

from ..options import PQ


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




@dataclass
class SampledRows:
    """The sampled (non-greedy) requests of a batch, with their parameters and random numbers.

    index:    [S] their rows in the batch.
    params:   their temperature / top-k / top-p / min-p.
    uniforms: [S, 2B-1] U(0,1): B-1 for drafting, B-1 for the accept tests, 1 for the
              replacement/bonus draw. A seeded request's numbers depend only on its
              seed and its decode step, so its output does not depend on the batch.
    rule:     ``pq`` drafts from the drafter's distribution and accepts with
              min(1, target/draft); ``target-only`` drafts the argmax and accepts with
              the target's probability (SGLang's built-in rule).
    """

    index: torch.Tensor
    params: RowSampling
    uniforms: torch.Tensor
    rule: str = PQ

    @property
    def block_steps(self) -> int:
        return (self.uniforms.shape[1] - 1) // 2

    def draft_uniforms(self) -> torch.Tensor:
        return self.uniforms[:, : self.block_steps]

    def accept_uniforms(self, drafts: int) -> torch.Tensor:
        return self.uniforms[:, self.block_steps : self.block_steps + drafts]

    def residual_uniforms(self) -> torch.Tensor:
        return self.uniforms[:, -1]


def request_uniforms(
    seeds: Sequence[Optional[int]], steps: Sequence[int], count: int, device, *, generator: torch.Generator
) -> torch.Tensor:
    """[len(seeds), count] U(0,1), never from the process's global RNG.

    A seeded row is keyed by (seed, step), so its output does not depend on the batch.
    Unseeded rows come from ``generator``, which only speculative sampling consumes:
    the host seeds it with the launch's random seed on every rank of a tensor-parallel
    group, and the ranks consume it identically (the same batches, in the same order),
    so every rank draws the same numbers with no communication, whatever else consumed
    randomness on that rank.
    """
    out = torch.rand(len(seeds), count, generator=generator)
    for i, (seed, step) in enumerate(zip(seeds, steps)):
        if seed is not None:
            key = (int(seed) * 0x9E3779B97F4A7C15 + int(step)) % (1 << 63)
            out[i] = torch.rand(count, generator=torch.Generator().manual_seed(key))
    return out.to(device)
