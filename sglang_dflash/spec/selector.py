"""Drafting with a DFlash2 candidate selector: candidates, the path walk, its q rows.

The drafter's hidden states at block positions 1..B-1 give, through the target's
lm_head, K candidates per draft slot (the top-K logits; their transformed values are
the unary scores). The selector (:class:`~sglang_dflash.model.selector.CandidateSelector`)
scores every transition between adjacent slots' candidates, and one path is walked
from the bonus token:

* greedy requests take the argmax transition at every slot (first maximum on ties);
* sampled requests (``pq`` rule) draw slot ``e``'s candidate from
  ``q_e = softmax(score[e, i_{e-1}, :] / T)`` over the K candidates only, by inverse
  CDF with one uniform per slot (the count of ``cumsum(q_e) <= u``, as SGLang does).

The draft is a Markov chain over slots, so ``q_e`` is exactly the distribution node
``e + 1`` was drawn from given the nodes before it -- the ``draft`` of p/q rejection
sampling (:mod:`.accept`). Spread over the full vocabulary (zero outside the
candidates) it feeds :func:`~.accept.verify_chain` unchanged, so sampled output stays
distributed exactly as the target's. Greedy walks are deterministic: their q is the
one-hot of the chosen candidate, which verification treats as the argmax rule.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from ..model.selector import CandidateSelector
from .sampling import PQ, SampledRows

MIN_TEMPERATURE = 1e-5  # SGLang's clamp for the selector walk


def candidates(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [bs, S, V] -> (candidate ids [bs, S, K], unary scores [bs, S, K] float32),
    best first."""
    values, ids = torch.topk(logits.float(), top_k, dim=-1)
    return ids, values


def walk(
    scores: torch.Tensor, *, greedy: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One path through the lattice.

    scores [bs, S, K, K] (previous candidate, this candidate); greedy [bs] bool;
    temperature [bs]; uniforms [bs, S] -> (candidate index per slot [bs, S],
    q rows [bs, S, K] float32: the distribution each slot was drawn from).
    """
    bs, slots, k, _ = scores.shape
    rows = torch.arange(bs, device=scores.device)
    temps = temperature.float().clamp_min(MIN_TEMPERATURE)[:, None]
    previous = torch.zeros(bs, dtype=torch.long, device=scores.device)  # slot 0: every row is the anchor's
    path, q_rows = [], []
    for slot in range(slots):
        row = scores[rows, slot, previous].float()
        probs = torch.softmax(row / temps, dim=-1)
        drawn = (uniforms[:, slot, None].float() >= probs.cumsum(dim=-1)).sum(dim=-1).clamp_max(k - 1)
        previous = torch.where(greedy, row.argmax(dim=-1), drawn)
        q_rows.append(torch.where(greedy[:, None], F.one_hot(previous, k).float(), probs))
        path.append(previous)
    return torch.stack(path, dim=1), torch.stack(q_rows, dim=1)


def select_drafts(
    selector: CandidateSelector,
    bonus: torch.Tensor,
    hidden: torch.Tensor,
    logits: torch.Tensor,
    sampled: Optional[SampledRows],
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """bonus [bs], hidden [bs, S, H], logits [bs, S, V] -> (drafts [bs, S], draft
    distributions [len(sampled), S, V] of the sampled rows under ``pq``, else None)."""
    ids, unary = candidates(logits, selector.top_k)
    scores = selector.lattice(ids, unary, hidden, bonus)
    bs, slots = ids.shape[:2]
    greedy = torch.ones(bs, dtype=torch.bool, device=ids.device)
    temperature = torch.ones(bs, device=ids.device)
    uniforms = torch.zeros(bs, slots, device=ids.device)
    pq = sampled is not None and sampled.rule == PQ
    if pq:
        greedy[sampled.index] = False
        temperature[sampled.index] = sampled.params.temperature.float()
        uniforms[sampled.index] = sampled.draft_uniforms()[:, :slots].float()
    index, q_rows = walk(scores, greedy=greedy, temperature=temperature, uniforms=uniforms)
    drafts = ids.gather(-1, index[..., None]).squeeze(-1)
    if not pq:
        return drafts, None
    rows = sampled.index
    dense = torch.zeros(rows.numel(), slots, logits.shape[-1], device=ids.device)
    return drafts, dense.scatter_(-1, ids[rows], q_rows[rows])
