"""The sampled (non-greedy) requests of a batch: which rows, their parameters, their randomness.

Shared by drafting (``proposer``) and verification, which must agree on the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .sampling import RowSampling

PQ, TARGET_ONLY = "pq", "target-only"
SAMPLING_RULES = (PQ, TARGET_ONLY)


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


def request_uniforms(seeds: Sequence[Optional[int]], steps: Sequence[int], count: int, device) -> torch.Tensor:
    """[len(seeds), count] uniforms; seeded rows from a generator keyed by (seed, step)."""
    out = torch.rand(len(seeds), count)
    for i, (seed, step) in enumerate(zip(seeds, steps)):
        if seed is not None:
            key = (int(seed) * 0x9E3779B97F4A7C15 + int(step)) % (1 << 63)
            out[i] = torch.rand(count, generator=torch.Generator().manual_seed(key))
    return out.to(device)
