"""Target logits over a verify chain -> per-request acceptance, greedy and sampled rows together.

Greedy requests (SGLang encodes them as ``top_k == 1``) accept by exact argmax match,
so their output is token-identical to plain greedy decoding. Sampled requests go
through rejection sampling (see ``rejection``). The worker finds the sampled rows on
the host, so a mixed batch costs no device sync, and the [rows, N, V] probability
tensors exist only for the sampled requests.
"""

from __future__ import annotations

from typing import Optional

import torch

from .acceptance import Acceptance, greedy_chain_acceptance
from .proposer import Proposal
from .rejection import chain_rejection_sample, one_hot_probs, sample_from
from .sampled_rows import SampledRows
from .sampling import filtered_probs


def verify_chain(proposal: Proposal, target_logits: torch.Tensor, sampled: Optional[SampledRows]) -> Acceptance:
    """target_logits: [bs, N, V] -> acceptance of every row (greedy rows by argmax match)."""
    result = greedy_chain_acceptance(proposal.tokens, target_logits.argmax(dim=-1))
    if sampled is None:
        return result
    rows = sampled.index
    s, n = rows.numel(), proposal.tokens.shape[1]
    vocab = target_logits.shape[-1]
    target_probs = filtered_probs(target_logits[rows].reshape(s * n, vocab), sampled.params.repeat_interleave(n))
    if n == 1:  # nothing drafted (speculation off): a plain sample from the target
        result.bonus[rows] = sample_from(target_probs, sampled.residual_uniforms())
        result.out_tokens[rows, 0] = result.bonus[rows]
        return result
    draft_probs = proposal.draft_probs
    if draft_probs is None:  # target-only rule: the draft was a deterministic argmax
        draft_probs = one_hot_probs(proposal.tokens[rows, 1:], vocab)
    outcome = chain_rejection_sample(
        proposal.tokens[rows],
        target_probs.view(s, n, vocab),
        draft_probs,
        sampled.accept_uniforms(n - 1),
        sampled.residual_uniforms(),
    )
    result.num_accepted[rows] = outcome.num_accepted
    result.out_tokens[rows] = outcome.out_tokens
    result.bonus[rows] = outcome.bonus
    return result
