"""Lossless speculative (rejection) sampling along a linear verify chain.

Letters are avoided on purpose (papers disagree on which of p/q is the draft):

* ``target_probs[j]``: the target's distribution for node j+1 given nodes 0..j
  (what plain decoding would sample from, see :mod:`sampling`);
* ``draft_probs[j]``: the drafter's distribution that node j+1 was sampled from;
  a greedy (deterministic) draft is the one-hot of its token.

Draft ``x = node j+1`` is accepted with probability ``min(1, target(x) / draft(x))``.
At the first rejection, the replacement is sampled from the residual
``normalise(max(0, target - draft))``; if every draft is accepted, the bonus is sampled
from ``target_probs[N-1]``. Each emitted token is then distributed exactly as the
target's own sample (Leviathan et al. 2023, Chen et al. 2023). With a one-hot draft,
acceptance probability is ``target(x)`` and the residual is the target with ``x``
removed: the "target-only" rule as a special case.

Vectorised over the batch and the chain; the uniforms are an argument, so seeded
requests are reproducible and tests can drive the sampler.
"""

from __future__ import annotations

import torch

from .acceptance import Acceptance


def chain_rejection_sample(
    draft_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    uniforms: torch.Tensor,
    residual_uniforms: torch.Tensor,
) -> Acceptance:
    """
    draft_tokens:      [bs, N] node 0 = previous bonus, nodes 1.. = drafts.
    target_probs:      [bs, N, V] target distribution after each node.
    draft_probs:       [bs, N-1, V] distribution each draft was sampled from.
    uniforms:          [bs, N-1] U(0,1) for the accept tests.
    residual_uniforms: [bs] U(0,1) for the replacement / bonus draw.
    """
    bs, n, _ = target_probs.shape
    drafts = draft_tokens[:, 1:]
    p_draft = target_probs[:, :-1].gather(-1, drafts[..., None]).squeeze(-1)
    q_draft = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
    accept = uniforms * q_draft < p_draft  # u < p/q without dividing by q
    num_accepted = accept.int().cumprod(dim=1).sum(dim=1)

    rows = torch.arange(bs, device=target_probs.device)
    final = target_probs[rows, num_accepted]
    rejected = num_accepted < n - 1
    safe_idx = num_accepted.clamp(max=n - 2)
    residual = (final - draft_probs[rows, safe_idx]).clamp_min(0)
    mass = residual.sum(dim=-1, keepdim=True)
    # A zero residual means target == draft at that node, which rejects with
    # probability zero; keep the target there so the draw stays well defined.
    residual = torch.where(mass > 0, residual / mass.clamp_min(torch.finfo(mass.dtype).tiny), final)
    dist = torch.where(rejected[:, None], residual, final)
    bonus = sample_from(dist, residual_uniforms)

    out_tokens = torch.cat([drafts, drafts[:, :1]], dim=1).clone()
    out_tokens.scatter_(1, num_accepted[:, None], bonus[:, None])
    return Acceptance(num_accepted=num_accepted, out_tokens=out_tokens, bonus=bonus)


def sample_from(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs [R, V], uniforms [R] -> token ids [R]."""
    cdf = probs.float().cumsum(dim=-1)
    target = uniforms.float()[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).clamp(max=probs.shape[-1] - 1).squeeze(-1)


def one_hot_probs(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The distribution of a deterministic draft: [...] -> [..., V]."""
    return torch.nn.functional.one_hot(tokens.long(), vocab_size).float()
