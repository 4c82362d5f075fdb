"""One draft step for a batch: the block ``[bonus, MASK x (B-1)]`` through the drafter.

SGLang-agnostic on purpose: it takes tensors and callables (the target's embedding and
lm_head), so it can be unit-tested against the reference and captured in a CUDA graph
as a whole (embed, layers, lm_head, argmax / sample).

Proposals are the drafter's argmax for greedy requests. For sampled requests under the
default ``pq`` rule they are drawn from the drafter's own distribution, filtered with
the request's temperature / top-k / top-p / min-p exactly like the target's, and that
distribution is returned so verification can use the full ``target / draft`` ratio
(see :mod:`.accept`); the ``target-only`` rule keeps the argmax.

A DFlash2 drafter (one with a candidate selector) drafts a path through its lattice
instead (:mod:`.selector`): the argmax path for greedy rows, a sampled path and its
q rows for sampled rows under ``pq``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..model.draft_attention import DraftAttnPlan
from ..model.drafter import DFlashDrafter
from .accept import sample_from
from .sampling import PQ, SampledRows, filtered_probs
from .selector import select_drafts


@dataclass
class Proposal:
    """tokens: [bs, B], column 0 = bonus; draft_probs: [S, B-1, V] for the sampled rows
    (in ``SampledRows.index`` order), or None when every request is greedy; logits:
    [bs, B-1, V] the drafter's, when its drafts derive from them alone (not DFlash2)."""

    tokens: torch.Tensor
    draft_probs: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None

    def truncated(self, verify_len: int) -> "Proposal":
        """The first ``verify_len`` block nodes (bonus + ``verify_len - 1`` drafts)."""
        steps = verify_len - 1
        return Proposal(
            tokens=self.tokens[:, :verify_len],
            draft_probs=None if self.draft_probs is None else self.draft_probs[:, :steps],
            logits=None if self.logits is None else self.logits[:, :steps],
        )


class BlockProposer:
    def __init__(
        self,
        drafter: DFlashDrafter,
        attention,
        *,
        embed: Callable[[torch.Tensor], torch.Tensor],
        lm_head: Callable[[torch.Tensor], torch.Tensor],
        mask_token_id: int,
        block_size: int,
    ) -> None:
        self.drafter = drafter
        self.attention = attention
        self.embed = embed
        self.lm_head = lm_head
        self.mask_token_id = int(mask_token_id)
        self.block_size = int(block_size)

    def block_tokens(self, bonus: torch.Tensor) -> torch.Tensor:
        block = torch.full((bonus.shape[0], self.block_size), self.mask_token_id, dtype=torch.long, device=bonus.device)
        block[:, 0] = bonus
        return block

    def draft_hidden(self, bonus: torch.Tensor, plan: DraftAttnPlan) -> torch.Tensor:
        """[bs] bonus tokens -> [bs, B-1, H] final-normed drafter states at block positions 1..B-1."""
        bs, block = bonus.shape[0], self.block_size
        self.attention.bind(plan)
        x = self.drafter.scale_input(self.embed(self.block_tokens(bonus).reshape(-1)))
        hidden = self.drafter(x, plan.q_positions.reshape(-1), self.attention, block)
        return hidden.view(bs, block, -1)[:, 1:]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[bs, B-1, H] -> [bs, B-1, V] logits through the target's lm_head."""
        bs, steps, width = hidden.shape
        return self.lm_head(hidden.reshape(bs * steps, width)).view(bs, steps, -1)

    def draft_logits(self, bonus: torch.Tensor, plan: DraftAttnPlan) -> torch.Tensor:
        """[bs] bonus tokens -> [bs, B-1, V] draft logits for block positions 1..B-1."""
        return self.head(self.draft_hidden(bonus, plan))

    def propose(self, bonus: torch.Tensor, plan: DraftAttnPlan, *, sampled: Optional[SampledRows] = None) -> Proposal:
        hidden = self.draft_hidden(bonus, plan)
        logits = self.head(hidden)
        selector = self.drafter.candidate_selector
        if selector is None:
            return make_proposal(bonus, logits, logits.argmax(dim=-1), sampled)
        drafts, draft_probs = select_drafts(selector, bonus, hidden, logits, sampled)
        return Proposal(tokens=torch.cat([bonus[:, None].long(), drafts], dim=1), draft_probs=draft_probs)


def make_proposal(bonus: torch.Tensor, logits: torch.Tensor, drafts: torch.Tensor, sampled: Optional[SampledRows]) -> Proposal:
    """Greedy ``drafts`` for every row; under the ``pq`` rule the sampled rows are
    redrawn from the drafter's filtered distribution, which is kept for verification."""
    draft_probs = None
    if sampled is not None and sampled.rule == PQ:
        rows = logits[sampled.index]
        s, steps, vocab = rows.shape
        flat = filtered_probs(rows.reshape(s * steps, vocab), sampled.params.repeat_interleave(steps))
        draft_probs = flat.view(s, steps, vocab)
        drafts = drafts.clone()
        drafts[sampled.index] = sample_from(flat, sampled.draft_uniforms()[:, :steps].reshape(-1)).view(s, steps)
    tokens = torch.cat([bonus[:, None].long(), drafts], dim=1)
    return Proposal(tokens=tokens, draft_probs=draft_probs, logits=logits)
