"""Output-history penalties per verify node: frequency, presence, repetition, min length.

Plain decoding penalises output token ``k`` from the counts of tokens ``0..k-1``. A verify
node sees its request's committed output plus the drafted tokens on its own path (its
ancestors and itself, the root excluded: the root is the bonus, already output), so each
node is penalised exactly as plain decoding would be had that path been generated.

For one logit ``x`` of token ``v`` with count ``c`` and a node whose output position is
``L + depth`` (``L`` = output tokens so far, the bonus included), in SGLang 0.5.23's
order (additive penalizers, then the multiplicative one)::

    x -= frequency * c
    x -= presence * (c > 0)
    x  = -inf                     if v is a stop token and L + depth < min_new_tokens
    s  = repetition if c > 0 else 1;  x = x * s if x < 0 else x / s

Vectorised without a loop over nodes: every node is first penalised with the committed
counts alone, then the few logits whose token occurs on the node's path (at most
``depth`` per node) are recomputed from their raw values with the path's counts added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class PenaltyRows:
    """The penalised rows of a batch and their parameters, [R] each; a penalty no row
    uses is None, so the batch skips it without asking the device.

    stop_tokens: [R, V] bool, the tokens ``min_new_tokens`` holds back (with
    ``min_new_tokens``; None when no row has a minimum length).
    """

    index: torch.Tensor
    frequency: Optional[torch.Tensor] = None
    presence: Optional[torch.Tensor] = None
    repetition: Optional[torch.Tensor] = None
    min_new_tokens: Optional[torch.Tensor] = None
    stop_tokens: Optional[torch.Tensor] = None


def penalize(
    x: torch.Tensor, counts: torch.Tensor, rows: PenaltyRows, held_back: Optional[torch.Tensor]
) -> torch.Tensor:
    """The penalised logits ``x`` (any shape [R, ...]); ``counts`` broadcasts against
    ``x``; ``held_back`` (bool, broadcasting) marks logits min_new_tokens sets to -inf."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    seen = counts > 0
    if rows.frequency is not None:
        x = x - rows.frequency.view(shape) * counts.to(x.dtype)
    if rows.presence is not None:
        x = x - rows.presence.view(shape) * seen.to(x.dtype)
    if held_back is not None:
        x = x.masked_fill(held_back, float("-inf"))
    if rows.repetition is not None:
        one = torch.ones((), dtype=x.dtype, device=x.device)
        scale = torch.where(seen, rows.repetition.view(shape).to(x.dtype), one)
        x = torch.where(x < 0, x * scale, x / scale)
    return x


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    tokens: torch.Tensor,
    ancestors: torch.Tensor,
    depths: torch.Tensor,
    rows: PenaltyRows,
) -> torch.Tensor:
    """Penalised logits of the rows' verify nodes (no host sync).

    logits:    [R, N, V] raw logits after each node.
    counts:    [R, V] committed output-token counts (the bonus included).
    tokens:    [R, N] node tokens (node 0 = the bonus).
    ancestors: [R, N, N] bool, node i's path: j is i or an ancestor of i.
    depths:    [R, N] node depths (the root is 0).
    """
    n = tokens.shape[1]
    tokens = tokens.long()
    path = ancestors.clone()
    path[:, :, 0] = False  # the root is the bonus, already counted
    active = None
    if rows.min_new_tokens is not None:
        output_len = counts.sum(dim=-1)
        active = (output_len[:, None] + depths) < rows.min_new_tokens[:, None]  # [R, N]
    # Raw logits of every node at every node's token, before anything changes them.
    columns = tokens[:, None, :].expand(-1, n, -1)  # [R, N(i), N(j)]
    at_tokens = logits.gather(2, columns)
    held = None if active is None else active[:, :, None] & rows.stop_tokens[:, None, :]
    out = penalize(logits, counts[:, None, :], rows, held)
    # How often node j's token occurs on node i's path, on top of its committed count.
    same = (tokens[:, :, None] == tokens[:, None, :]).float()  # [R, N(k), N(j)]
    extra = torch.einsum("rik,rkj->rij", path.float(), same).round().to(counts.dtype)
    path_counts = counts.gather(1, tokens)[:, None, :] + extra
    held_at = None
    if active is not None:
        held_at = active[:, :, None] & rows.stop_tokens.gather(1, tokens)[:, None, :]
    # Node i's logit of token t_j with i's own counts: correct whether or not t_j is on
    # i's path (extra is then 0), so every write of a repeated token writes the same value.
    out.scatter_(2, columns, penalize(at_tokens, path_counts, rows, held_at))
    return out
