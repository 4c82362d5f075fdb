"""Held-out acceptance of a drafter: a small greedy speculative loop, batch size 1.

The loop is the serving algorithm with the serving pieces: the HF target verifies,
our drafter proposes through :class:`BlockProposer` over a :class:`DraftKVCache` into
which the target features of committed tokens are injected (slot = position), and
:func:`greedy_chain_acceptance` accepts. Each step emits ``num_accepted + 1`` tokens
for one target forward, so ``tau`` (tokens per target forward, bonus included) is
the mean of those, as the reference benchmark reports it. The output is the target's
own greedy continuation, which the tests check.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.nn import functional as F

from ..spec.accept import greedy_chain_acceptance
from ..model.config import capture_points
from ..model.draft_attention import DraftAttnPlan, TorchDraftAttention
from ..model.draft_kv import DraftKVCache
from ..model.drafter import DFlashDrafter
from ..spec.proposer import BlockProposer


@dataclass
class AcceptStats:
    """accept_lengths: tokens emitted per verify step (1..B), over all prompts."""

    block_size: int
    accept_lengths: list[int] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)

    @property
    def tau(self) -> float:
        return sum(self.accept_lengths) / max(1, len(self.accept_lengths))

    def histogram(self) -> list[int]:
        """hist[n]: steps that accepted exactly n drafts (n = 0..B-1)."""
        hist = [0] * self.block_size
        for length in self.accept_lengths:
            hist[length - 1] += 1
        return hist

    def position_rates(self) -> list[float]:
        """rate[k-1]: fraction of steps whose draft k (1..B-1) was accepted."""
        steps = max(1, len(self.accept_lengths))
        return [sum(n >= k + 1 for n in self.accept_lengths) / steps for k in range(1, self.block_size)]

    def summary(self) -> str:
        rates = " ".join(f"{r:.2f}" for r in self.position_rates())
        return f"tau {self.tau:.3f} over {len(self.accept_lengths)} steps; accept rate by position: {rates}"


def _features(hidden_states, points: list[int]) -> torch.Tensor:
    return torch.cat([hidden_states[p][0] for p in points], dim=-1)


def _crop(cache, length: int) -> None:
    extra = cache.get_seq_length() - length
    cache.crop(-extra)  # also needed at 0: it trims sliding layers back to their window


def _recurrent(cache) -> bool:
    """A cache holding recurrent (linear-attention) states: those cannot be cropped,
    so a rejected draft is undone by replaying the committed tokens on a snapshot."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    return any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in getattr(cache, "layers", ()))


@torch.inference_mode()
def speculative_generate(
    target,
    drafter: DFlashDrafter,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    block_size: int | None = None,
) -> tuple[list[int], list[int]]:
    """Greedy speculative decoding of one prompt -> (new tokens, accept length per step)."""
    from transformers import DynamicCache

    config = drafter.config
    block = block_size or config.block_size
    device = target.device
    points = capture_points(config.target_layer_ids)
    embed_w = target.get_input_embeddings().weight
    head_w = target.get_output_embeddings().weight
    n = len(prompt_ids)
    kv = DraftKVCache(num_layers=config.num_layers, num_slots=n + max_new_tokens + block, num_kv_heads=config.num_kv_heads,
                      head_dim=config.head_dim, dtype=drafter.fc.weight.dtype, device=device)
    proposer = BlockProposer(drafter, TorchDraftAttention(kv, config), embed=lambda ids: F.embedding(ids, embed_w),
                             lm_head=lambda h: drafter.logits(h, head_w), mask_token_id=config.mask_token_id,
                             block_size=block)
    cache = DynamicCache(config=target.config)
    cache.activate_past_recording()  # sliding layers keep the verify block until the crop
    ids = torch.tensor([list(prompt_ids)], device=device)
    out = target(input_ids=ids, past_key_values=cache, use_cache=True, output_hidden_states=True, logits_to_keep=1)
    positions = torch.arange(n, device=device)
    drafter.inject(kv, _features(out.hidden_states, points), positions, positions)
    bonus = out.logits[0, -1].argmax()[None]
    emitted, lengths, start = [int(bonus)], [], n
    stop = set(int(i) for i in stop_ids)
    while len(emitted) < max_new_tokens and emitted[-1] not in stop:
        slots = torch.arange(start + block, device=device)
        plan = DraftAttnPlan(kv_slots=slots[None], kv_lens=torch.tensor([start + block], device=device),
                             q_positions=slots[None, start:], block_slots=slots[start:])
        tokens = proposer.propose(bonus, plan).tokens
        snapshot = copy.deepcopy(cache) if _recurrent(cache) else None
        out = target(input_ids=tokens, position_ids=slots[None, start:], past_key_values=cache, use_cache=True,
                     output_hidden_states=True)
        accept = greedy_chain_acceptance(tokens, out.logits.argmax(-1))
        commit = int(accept.commit_lens[0])
        new = accept.out_tokens[0, :commit].tolist()
        keep = _kept(new, stop, max_new_tokens - len(emitted))
        emitted += new[:keep]
        lengths.append(keep)
        if snapshot is None:
            _crop(cache, start + commit)
        elif commit < tokens.shape[1]:
            cache = snapshot
            target(input_ids=tokens[:, :commit], position_ids=slots[None, start : start + commit], past_key_values=cache,
                   use_cache=True)
        committed = slots[start : start + commit]
        drafter.inject(kv, _features(out.hidden_states, points)[:commit], committed, committed)
        bonus, start = accept.bonus, start + commit
    return emitted, lengths


def _kept(new: list[int], stop: set[int], room: int) -> int:
    """How many of this step's tokens are kept: up to the first stop token and the budget."""
    for i, token in enumerate(new):
        if token in stop:
            return min(i + 1, room)
    return min(len(new), room)


def evaluate(
    target,
    drafter: DFlashDrafter,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    block_size: int | None = None,
) -> AcceptStats:
    """Acceptance over ``prompts`` (token ids, chat template already applied)."""
    was_training = drafter.training
    drafter.eval()
    stats = AcceptStats(block_size=block_size or drafter.config.block_size)
    for prompt in prompts:
        tokens, lengths = speculative_generate(
            target, drafter, prompt, max_new_tokens=max_new_tokens, stop_ids=stop_ids, block_size=block_size
        )
        stats.outputs.append(tokens)
        stats.accept_lengths += lengths
    drafter.train(was_training)
    return stats
