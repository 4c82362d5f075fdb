"""TARGET_VERIFY on SGLang's CPU ``torch_native`` attention backend, which 0.5.23 lacks.

SGLang's CPU ``torch_native`` backend has no TARGET_VERIFY path; a hook on its
``forward_extend`` routes those batches here (for our worker and for upstream's, so
both run on the CPU lane). Each request has ``N`` queries after its committed prefix
of length ``P``; its keys are its slot-table row in position order. Within the block,
visibility is causal (a chain), all-to-all (an encoder-only drafter layer), or given by
SGLang's flattened tree mask (``[N, P+N]`` per request, True = may attend), which is
how top-k tree verification reaches the target.

Layers of the targets people deploy add three things, each done here as the target's
own extend/decode does it, or refused:

* **sliding windows** (``layer.sliding_window_size`` = HF window - 1 >= 0): a query at
  position ``q`` sees keys at positions ``>= q - window_left``. Positions, not columns:
  a tree's block keys sit at their node's depth.
* **attention sinks** (gpt-oss): a learned per-head logit joins every softmax
  denominator and contributes no value.
* **hybrid SWA pools** (``SWAKVPool``): a sliding layer's keys live in the SWA pool, so
  its slots are translated from full-pool ids first; a key in the window whose SWA
  slot is gone is an error, never a silently wrong key.

Attention logit soft-capping (``layer.logit_cap > 0``) is refused: computing plain
attention instead would verify against a different model.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn.functional import scaled_dot_product_attention

from .spec_inputs import BlockVerifyInput

# The SWA allocator maps full slots without a live SWA peer to the padding slot 0.
_NO_SWA_PEER = 0


class UnsupportedAttentionError(NotImplementedError):
    """A layer feature the torch_native verify path does not compute."""


def node_positions(prefix_lens: torch.Tensor, n: int, positions: Optional[torch.Tensor]) -> torch.Tensor:
    """[bs, N] the block nodes' positions: SGLang's verify positions, else a chain's."""
    if positions is not None:
        return positions.view(prefix_lens.shape[0], n).long()
    return prefix_lens.long()[:, None] + torch.arange(n, device=prefix_lens.device)


def key_positions(prefix_lens: torch.Tensor, node_pos: torch.Tensor, width: int) -> torch.Tensor:
    """[bs, width] the position of each key column: its index in the prefix, its
    node's position in the block (a tree node's depth, not its column)."""
    bs, n = node_pos.shape
    cols = torch.arange(width, device=prefix_lens.device).expand(bs, width)
    block_col = cols - prefix_lens.long()[:, None]
    in_block = (block_col >= 0) & (block_col < n)
    from_node = node_pos.gather(1, block_col.clamp(0, n - 1))
    return torch.where(in_block, from_node, cols)


def verify_mask(
    prefix_lens: torch.Tensor,
    n: int,
    width: int,
    *,
    causal: bool,
    tree_mask: Optional[torch.Tensor] = None,
    window_left: Optional[int] = None,
    positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[bs, 1, N, width] boolean 'may attend' mask for keys in position order.

    ``window_left``: a sliding layer's reach (keys at positions >= q - window_left);
    for encoder-only layers it bounds the left side only, as FlashInfer's does.
    ``positions``: the nodes' positions, flattened [bs * N] (default: a chain's)."""
    device = prefix_lens.device
    prefix = prefix_lens.long()[:, None, None]
    cols = torch.arange(width, device=device)[None, None, :]
    rows = torch.arange(n, device=device)[None, :, None]
    allowed = (cols < prefix + n).expand(prefix_lens.shape[0], n, width)
    if tree_mask is not None:
        allowed = allowed & ((cols < prefix) | _tree_block(tree_mask, prefix_lens, n, width))
    elif causal:
        allowed = allowed & (cols <= prefix + rows)
    if window_left is not None and window_left >= 0:
        q_pos = node_positions(prefix_lens, n, positions)
        k_pos = key_positions(prefix_lens, q_pos, width)
        allowed = allowed & (k_pos[:, None, :] >= q_pos[:, :, None] - window_left)
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


def attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    scale: float,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """q: [bs, heads, N, hd]; keys/values: [bs, kv_heads, W, hd]; mask broadcastable to
    [bs, heads, N, W] -> [bs, heads, N, hd]. With ``sinks`` [heads], each head's sink
    logit joins the softmax denominator (float32, then cast back)."""
    if sinks is None:
        return scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    group = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1).float()
    v = values.repeat_interleave(group, dim=1).float()
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs, v).to(q.dtype)


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
    window_left: Optional[int] = None,
    positions: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    translate=None,
) -> torch.Tensor:
    """q: [bs, N, heads, hd]; caches: [slots, kv_heads, hd]; kv_slots: [bs, >= P+N]
    full-pool ids -> [bs, N, heads, hd]. ``translate`` maps full-pool ids to the
    cache's own (a hybrid SWA pool's sliding layers); unmapped keys must be masked."""
    bs, n = q.shape[:2]
    width = int(prefix_lens.max()) + n
    slots = kv_slots[:, :width].long()
    mask = verify_mask(
        prefix_lens, n, width, causal=causal, tree_mask=tree_mask, window_left=window_left, positions=positions
    )
    if translate is not None:
        slots = translate(slots).long()
        dead = slots <= _NO_SWA_PEER
        if bool((mask & dead[:, None, None, :]).any()):
            raise RuntimeError("verify reads a key inside the sliding window whose SWA slot was freed")
        slots = slots.clamp_min(0)
    keys = k_cache[slots].to(q.dtype).transpose(1, 2)
    values = v_cache[slots].to(q.dtype).transpose(1, 2)
    out = attend(q.transpose(1, 2), keys, values, mask, scale=scale, sinks=sinks)
    return out.transpose(1, 2)


def check_verify_host_lens(fb) -> None:
    """Our verify batches must carry host lengths = prefix + verify width: that is what
    SGLang's FlashInfer backend plans KV chunks from on a GPU, where too-short lengths
    silently drop keys of the verify block. Checked on every CPU-lane verify, so the
    CPU tests catch a regression a GPU would only show as wrong tokens."""
    if fb.seq_lens_cpu is None:
        return
    expected = fb.seq_lens.cpu() + fb.spec_info.draft_token_num
    if not torch.equal(fb.seq_lens_cpu.to(expected.dtype), expected):
        raise RuntimeError(
            f"verify batch host lengths {fb.seq_lens_cpu.tolist()} != prefix + width {expected.tolist()}: "
            "FlashInfer would plan this verify without some of its keys"
        )


def window_left_of(layer) -> Optional[int]:
    """A sliding layer's reach (SGLang's ``sliding_window_size``), None for full attention."""
    size = getattr(layer, "sliding_window_size", None)
    return int(size) if size is not None and size > -1 else None


def check_layer_supported(layer, extra: dict) -> Optional[torch.Tensor]:
    """The layer's sinks (or None); refuse what this path does not compute."""
    cap = getattr(layer, "logit_cap", 0.0) or 0.0
    if cap > 0:
        raise UnsupportedAttentionError(
            f"torch_native verify does not implement attention logit soft-capping (layer {layer.layer_id} "
            f"logit_cap={cap}); serve this target on a GPU attention backend"
        )
    if getattr(layer, "is_cross_attention", False):
        raise UnsupportedAttentionError(f"torch_native verify has no cross-attention (layer {layer.layer_id})")
    sinks = extra.pop("sinks", None)
    unknown = sorted(k for k, v in extra.items() if v is not None)
    if unknown:
        raise UnsupportedAttentionError(
            f"torch_native verify got attention arguments it does not implement: {', '.join(unknown)} "
            f"(layer {layer.layer_id})"
        )
    return sinks


def check_target_layers(model) -> None:
    """At start-up: refuse a target with attention layers this path cannot verify
    (rather than failing at its first verify, or serving it wrong)."""
    for module in model.modules():
        if hasattr(module, "logit_cap") and hasattr(module, "layer_id") and hasattr(module, "attn_type"):
            check_layer_supported(module, {})


def swa_translation(pool, layer_id: int):
    """The full->SWA slot map for a sliding layer of a hybrid SWA pool, else None."""
    mapping = getattr(pool, "layers_mapping", None)
    if mapping is None or not mapping[layer_id][1]:
        return None
    return pool.translate_loc_from_full_to_swa


def torch_native_verify(backend, q, k, v, layer, fb, save_kv_cache: bool = True, **extra):
    """Fixed-width verify/draft block: each request's N queries see its committed prefix
    (``seq_lens``) and the block; causal within the block unless the layer is
    encoder-only (a drafter) or the spec input carries a tree mask; sliding windows,
    sinks and hybrid SWA pools as the module doc says."""
    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    sinks = check_layer_supported(layer, dict(extra))
    if isinstance(fb.spec_info, BlockVerifyInput):
        check_verify_host_lens(fb)
    pool = backend.token_to_kv_pool
    if save_kv_cache and k is not None and v is not None:
        pool.set_kv_buffer(layer, KVWriteLoc(fb.out_cache_loc, backend.swa_out_cache_loc), k, v)
    bs = fb.seq_lens.shape[0]
    n = q.shape[0] // bs
    out = verify_attention(
        q.view(bs, n, layer.tp_q_head_num, layer.qk_head_dim),
        pool.get_key_buffer(layer.layer_id),
        pool.get_value_buffer(layer.layer_id),
        kv_slots=backend.req_to_token_pool.req_to_token[fb.req_pool_indices.long()],
        prefix_lens=fb.seq_lens,
        causal=layer.attn_type != AttentionType.ENCODER_ONLY,
        tree_mask=getattr(fb.spec_info, "custom_mask", None),
        scale=layer.scaling,
        window_left=window_left_of(layer),
        positions=fb.positions if fb.positions is not None and fb.positions.numel() == bs * n else None,
        sinks=sinks,
        translate=swa_translation(pool, layer.layer_id),
    )
    return out.reshape(q.shape[0], layer.tp_q_head_num * layer.v_head_dim).to(q.dtype)
