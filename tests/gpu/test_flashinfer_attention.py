"""FlashInferDraftAttention against TorchDraftAttention on CUDA (eager and graph mode).

FlashInfer runs in bf16 only here; the reference is TorchDraftAttention over a float32
copy of the same bf16 cache and inputs, so the tolerance covers FlashInfer's bf16 output
rounding (and its own float32 accumulation order), nothing else.
"""

from __future__ import annotations

import pytest
import torch

from sglang_dflash.model.draft_attention import TorchDraftAttention
from tests.test_gpu_imports import MASK_CONFIGS, drafter_config, random_cache, random_plan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TOL = dict(rtol=2e-2, atol=2e-2)
# ids name the head_dim: the GPU lane runs the hd128 cases first (their FlashInfer
# kernels are the servers'), the hd64 ones (SmolLM2's) later.
SHAPES = {
    "small-hd64": dict(heads=4, kv_heads=2, head_dim=64, block_size=4),
    "qwen3-8b-hd128": dict(heads=32, kv_heads=8, head_dim=128, block_size=16),
}


@pytest.fixture(scope="module", autouse=True)
def flashinfer():
    return pytest.importorskip("flashinfer")


def _config(mask: str, shape: str):
    """The mask config at this shape; a non-causal window is widened to the block, the
    narrowest FlashInfer can express (narrower ones are refused, tested on CPU)."""
    kwargs = {**MASK_CONFIGS[mask], **SHAPES[shape]}
    if kwargs.get("is_causal") is False and kwargs.get("sliding_window"):
        kwargs["sliding_window"] = max(kwargs["sliding_window"], kwargs["block_size"])
    return drafter_config(**kwargs, hidden=256)


def _inputs(config, rows: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, config.num_heads, config.head_dim, generator=gen)
    k = torch.randn(rows, config.num_kv_heads, config.head_dim, generator=gen)
    v = torch.randn(rows, config.num_kv_heads, config.head_dim, generator=gen)
    return [t.to("cuda", torch.bfloat16) for t in (q, k, v)]


def _reference(cache, config, plan, layer, q, k, v):
    """TorchDraftAttention over a float32 copy of ``cache`` (k/v written into the copy)."""
    ref_cache = random_cache(config, cache.num_slots, dtype=torch.float32, device="cuda")
    ref_cache.k.copy_(cache.k)
    ref_cache.v.copy_(cache.v)
    ref = TorchDraftAttention(ref_cache, config)
    ref.bind(plan)
    return ref(layer, q.float(), k.float(), v.float())


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mask", list(MASK_CONFIGS))
def test_eager_matches_torch(mask, shape):
    from sglang_dflash.gpu import FlashInferDraftAttention

    config = _config(mask, shape)
    num_slots = 8192
    cache = random_cache(config, num_slots, dtype=torch.bfloat16, device="cuda")
    attention = FlashInferDraftAttention(cache, config)
    plan = random_plan([700, 0, 37, 1200], config.block_size, num_slots, device="cuda")
    attention.bind(plan)
    for layer in range(config.num_layers):
        q, k, v = _inputs(config, plan.batch_size * config.block_size, seed=layer)
        expected = _reference(cache, config, plan, layer, q, k, v)  # cache before this layer's write
        actual = attention(layer, q, k, v)
        assert actual.shape == expected.shape and actual.dtype == torch.bfloat16
        torch.testing.assert_close(actual.float(), expected, **TOL)
        # the block's own K/V landed in the cache
        torch.testing.assert_close(cache.k[layer][plan.block_slots], k)


@pytest.mark.parametrize("mask", ["full", "mixed-sliding"])
def test_graph_mode_replans_outside_the_graph(mask):
    """Capture with one plan, re-bind another (same batch size), replay: the replayed
    kernels must read the new plan."""
    from sglang_dflash.gpu import FlashInferDraftAttention

    config = _config(mask, "qwen3-8b-hd128")
    num_slots, bs = 8192, 4
    cache = random_cache(config, num_slots, dtype=torch.bfloat16, device="cuda")
    attention = FlashInferDraftAttention(cache, config, graph_batch_sizes=(2, bs))
    rows = bs * config.block_size
    q, k, v = (torch.empty_like(t) for t in _inputs(config, rows, seed=0))
    block_slots = torch.empty(rows, dtype=torch.long, device="cuda")

    def bind(plan):
        block_slots.copy_(plan.block_slots)
        plan.block_slots = block_slots
        attention.bind(plan, kv_lens_cpu=plan.kv_lens.cpu(), graph=True)

    bind(random_plan([5, 9, 1, 30], config.block_size, num_slots, device="cuda", seed=1))
    layer = config.num_layers - 1
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        attention(layer, q, k, v)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention(layer, q, k, v)

    plan = random_plan([1500, 3, 64, 900], config.block_size, num_slots, device="cuda", seed=2)
    bind(plan)
    for t, new in zip((q, k, v), _inputs(config, rows, seed=3)):
        t.copy_(new)
    expected = _reference(cache, config, plan, layer, q, k, v)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), expected, **TOL)
    assert not attention.fits_graph(3, 10) and not attention.fits_graph(bs, attention.max_kv_tokens + 1)
