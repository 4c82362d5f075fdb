"""Attention for a fixed-width verify block over a paged KV cache, in plain torch.

SGLang's CPU ``torch_native`` backend has no TARGET_VERIFY path; the glue routes those
batches here. Each request has ``N`` queries at positions ``P .. P+N-1`` after its
committed prefix of length ``P``; its keys are its slot-table row in position order.
Within the block, visibility is causal (a chain), all-to-all (an encoder-only drafter
layer), or given by SGLang's flattened tree mask (``[N, P+N]`` per request, True =
may attend), which is how top-k tree verification reaches the target.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn.functional import scaled_dot_product_attention


def verify_mask(
    prefix_lens: torch.Tensor,
    n: int,
    width: int,
    *,
    causal: bool,
    tree_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[bs, 1, N, width] boolean 'may attend' mask for keys in position order."""
    device = prefix_lens.device
    prefix = prefix_lens.long()[:, None, None]
    cols = torch.arange(width, device=device)[None, None, :]
    rows = torch.arange(n, device=device)[None, :, None]
    allowed = (cols < prefix + n).expand(prefix_lens.shape[0], n, width)
    if tree_mask is not None:
        allowed = allowed & ((cols < prefix) | _tree_block(tree_mask, prefix_lens, n, width))
    elif causal:
        allowed = allowed & (cols <= prefix + rows)
    return allowed[:, None]


def _tree_block(tree_mask: torch.Tensor, prefix_lens: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """Scatter each request's [N, P+N] flat mask into a padded [bs, N, width] grid."""
    bs = prefix_lens.shape[0]
    grid = torch.zeros(bs, n, width, dtype=torch.bool, device=prefix_lens.device)
    offset = 0
    for i, p in enumerate(prefix_lens.tolist()):
        size = n * (p + n)
        grid[i, :, : p + n] = tree_mask[offset : offset + size].view(n, p + n).bool()
        offset += size
    return grid


def verify_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    kv_slots: torch.Tensor,
    prefix_lens: torch.Tensor,
    causal: bool,
    scale: float,
    tree_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """q: [bs, N, heads, hd]; caches: [slots, kv_heads, hd]; kv_slots: [bs, >= P+N]
    -> [bs, N, heads, hd]."""
    bs, n = q.shape[:2]
    width = int(prefix_lens.max()) + n
    slots = kv_slots[:, :width].long()
    keys = k_cache[slots].to(q.dtype).transpose(1, 2)
    values = v_cache[slots].to(q.dtype).transpose(1, 2)
    mask = verify_mask(prefix_lens, n, width, causal=causal, tree_mask=tree_mask)
    out = scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)
