"""The candidate selector of DFlash2 drafters: pairwise scores between adjacent drafts.

A DFlash block predicts its positions independently; the selector restores some of
the dependence between neighbours cheaply. Each draft slot ``e`` (block position
``e + 1``) keeps the target lm_head's top-K tokens of the drafter's hidden state as
candidates, each with a unary score (its transformed logit), and every transition
from a candidate ``p`` of the previous slot to a candidate ``c`` of this one scores

    score[e, p, c] = unary[e, c] + < A[pred(e, p)] * (P h_e), Bt[cand[e, c]] >

with ``pred(0, p)`` the block's bonus token (the anchor, the same for every ``p``) and
``pred(e, p) = cand[e - 1, p]``. ``A`` / ``Bt`` are the ``[V, r]`` predecessor /
successor codebooks and ``P`` the ``[r, H]`` hidden projection. How a path is walked
through this lattice (argmax, or sampled at the request's temperature) is the
speculator's business (:mod:`sglang_dflash.spec.selector`).

The codebooks are plain parameters named without ``.weight``, as SGLang loads them.
"""

from __future__ import annotations

import torch
from torch import nn


class CandidateSelector(nn.Module):
    def __init__(self, hidden_size: int, vocab_size: int, rank: int, top_k: int) -> None:
        super().__init__()
        self.top_k = int(top_k)
        self.hidden_projection = nn.Linear(hidden_size, rank, bias=False)
        self.predecessor_codebook = nn.Parameter(torch.zeros(vocab_size, rank))
        self.successor_codebook = nn.Parameter(torch.zeros(vocab_size, rank))

    def lattice(
        self, candidates: torch.Tensor, unary: torch.Tensor, hidden: torch.Tensor, anchor: torch.Tensor
    ) -> torch.Tensor:
        """candidates [bs, S, K] ids, unary [bs, S, K], hidden [bs, S, H], anchor [bs]
        -> scores [bs, S, K (previous slot's candidate), K (this slot's)], float32."""
        k = candidates.shape[-1]
        gate = self.hidden_projection(hidden.to(self.hidden_projection.weight.dtype))
        predecessors = torch.cat([anchor.long()[:, None, None].expand(-1, 1, k), candidates[:, :-1]], dim=1)
        queries = self.predecessor_codebook[predecessors] * gate[:, :, None]
        keys = self.successor_codebook[candidates]
        return unary.float()[:, :, None] + torch.einsum("bspr,bscr->bspc", queries, keys)
