"""``sglang_dflash.gpu`` on a machine without CUDA or flashinfer: it imports, says what
is missing, refuses with clear errors, and its host-side logic is right.

The host-side checks are CPU-runnable on purpose: the CSR flattening that
``FlashInferDraftAttention.bind`` feeds FlashInfer, and the mapping of each layer's
mask onto FlashInfer's ``causal`` / ``window_left``, are checked by emulating
FlashInfer's documented mask rule in torch and comparing with ``TorchDraftAttention``.
The helpers here (random drafter, random plan) are shared by ``tests/gpu``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import pytest
import torch

from sglang_dflash.model.config import DFlashConfig
from sglang_dflash.model.draft_attention import DraftAttnPlan, TorchDraftAttention
from sglang_dflash.model.draft_kv import DraftKVCache
from sglang_dflash.model.drafter import DFlashDrafter
from sglang_dflash.spec.proposer import BlockProposer

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- shared helpers


def drafter_config(
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    block_size: int = 4,
    vocab: int = 96,
    layer_types: Optional[Sequence[str]] = None,
    sliding_window: Optional[int] = None,
    is_causal: Optional[bool] = None,
) -> DFlashConfig:
    raw = {
        "architectures": ["DFlashDraftModel"],
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 8192,
        "vocab_size": vocab,
        "layer_types": list(layer_types or ["full_attention"] * layers),
        "use_sliding_window": sliding_window is not None,
        "sliding_window": sliding_window,
        "dflash_config": {"target_layer_ids": [0, 2], "block_size": block_size, "mask_token_id": vocab - 1},
    }
    if is_causal is not None:
        raw["is_causal"] = is_causal
    return DFlashConfig.from_dict(raw)


def random_drafter(config: DFlashConfig, *, dtype=torch.float32, device="cpu", seed: int = 0) -> DFlashDrafter:
    """Random weights (norm scales too), std large enough for decisive argmaxes."""
    torch.manual_seed(seed)
    with torch.device(device):
        drafter = DFlashDrafter(config)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return drafter.to(dtype).eval()


def random_cache(config: DFlashConfig, num_slots: int, *, dtype=torch.float32, device="cpu", seed: int = 1) -> DraftKVCache:
    cache = DraftKVCache(
        num_layers=config.num_layers, num_slots=num_slots, num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim, dtype=dtype, device=device,
    )
    gen = torch.Generator().manual_seed(seed)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    return cache


def random_plan(
    prefixes: Sequence[int], block: int, num_slots: int, *, device="cpu", seed: int = 2, reserved: int = 1
) -> DraftAttnPlan:
    """Distinct random slots per request (never the ``reserved`` low slots, e.g. SGLang's
    padding slot 0), laid out like SGLang's ``req_to_token`` rows."""
    gen = torch.Generator().manual_seed(seed)
    width = max(prefixes) + block + 3  # extra padding columns that must never be read
    perm = torch.randperm(num_slots - reserved, generator=gen) + reserved
    need = len(prefixes) * width
    if need > perm.numel():
        raise ValueError(f"need {need} slots, have {perm.numel()}")
    table = perm[:need].view(len(prefixes), width)
    prefix = torch.tensor(prefixes)
    return DraftAttnPlan.from_req_to_token(
        req_to_token=table.to(device), req_pool_indices=torch.arange(len(prefixes), device=device),
        prefix_lens=prefix.to(device), block_size=block, width=width,
    )


# --------------------------------------------------------------------------- imports


def test_gpu_package_imports_nothing_heavy():
    """Importing every gpu module pulls in neither triton nor flashinfer nor sglang."""
    code = (
        "import sys, json, sglang_dflash.gpu as g, sglang_dflash.gpu.flashinfer_attention, "
        "sglang_dflash.gpu.cuda_graph\n"
        "print(json.dumps([m for m in ('triton', 'flashinfer', 'sglang') if m in sys.modules]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_available_reports_this_machine():
    import sglang_dflash.gpu as gpu

    report = gpu.available()
    assert set(report) == {"cuda", "triton", "flashinfer", "kernels", "flashinfer_attention"}
    assert report["cuda"] == torch.cuda.is_available()
    assert report["kernels"] == (report["cuda"] and report["triton"])
    assert report["flashinfer_attention"] == (report["cuda"] and report["flashinfer"])


def test_lazy_names_resolve_and_unknown_names_fail():
    import sglang_dflash.gpu as gpu

    assert gpu.FlashInferDraftAttention.name == "flashinfer"
    assert gpu.GraphedProposer.__name__ == "GraphedProposer"
    with pytest.raises(AttributeError):
        gpu.no_such_thing  # noqa: B018


# --------------------------------------------------------------------------- clear errors


def test_flashinfer_attention_refuses_a_cpu_cache():
    from sglang_dflash.gpu import FlashInferDraftAttention, FlashInferUnavailable

    config = drafter_config()
    with pytest.raises(FlashInferUnavailable, match="CUDA device.*TorchDraftAttention"):
        FlashInferDraftAttention(random_cache(config, 16), config)


def test_missing_flashinfer_is_a_clear_error(monkeypatch):
    from sglang_dflash.gpu import flashinfer_attention as fa

    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import flashinfer -> ImportError
    with pytest.raises(fa.FlashInferUnavailable, match=r"sglang-dflash\[gpu\]"):
        fa._import_flashinfer()


def test_graphed_proposer_needs_graph_planned_attention():
    from sglang_dflash.gpu import GraphedProposer

    config = drafter_config()
    proposer = _proposer(config, TorchDraftAttention(random_cache(config, 64), config))
    with pytest.raises(ValueError, match="graph_batch_sizes"):
        GraphedProposer(proposer, batch_sizes=(1, 2))


def test_graph_capture_refuses_cpu():
    from sglang_dflash.gpu import GraphedProposer

    config = drafter_config()
    proposer = _proposer(config, _GraphShapedTorchAttention(random_cache(config, 64), config, (1, 2)))
    with pytest.raises(RuntimeError, match="CUDA device"):
        GraphedProposer(proposer, batch_sizes=(1, 2)).capture()


def test_triton_launcher_refuses_cpu_tensors():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter on: CPU tensors are legal")
    from sglang_dflash.gpu import triton_kernels as tk

    with pytest.raises(RuntimeError, match="CUDA tensors"):
        tk.greedy_commit(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), torch.ones(2, dtype=torch.long))


# --------------------------------------------------------------------------- CPU fallbacks


def test_fused_inject_without_cuda_is_the_reference_and_matches_drafter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter on: the kernel path is tested in test_triton_kernels")
    from sglang_dflash.gpu.triton_kernels import FusedContextInjector

    config = drafter_config(layers=3)
    drafter = random_drafter(config)
    injector = FusedContextInjector(drafter)
    assert injector.kernel is False
    features = torch.randn(5, config.num_features * config.hidden_size)
    positions, slots = torch.tensor([3, 9, 17, 200, 4000]), torch.tensor([7, 2, 11, 5, 1])
    expected, actual = random_cache(config, 12), random_cache(config, 12)
    with torch.no_grad():
        drafter.inject(expected, features, positions, slots)
        injector(actual, features, positions, slots)
    torch.testing.assert_close(actual.k, expected.k, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(actual.v, expected.v, rtol=1e-5, atol=1e-5)


class _ReplayOnCPU:
    """What a CUDA graph's replay does, on CPU: re-run the captured body (``_step``) on
    the static input buffers and write its results into the static outputs."""

    def __init__(self, graphed, bucket: int, logits: torch.Tensor, drafts: torch.Tensor) -> None:
        self.graphed, self.bucket, self.logits, self.drafts = graphed, bucket, logits, drafts
        self.replays = 0

    def replay(self) -> None:
        logits, drafts = self.graphed._step(self.bucket)
        self.logits.copy_(logits)
        self.drafts.copy_(drafts)
        self.replays += 1


def _emulate_capture(graphed, buckets) -> dict:
    from sglang_dflash.gpu.cuda_graph import _Captured

    replayers = {}
    for bucket in buckets:
        plan = graphed._fill_padding(0, bucket, kv_slots=None, kv_lens=None)  # as _capture_one binds it
        graphed.attention.bind(plan, kv_lens_cpu=torch.full((bucket,), graphed.block_size), graph=True)
        with torch.no_grad():
            logits, drafts = graphed._step(bucket)  # the static outputs' shapes, as capture leaves them
        replayers[bucket] = _ReplayOnCPU(graphed, bucket, torch.full_like(logits, float("nan")), torch.full_like(drafts, -1))
        graphed.graphs[bucket] = _Captured(graph=replayers[bucket], logits=replayers[bucket].logits,
                                           drafts=replayers[bucket].drafts)
    return replayers


def test_graphed_proposer_replay_matches_the_eager_proposer():
    """The replay path -- static inputs filled from the batch, padding rows up to the
    bucket, the bucket's outputs sliced back -- drafts what the eager proposer drafts;
    a batch above the largest bucket falls back to the eager proposer."""
    from sglang_dflash.gpu import GraphedProposer

    config = drafter_config()
    cache = random_cache(config, 64)
    proposer = _proposer(config, _GraphShapedTorchAttention(cache, config, (1, 2, 4)))
    graphed = GraphedProposer(proposer, batch_sizes=(1, 2, 4))
    replayers = _emulate_capture(graphed, (2, 4))
    for prefixes, bonus, bucket in (([5, 0, 9], [3, 17, 40], 4), ([12, 2], [8, 61], 2)):
        plan = random_plan(prefixes, config.block_size, 64, seed=len(prefixes))
        bonus = torch.tensor(bonus)
        with torch.no_grad():
            expected = proposer.propose(bonus, plan)
            replays = replayers[bucket].replays
            actual = graphed.propose(bonus, plan)
        assert replayers[bucket].replays == replays + 1 and graphed.bucket_for(len(prefixes)) == bucket
        assert torch.equal(actual.tokens, expected.tokens)
        torch.testing.assert_close(actual.logits, expected.logits)

    plan = random_plan([3, 1, 4, 1, 5], config.block_size, 64, seed=5)
    bonus = torch.tensor([1, 2, 3, 4, 5])
    with torch.no_grad():
        expected, actual = proposer.propose(bonus, plan), graphed.propose(bonus, plan)
    assert graphed.bucket_for(5) is None and sum(r.replays for r in replayers.values()) == 2
    assert torch.equal(actual.tokens, expected.tokens)
    torch.testing.assert_close(actual.logits, expected.logits)


# --------------------------------------------------------------------------- CSR and masks


def test_paged_csr_lists_each_requests_slots_in_order():
    from sglang_dflash.gpu.flashinfer_attention import paged_csr

    plan = random_plan([5, 0, 12, 1], 4, 128)
    csr = paged_csr(plan)
    assert csr.qo_indptr.tolist() == [0, 4, 8, 12, 16]
    assert csr.kv_indptr.tolist() == [0, 9, 13, 29, 34]
    assert csr.kv_indices.dtype == torch.int32 and csr.kv_indptr.dtype == torch.int32
    for i, n in enumerate(plan.kv_lens.tolist()):
        got = csr.kv_indices[csr.kv_indptr[i] : csr.kv_indptr[i + 1]]
        assert got.tolist() == plan.kv_slots[i, :n].tolist()
    same = paged_csr(plan, kv_lens_cpu=plan.kv_lens.clone())
    assert torch.equal(same.kv_indices, csr.kv_indices)


def test_paged_csr_rejects_lens_past_the_slot_table():
    from sglang_dflash.gpu.flashinfer_attention import paged_csr

    plan = random_plan([5], 4, 32)
    plan.kv_lens = plan.kv_lens + plan.kv_slots.shape[1]
    with pytest.raises(ValueError, match="exceed"):
        paged_csr(plan)


def emulate_flashinfer_prefill(q, k_pages, v_pages, csr, *, causal: bool, window_left: int, sm_scale: float):
    """FlashInfer's documented paged-prefill semantics (page size 1, NHD), in torch:
    query ``j`` of a request with ``qo_len`` queries and ``kv_len`` keys sits at
    ``kv_len - qo_len + j``; causal keeps keys at or before it; ``window_left >= 0``
    keeps keys at or after ``pos - window_left``."""
    heads, kv_heads = q.shape[1], k_pages.shape[2]
    outs = []
    for i in range(len(csr.qo_indptr) - 1):
        qs = q[csr.qo_indptr[i] : csr.qo_indptr[i + 1]].float()
        idx = csr.kv_indices[csr.kv_indptr[i] : csr.kv_indptr[i + 1]].long()
        keys = k_pages[idx, 0].float().repeat_interleave(heads // kv_heads, dim=1)
        values = v_pages[idx, 0].float().repeat_interleave(heads // kv_heads, dim=1)
        qo_len, kv_len = qs.shape[0], idx.numel()
        qpos = torch.arange(qo_len)[:, None] + kv_len - qo_len
        kpos = torch.arange(kv_len)[None, :]
        allowed = torch.ones(qo_len, kv_len, dtype=torch.bool)
        if causal:
            allowed &= kpos <= qpos
        if window_left >= 0:
            allowed &= kpos >= qpos - window_left
        scores = torch.einsum("qhd,khd->hqk", qs, keys) * sm_scale
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), values))
    return torch.cat(outs).to(q.dtype)


MASK_CONFIGS = {
    "full": dict(layers=2),
    "mixed-sliding": dict(layers=3, layer_types=["full_attention", "sliding_attention", "full_attention"], sliding_window=6),
    "all-causal": dict(layers=2, is_causal=True),
    "noncausal-window": dict(layers=2, layer_types=["sliding_attention"] * 2, sliding_window=5, is_causal=False),
}


@pytest.mark.parametrize("name", list(MASK_CONFIGS))
def test_flashinfer_mask_mapping_matches_torch_attention(name):
    from sglang_dflash.gpu.flashinfer_attention import layer_kinds, paged_csr

    config = drafter_config(**MASK_CONFIGS[name])
    kinds, kind_of_layer = layer_kinds(config)
    block, num_slots = config.block_size, 96
    plan = random_plan([7, 0, 13], block, num_slots)
    csr = paged_csr(plan)
    ref_cache, emu_cache = random_cache(config, num_slots), random_cache(config, num_slots)
    reference = TorchDraftAttention(ref_cache, config)
    reference.bind(plan)
    gen = torch.Generator().manual_seed(5)
    rows = plan.batch_size * block
    for layer in range(config.num_layers):
        q = torch.randn(rows, config.num_heads, config.head_dim, generator=gen)
        k = torch.randn(rows, config.num_kv_heads, config.head_dim, generator=gen)
        v = torch.randn(rows, config.num_kv_heads, config.head_dim, generator=gen)
        expected = reference(layer, q, k, v)
        emu_cache.write(layer, plan.block_slots, k, v)
        kind = kinds[kind_of_layer[layer]]
        actual = emulate_flashinfer_prefill(
            q, emu_cache.k[layer].unsqueeze(1), emu_cache.v[layer].unsqueeze(1), csr,
            causal=kind.causal, window_left=kind.window_left, sm_scale=config.head_dim**-0.5,
        ).reshape(rows, -1)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_layer_kinds_group_layers_and_refuse_narrow_noncausal_windows():
    from sglang_dflash.gpu.flashinfer_attention import LayerKind, layer_kinds

    config = drafter_config(**MASK_CONFIGS["mixed-sliding"])
    kinds, of_layer = layer_kinds(config)
    assert kinds == [LayerKind(causal=False, window_left=-1), LayerKind(causal=True, window_left=5)]
    assert of_layer == [0, 1, 0]
    narrow = drafter_config(layers=1, layer_types=["sliding_attention"], sliding_window=3, is_causal=False)
    with pytest.raises(ValueError, match="TorchDraftAttention"):
        layer_kinds(narrow)


# --------------------------------------------------------------------------- test doubles


class _GraphShapedTorchAttention(TorchDraftAttention):
    """Torch attention that claims graph buckets, so GraphedProposer can be built on CPU."""

    def __init__(self, cache, config, buckets):
        super().__init__(cache, config)
        self.graph = {b: [] for b in buckets}

    def fits_graph(self, batch_size: int, total_kv: int) -> bool:
        return batch_size in self.graph

    def bind(self, plan, *, kv_lens_cpu=None, graph: bool = False) -> None:
        super().bind(plan)


def _proposer(config: DFlashConfig, attention, *, seed: int = 0) -> BlockProposer:
    drafter = random_drafter(config, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    embed = torch.randn(config.vocab_size, config.hidden_size, generator=gen)
    lm_head = torch.randn(config.vocab_size, config.hidden_size, generator=gen) * 0.2
    return BlockProposer(
        drafter,
        attention,
        embed=lambda ids: torch.nn.functional.embedding(ids, embed),
        lm_head=lambda hidden: drafter.logits(hidden, lm_head),
        mask_token_id=config.mask_token_id,
        block_size=config.block_size,
    )
