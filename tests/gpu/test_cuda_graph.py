"""GraphedProposer replay against the eager BlockProposer, both over FlashInfer attention.

Graph and eager runs use the same kernels, but FlashInfer's CUDA-graph plans may split
KV differently, so logits are compared with a bf16 tolerance and drafts wherever the
eager top-1 beats the runner-up by a clear margin.
"""

from __future__ import annotations

import pytest
import torch

from sglang_dflash.spec.proposer import BlockProposer
from sglang_dflash.spec.sampling import SampledRows
from sglang_dflash.spec.sampling import RowSampling
from tests.test_gpu_imports import MASK_CONFIGS, drafter_config, random_cache, random_drafter, random_plan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

BUCKETS = (1, 2, 4, 8)
NUM_SLOTS = 4096
MARGIN = 0.25


@pytest.fixture(scope="module", autouse=True)
def flashinfer():
    return pytest.importorskip("flashinfer")


def _build(mask: str, head_dim: int = 128):
    from sglang_dflash.gpu import FlashInferDraftAttention, GraphedProposer

    config = drafter_config(**MASK_CONFIGS[mask], hidden=256, heads=4, kv_heads=2, head_dim=head_dim, block_size=8, vocab=512)
    drafter = random_drafter(config, dtype=torch.bfloat16, device="cuda")
    cache = random_cache(config, NUM_SLOTS, dtype=torch.bfloat16, device="cuda")
    attention = FlashInferDraftAttention(cache, config, graph_batch_sizes=BUCKETS)
    gen = torch.Generator().manual_seed(11)
    embed = torch.randn(config.vocab_size, config.hidden_size, generator=gen).to("cuda", torch.bfloat16)
    lm_head = (0.3 * torch.randn(config.vocab_size, config.hidden_size, generator=gen)).to("cuda", torch.bfloat16)
    proposer = BlockProposer(
        drafter,
        attention,
        embed=lambda ids: torch.nn.functional.embedding(ids, embed),
        lm_head=lambda hidden: drafter.logits(hidden, lm_head),
        mask_token_id=config.mask_token_id,
        block_size=config.block_size,
    )
    graphed = GraphedProposer(proposer, batch_sizes=BUCKETS)
    with torch.inference_mode():
        graphed.capture()
    return config, cache, proposer, graphed


def _prefixes(bs: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (bs,), generator=gen).tolist()


def _assert_same_drafts(actual, expected):
    torch.testing.assert_close(actual.logits.float(), expected.logits.float(), rtol=3e-2, atol=3e-2)
    top2 = expected.logits.float().topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > MARGIN
    assert clear.float().mean() > 0.5, "random drafter too indecisive for this check"
    assert torch.equal(actual.tokens[:, 1:][clear], expected.tokens[:, 1:][clear])
    assert torch.equal(actual.tokens[:, 0], expected.tokens[:, 0])


@pytest.mark.parametrize("head_dim", [128, 64], ids=["hd128", "hd64"])
@pytest.mark.parametrize("mask", ["full", "mixed-sliding"])
def test_replay_matches_eager_across_buckets(mask, head_dim):
    config, cache, proposer, graphed = _build(mask, head_dim)
    assert set(graphed.graphs) == set(BUCKETS)
    for step, bs in enumerate([1, 3, 8, 5, 11]):  # 3, 5 pad; 11 is above the largest bucket
        plan = random_plan(_prefixes(bs, step), config.block_size, NUM_SLOTS, device="cuda", seed=step)
        bonus = torch.randint(0, config.vocab_size - 1, (bs,), device="cuda")
        with torch.inference_mode():
            before_k = cache.k.clone()
            expected = proposer.propose(bonus, plan)
            eager_k = cache.k.clone()
            cache.k.copy_(before_k)
            actual = graphed.propose(bonus, plan, kv_lens_cpu=plan.kv_lens.cpu())
        torch.cuda.synchronize()
        assert graphed.last_replayed == (bs <= max(BUCKETS))  # what describe() counts as graph vs eager
        assert actual.tokens.shape == (bs, config.block_size)
        _assert_same_drafts(actual, expected)
        # padding rows touch only the pad slot: every other row equals the eager run's
        keep = torch.ones(NUM_SLOTS, dtype=torch.bool, device="cuda")
        keep[graphed.pad_slot] = False
        torch.testing.assert_close(cache.k[:, keep], eager_k[:, keep], rtol=5e-2, atol=5e-2)


def test_sampled_rows_use_the_graphed_logits():
    config, _, proposer, graphed = _build("full")
    bs = 3
    plan = random_plan(_prefixes(bs, 9), config.block_size, NUM_SLOTS, device="cuda", seed=9)
    bonus = torch.randint(0, config.vocab_size - 1, (bs,), device="cuda")
    rows = torch.tensor([0, 2], device="cuda")
    sampling = RowSampling(
        temperature=torch.full((2,), 0.8, device="cuda"),
        top_k=torch.full((2,), 1 << 30, dtype=torch.long, device="cuda"),
        top_p=torch.ones(2, device="cuda"),
        min_p=torch.zeros(2, device="cuda"),
    )
    sampled = SampledRows(index=rows, params=sampling, uniforms=torch.rand(2, 2 * config.block_size - 1, device="cuda"))
    with torch.inference_mode():
        expected = proposer.propose(bonus, plan, sampled=sampled)
        actual = graphed.propose(bonus, plan, sampled=sampled)
    torch.testing.assert_close(actual.draft_probs, expected.draft_probs, rtol=5e-2, atol=1e-3)
    assert actual.tokens.shape == expected.tokens.shape
