"""The DFlash training objective: many anchored blocks per sequence in one pass.

For a sequence ``tokens[0:T]`` and an anchor ``a``, the block is
``[tokens[a], MASK x (B-1)]`` at positions ``a .. a+B-1``, exactly what the drafter
sees at serving time right after ``tokens[a]`` was emitted. Block position ``k >= 1``
is trained to predict ``tokens[a+k]`` (no shift), with weight ``exp(-(k-1)/gamma)``:
early positions matter more because acceptance stops at the first miss.

Every block of a sequence runs in the same forward. Keys are the sequence's context
tokens (``T`` of them, their K/V made by each drafter layer from
``project_context(features)`` at their absolute positions) followed by all blocks'
own tokens. The boolean mask lets a block query see

* context key ``c`` iff ``c < a`` (the features the server would have cached), and
* every token of its own block (bidirectional), and no other block.

Context tokens are never queries. Anchors are drawn from the response (``a >=
prompt_len``) so that every label is a token the target itself chose.

A DFlash2 drafter's candidate selector is trained alongside, teacher-forced: slot
``k`` keeps the top-K tokens of its logits as candidates and scores them from the
*true* previous token (the anchor for ``k = 1``, else ``tokens[a+k-1]``) as the
serving walk would from a correct path; its cross-entropy over the K candidates,
with the same position weights, is added wherever the label is among them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.nn import functional as F

from ..model.drafter import DFlashDrafter
from .data import SequenceSet

IGNORE = -100


def loss_weights(block_size: int, gamma: float) -> torch.Tensor:
    """[B-1] weights of block positions 1..B-1: exp(-(k-1)/gamma)."""
    k = torch.arange(1, block_size, dtype=torch.float32)
    return torch.exp(-(k - 1) / gamma)


def default_gamma(block_size: int) -> float:
    """The paper's decay: 7 for B=16, 5 for B=10, 4 for B=8 (linear in between)."""
    return {16: 7.0, 10: 5.0, 8: 4.0}.get(block_size, max(1.0, 4.0 + 3.0 * (block_size - 8) / 8))


def sample_anchors(prompt_len: int, seq_len: int, num_anchors: int, generator: torch.Generator) -> list[int]:
    """Up to ``num_anchors`` distinct anchors in ``[prompt_len, seq_len - 2]``, sorted."""
    low, high = max(prompt_len, 1), seq_len - 2
    if high < low:
        return []
    count = high - low + 1
    picks = torch.randperm(count, generator=generator)[:num_anchors] + low
    return sorted(picks.tolist())


def block_attention_mask(anchors: torch.Tensor, valid: torch.Tensor, ctx_len: int, block_size: int) -> torch.Tensor:
    """anchors, valid: [S, m] -> [S, 1, m*B, ctx_len + m*B] 'may attend' mask.

    Query rows are block-major (block j, position k) -> row j*B + k; key columns are
    context tokens 0..ctx_len-1, then the blocks in the same block-major order.
    Padding blocks (``valid`` False) see only themselves, so no row is empty.
    """
    s, m = anchors.shape
    ctx = torch.arange(ctx_len, device=anchors.device)
    sees_ctx = (ctx[None, None, :] < anchors[:, :, None]) & valid[:, :, None]  # [S, m, ctx]
    sees_ctx = sees_ctx[:, :, None, :].expand(s, m, block_size, ctx_len).reshape(s, m * block_size, ctx_len)
    block_id = torch.arange(m, device=anchors.device).repeat_interleave(block_size)
    own = (block_id[:, None] == block_id[None, :])[None].expand(s, -1, -1)
    return torch.cat([sees_ctx, own], dim=2)[:, None]


@dataclass
class BlockBatch:
    """S sequences, m blocks each, block size B; context padded to T tokens.

    features:      [S, T, K*H] concatenated target features (zeros past a sequence's end)
    block_tokens:  [S, m, B] anchor token then MASK
    anchors:       [S, m] anchor positions (0 for padding blocks)
    labels:        [S, m, B-1] tokens a+1..a+B-1, IGNORE past the end or for padding
    mask:          [S, 1, m*B, T + m*B]
    """

    features: torch.Tensor
    block_tokens: torch.Tensor
    anchors: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor

    @property
    def block_positions(self) -> torch.Tensor:
        offsets = torch.arange(self.block_tokens.shape[2], device=self.anchors.device)
        return self.anchors[:, :, None] + offsets

    def to(self, device) -> "BlockBatch":
        return BlockBatch(*(t.to(device) for t in (self.features, self.block_tokens, self.anchors, self.labels, self.mask)))


def make_batch(
    data: SequenceSet,
    indices: Sequence[int],
    features: torch.Tensor,
    *,
    block_size: int,
    num_anchors: int,
    mask_token_id: int,
    generator: torch.Generator,
) -> BlockBatch:
    """Random anchored blocks for sequences ``indices``; ``features`` is
    ``data.stacked_features(layer_ids)``, rows aligned with ``data.tokens``."""
    seqs = [data.sequence(i).long() for i in indices]
    ctx_len = max(len(t) for t in seqs)
    s, b = len(seqs), block_size
    feats = torch.zeros(s, ctx_len, features.shape[1], dtype=features.dtype)
    block_tokens = torch.full((s, num_anchors, b), mask_token_id, dtype=torch.long)
    anchors = torch.zeros(s, num_anchors, dtype=torch.long)
    valid = torch.zeros(s, num_anchors, dtype=torch.bool)
    labels = torch.full((s, num_anchors, b - 1), IGNORE, dtype=torch.long)
    for row, (i, tokens) in enumerate(zip(indices, seqs)):
        start = int(data.offsets[i])
        feats[row, : len(tokens)] = features[start : start + len(tokens)]
        picks = sample_anchors(int(data.prompt_lens[i]), len(tokens), num_anchors, generator)
        for j, a in enumerate(picks):
            anchors[row, j], valid[row, j] = a, True
            block_tokens[row, j, 0] = tokens[a]
            target = tokens[a + 1 : a + b]
            labels[row, j, : len(target)] = target
    mask = block_attention_mask(anchors, valid, ctx_len, b)
    return BlockBatch(feats, block_tokens, anchors, labels, mask)


class BlockSparseAttention:
    """``attend`` for :meth:`DFlashDrafter.forward` over context K/V + all blocks."""

    def __init__(self, ctx_kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, scale: float) -> None:
        self.ctx_kv = ctx_kv  # per layer: k, v [S, T, kv_heads, hd]
        self.mask = mask
        self.scale = scale

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx_k, ctx_v = self.ctx_kv[layer]
        s = ctx_k.shape[0]
        q = q.view(s, -1, *q.shape[1:]).transpose(1, 2)
        keys = torch.cat([ctx_k, k.view(s, -1, *k.shape[1:])], dim=1).transpose(1, 2)
        values = torch.cat([ctx_v, v.view(s, -1, *v.shape[1:])], dim=1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, keys, values.to(q.dtype), attn_mask=self.mask,
                                             scale=self.scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(-1, q.shape[1] * q.shape[3])


def block_hidden(drafter: DFlashDrafter, batch: BlockBatch, embed_weight: torch.Tensor) -> torch.Tensor:
    """Final-normed drafter hidden states of every block token: [S, m, B, H]."""
    s, t, _ = batch.features.shape
    ctx = drafter.project_context(batch.features.reshape(s * t, -1))
    positions = torch.arange(t, device=ctx.device).repeat(s)
    cos, sin = drafter.rotary(positions, ctx.dtype)
    ctx_kv = []
    for layer in drafter.layers:
        k, v = layer.self_attn.project_kv(ctx, cos, sin)
        ctx_kv.append((k.view(s, t, *k.shape[1:]), v.view(s, t, *v.shape[1:])))
    attend = BlockSparseAttention(ctx_kv, batch.mask, drafter.config.head_dim**-0.5)
    x = drafter.embed(batch.block_tokens.reshape(-1), embed_weight)
    hidden = drafter(x, batch.block_positions.reshape(-1), attend, batch.block_tokens.shape[2])
    return hidden.view(*batch.block_tokens.shape, -1)


@dataclass
class LossOut:
    loss: torch.Tensor
    correct: torch.Tensor  # [B-1] top-1 hits per block position
    counts: torch.Tensor  # [B-1] labelled positions per block position


def block_loss(
    drafter: DFlashDrafter,
    batch: BlockBatch,
    embed_weight: torch.Tensor,
    head_weight: torch.Tensor,
    weights: torch.Tensor,
    *,
    label_map: Optional[torch.Tensor] = None,
) -> LossOut:
    """Decay-weighted cross-entropy at block positions 1..B-1.

    ``head_weight`` is the target's lm_head, or some of its rows: then ``label_map``
    ([V] token id -> row of ``head_weight``) maps the labels, and every label must
    have a row (see :func:`train.loss_vocabulary`).
    """
    hidden = block_hidden(drafter, batch, embed_weight)[:, :, 1:]  # [S, m, B-1, H]
    labelled = batch.labels != IGNORE
    h, labels = hidden[labelled], batch.labels[labelled]
    w = weights.to(h.device).expand_as(batch.labels)[labelled]
    targets = labels if label_map is None else label_map[labels]
    logits = drafter.logits(h, head_weight)
    ce = F.cross_entropy(logits, targets, reduction="none")
    loss = (ce * w).sum() / w.sum().clamp_min(1e-6)
    if drafter.candidate_selector is not None:
        previous = torch.cat([batch.block_tokens[:, :, :1], batch.labels[:, :, :-1]], dim=2)[labelled]
        row_ids = None if label_map is None else torch.nonzero(label_map >= 0).squeeze(-1)
        loss = loss + selector_loss(drafter.candidate_selector, h, logits, targets, previous, w, row_ids)
    hits = torch.zeros(batch.labels.shape, device=h.device)
    hits[labelled] = (logits.argmax(-1) == targets).float()
    return LossOut(loss, hits.sum((0, 1)).detach().cpu(), labelled.sum((0, 1)).float().cpu())


def selector_loss(
    selector,
    hidden: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    previous: torch.Tensor,
    weights: torch.Tensor,
    row_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Teacher-forced selector cross-entropy over each slot's K candidates.

    hidden [n, H], logits [n, R] and targets [n] (rows of the head), previous [n]
    token ids, weights [n]; ``row_ids`` [R]: token id of each head row (None: the
    whole vocabulary, row = id). Slots whose label is not a candidate add nothing.
    """
    unary, candidates = logits.topk(selector.top_k, dim=-1)
    token_ids = candidates if row_ids is None else row_ids[candidates]
    gate = selector.hidden_projection(hidden) * selector.predecessor_codebook[previous]
    scores = unary.float() + torch.einsum("nr,nkr->nk", gate, selector.successor_codebook[token_ids]).float()
    hit = candidates == targets[:, None]
    present = hit.any(dim=-1)
    if not bool(present.any()):
        return scores.sum() * 0.0
    ce = F.cross_entropy(scores[present], hit[present].int().argmax(dim=-1), reduction="none")
    return (ce * weights[present]).sum() / weights[present].sum().clamp_min(1e-6)


def cosine_lr(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Multiplier for linear warmup then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
