"""Target logits over a verify chain -> per-request acceptance, greedy and sampled rows together.

Greedy requests (SGLang encodes them as ``top_k == 1``) accept by exact argmax match,
so their output is token-identical to plain greedy decoding. Sampled requests go
through rejection sampling with the drafter's own distribution. Rows are split on the
host (``greedy_rows`` is a Python list), so a mixed batch costs no device sync, and the
[rows, N, V] probability tensors exist only for the sampled requests.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .acceptance import Acceptance, greedy_chain_acceptance
from .proposer import Proposal
from .rejection import chain_rejection_sample, sample_from
from .sampling import RowSampling, filtered_probs


def sampled_row_index(greedy_rows: Sequence[bool], device) -> Optional[torch.Tensor]:
    rows = [i for i, greedy in enumerate(greedy_rows) if not greedy]
    return torch.tensor(rows, dtype=torch.long, device=device) if rows else None


def verify_chain(
    proposal: Proposal,
    target_logits: torch.Tensor,
    *,
    sampled_rows: Optional[torch.Tensor],
    sampling: Optional[RowSampling],
    generator: Optional[torch.Generator] = None,
) -> Acceptance:
    """target_logits: [bs, N, V]; ``sampling`` holds the sampled rows' params."""
    result = greedy_chain_acceptance(proposal.tokens, target_logits.argmax(dim=-1))
    if sampled_rows is None:
        return result
    s, n = sampled_rows.numel(), proposal.tokens.shape[1]
    vocab = target_logits.shape[-1]
    target_probs = filtered_probs(target_logits[sampled_rows].reshape(s * n, vocab), sampling.repeat_interleave(n))
    device = target_logits.device
    if n == 1:  # nothing drafted (speculation off): a plain sample from the target
        result.bonus[sampled_rows] = sample_from(target_probs, torch.rand(s, device=device, generator=generator))
        result.out_tokens[sampled_rows, 0] = result.bonus[sampled_rows]
        return result
    sampled = chain_rejection_sample(
        proposal.tokens[sampled_rows],
        target_probs.view(s, n, vocab),
        proposal.draft_probs,
        torch.rand(s, n - 1, device=device, generator=generator),
        torch.rand(s, device=device, generator=generator),
    )
    result.num_accepted[sampled_rows] = sampled.num_accepted
    result.out_tokens[sampled_rows] = sampled.out_tokens
    result.bonus[sampled_rows] = sampled.bonus
    return result
