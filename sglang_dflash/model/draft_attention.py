"""Block attention for the drafter: the portable (pure torch SDPA) implementation.

One draft forward attends, for every request, over its committed context (rows of the
:class:`DraftKVCache` written by KV injection) followed by the block itself. Keys are
listed in position order, so key ``c`` of a request sits at absolute position ``c`` and
every mask is a comparison of positions:

* full-attention layers: every block query sees every context key and the whole block
  (bidirectional) -- the reference's ``is_causal=False``;
* sliding-window layers: causal within the block and ``q_pos - k_pos < window``.

The GPU implementation (``gpu/flashinfer_attention.py``) consumes the same
:class:`DraftAttnPlan` and must match this one numerically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.nn.functional import scaled_dot_product_attention

from .config import DFlashConfig
from .draft_kv import DraftKVCache


@dataclass
class DraftAttnPlan:
    """Where one block forward's keys live.

    kv_slots:    [bs, max_kv] cache rows of context tokens then block tokens (position order);
                 entries at or past ``kv_lens[i]`` are padding and never read unmasked.
    kv_lens:     [bs] context length + block length.
    q_positions: [bs, B] absolute positions of the block tokens.
    block_slots: [bs * B] cache rows the block's own K/V are written to.
    """

    kv_slots: torch.Tensor
    kv_lens: torch.Tensor
    q_positions: torch.Tensor
    block_slots: torch.Tensor
    _masks: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.q_positions.shape[0]

    @property
    def block_size(self) -> int:
        return self.q_positions.shape[1]

    @classmethod
    def from_slot_rows(cls, *, slot_rows: torch.Tensor, prefix_lens: torch.Tensor, block_size: int, width: int) -> "DraftAttnPlan":
        """Plan from the requests' KV slot-table rows (row ``i`` lists request ``i``'s
        slots in position order, the block's slots already reserved after its committed
        prefix). ``width`` is a host-side bound on ``prefix + block_size``."""
        if slot_rows.shape[1] < width:
            raise ValueError(f"slot-table rows hold {slot_rows.shape[1]} slots, need {width}")
        kv_slots = slot_rows[:, :width].long()
        offsets = torch.arange(block_size, device=prefix_lens.device)
        q_positions = prefix_lens.long()[:, None] + offsets[None, :]
        block_slots = kv_slots.gather(1, q_positions).reshape(-1)
        return cls(
            kv_slots=kv_slots,
            kv_lens=prefix_lens.long() + block_size,
            q_positions=q_positions,
            block_slots=block_slots,
        )

    @classmethod
    def from_req_to_token(
        cls, *, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, prefix_lens: torch.Tensor, block_size: int, width: int
    ) -> "DraftAttnPlan":
        """Plan from a whole slot table and the batch's rows in it."""
        rows = req_to_token[req_pool_indices.long()]
        return cls.from_slot_rows(slot_rows=rows, prefix_lens=prefix_lens, block_size=block_size, width=width)

    def mask(self, *, causal: bool, window: Optional[int]) -> torch.Tensor:
        """[bs, 1, B, max_kv] boolean 'may attend' mask, cached per layer kind."""
        key = (causal, window)
        if key not in self._masks:
            cols = torch.arange(self.kv_slots.shape[1], device=self.kv_slots.device)
            q = self.q_positions[:, :, None]
            k = cols[None, None, :]
            allowed = k < self.kv_lens[:, None, None]
            if causal:
                allowed = allowed & (k <= q)
            if window is not None:
                allowed = allowed & (q - k < window)
                if not causal:
                    allowed = allowed & (k - q < window)
            self._masks[key] = allowed[:, None]
        return self._masks[key]


class TorchDraftAttention:
    """SDPA over gathered cache rows; works on any device, and is the reference."""

    name = "torch"

    def __init__(self, cache: DraftKVCache, config: DFlashConfig) -> None:
        self.cache = cache
        self.config = config
        self.scale = config.head_dim**-0.5
        self.plan: Optional[DraftAttnPlan] = None

    def bind(self, plan: DraftAttnPlan) -> None:
        self.plan = plan

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [bs*B, heads, hd]; k, v: [bs*B, kv_heads, hd] (the block's own) -> [bs*B, heads*hd]."""
        plan = self.plan
        bs, block = plan.batch_size, plan.block_size
        self.cache.write(layer, plan.block_slots, k, v)
        keys, values = self.cache.gather(layer, plan.kv_slots)  # [bs, max_kv, kvh, hd]
        mask = plan.mask(causal=self.config.layer_is_causal(layer), window=self.config.layer_window(layer))
        out = scaled_dot_product_attention(
            q.view(bs, block, *q.shape[1:]).transpose(1, 2),
            keys.transpose(1, 2).to(q.dtype),
            values.transpose(1, 2).to(q.dtype),
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=True,
        )
        return out.transpose(1, 2).reshape(bs * block, -1)
