"""Run a drafter's block forward the way the server does, for parity tests: context
injected into a slot-addressed cache in two chunks, slots scattered, requests of
different lengths batched and padded."""

from __future__ import annotations

import torch

from sglang_dflash.model.draft_attention import DraftAttnPlan, TorchDraftAttention
from sglang_dflash.model.draft_kv import DraftKVCache


def run_block(drafter, requests, block: int) -> torch.Tensor:
    """requests: list of (features [ctx, K*H], block embeddings [B, H]) -> final-normed
    hidden [bs, B, H]."""
    cfg = drafter.config
    bs = len(requests)
    ctx_lens = [f.shape[0] for f, _ in requests]
    width = max(ctx_lens) + block
    cache = DraftKVCache(num_layers=cfg.num_layers, num_slots=bs * width + 1, num_kv_heads=cfg.num_kv_heads,
                         head_dim=cfg.head_dim, dtype=torch.float32, device="cpu")
    table = torch.zeros(bs + 1, width + 4, dtype=torch.int64)
    # Scatter the slots so rows are neither contiguous nor aligned with positions.
    table[1:, :width] = (torch.randperm(bs * width) + 1).view(bs, width)
    for i, (feats, _) in enumerate(requests):
        n = feats.shape[0]
        half = n // 2  # inject in two chunks, as prefill then a verify step would
        drafter.inject(cache, feats[:half], torch.arange(half), table[i + 1, :half])
        drafter.inject(cache, feats[half:], torch.arange(half, n), table[i + 1, half:n])
    plan = DraftAttnPlan.from_req_to_token(req_to_token=table, req_pool_indices=torch.arange(1, bs + 1),
                                           prefix_lens=torch.tensor(ctx_lens), block_size=block, width=width)
    attention = TorchDraftAttention(cache, cfg)
    attention.bind(plan)
    x = torch.stack([x for _, x in requests]).reshape(bs * block, cfg.hidden_size)
    return drafter(x, plan.q_positions.reshape(-1), attention, block).view(bs, block, cfg.hidden_size)
