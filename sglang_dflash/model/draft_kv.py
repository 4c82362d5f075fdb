"""The drafter's KV cache: projected target context, one row per target KV slot.

Rows are addressed by the same slot ids the target's KV pool uses (the values in
SGLang's ``req_to_token``), so the scheduler's allocator, radix cache and paging
decide every row's lifetime and the drafter never allocates. A committed token's row
holds ``k_norm(k_proj(ctx))`` (RoPE'd at its absolute position) and ``v_proj(ctx)``
for every drafter layer, where ``ctx = hidden_norm(fc(target features))``.

Layout ``[layers, slots, kv_heads, head_dim]``: one ``index_put`` writes every
layer's rows at once, and ``k[layer]`` is a contiguous page-size-1 paged cache that
FlashInfer can read directly.
"""

from __future__ import annotations

import torch


class DraftKVCache:
    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [N, kv_heads, head_dim] for the N slots."""
        self.k[layer].index_copy_(0, slots.long(), k.to(self.k.dtype))
        self.v[layer].index_copy_(0, slots.long(), v.to(self.v.dtype))

    def write_all_layers(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [layers, N, kv_heads, head_dim]."""
        self.k.index_copy_(1, slots.long(), k.to(self.k.dtype))
        self.v.index_copy_(1, slots.long(), v.to(self.v.dtype))

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots: any shape -> (k, v) with that shape + [kv_heads, head_dim]."""
        return self.k[layer][slots.long()], self.v[layer][slots.long()]
