"""The GPU serving path's start-up order, forwards and numerics, checked on CPU.

Five defects a first GPU start would have met (each fixed; each test below fails when
its defect is put back). Where a check can only be structural on CPU, the test says so:
the worker runs against a fake SGLang target (``tests/support/fake_host.py``) that
follows SGLang 0.5.23's lifecycle, and ``cuda=True`` makes the host take its CUDA
decisions while tensors stay on CPU.
"""

from __future__ import annotations

import torch

from sglang_dflash.host.target import DECODE, ONE_NODE_VERIFY, GraphSettings, draft_graph_plan
from tests.support.fake_host import GraphRecorder, make_fake_host


# ------------------------------------------------------------------ 1. start-up order
def test_drafter_graph_plan_comes_from_settings_not_runner_state():
    """Graphs are decided from SGLang's resolved settings (which exist when the drafter
    is set up), with buckets up to the decode graphs' max batch size."""
    on = GraphSettings(decode_graphs=True, max_bs=16, max_running_requests=48)
    plan = draft_graph_plan(True, on, collectives=False)
    assert plan.enabled and plan.batch_sizes == (1, 2, 4, 8, 16)
    capped = draft_graph_plan(True, GraphSettings(decode_graphs=True, max_bs=None, max_running_requests=24), collectives=False)
    assert capped.batch_sizes == (1, 2, 4, 8, 16, 24)
    off = draft_graph_plan(True, GraphSettings(decode_graphs=False, max_bs=16, max_running_requests=48), collectives=False)
    assert not off.enabled and off.reason == "CUDA graphs disabled"
    assert draft_graph_plan(False, None, collectives=False).reason == "not on CUDA"


def test_start_up_in_sglangs_order_on_the_cuda_path(monkeypatch, tiny_drafter):
    """SGLang calls the draft worker's init_attention_backends before any runner has
    captured graphs (``decode_cuda_graph_runner`` does not exist yet; the fake raises on
    it); the drafter's graphs must still be planned, and captured in init_cuda_graphs.
    Structural on CPU: capture is recorded, not run."""
    host = make_fake_host(monkeypatch, tiny_drafter, cuda=True, dtype=torch.bfloat16)
    host.start(target_graphs=True)
    [graphs] = GraphRecorder.instances
    assert graphs.batch_sizes == [1, 2, 4, 8]
    state = host.worker.describe()
    assert state["drafter_graphs"]["reason"] is None and state["context_injection"] == "fused-torch"
    assert state["greedy_acceptance"] == "torch"  # CPU tensors: the Triton kernels' torch twins


def test_cuda_tensors_take_the_triton_injector_and_greedy_rule(monkeypatch, tiny_drafter):
    """Where the injector runs its Triton kernel (CUDA tensors), greedy chain acceptance
    runs the one-launch Triton kernel too (``gpu.fused_greedy_acceptance``)."""
    from sglang_dflash import gpu
    from sglang_dflash.gpu.triton_kernels import FusedContextInjector

    host = make_fake_host(monkeypatch, tiny_drafter, cuda=True, dtype=torch.bfloat16)
    monkeypatch.setattr(gpu, "FusedContextInjector", lambda drafter: FusedContextInjector(drafter, kernel=True))
    host.start(target_graphs=True)
    state = host.worker.describe()
    assert state["context_injection"] == "fused-triton" and state["greedy_acceptance"] == "triton"
    assert host.worker.speculator.greedy is gpu.fused_greedy_acceptance


# ------------------------------------------------------------------ 4. weights before capture
def test_captured_weights_never_move(monkeypatch, tiny_drafter):
    """Every drafter parameter a captured draft step reads keeps its address through the
    first decode steps (injection included): the fused injector, which re-lays the
    k/v projections, is built before capture and never again."""
    host = make_fake_host(monkeypatch, tiny_drafter, cuda=True, dtype=torch.bfloat16)
    host.start(target_graphs=True)
    [graphs] = GraphRecorder.instances
    for _ in range(2):
        host.worker.forward_batch_generation(host.decode_batch([20, 33]))
    now = {n: p.data_ptr() for n, p in host.worker.speculator.drafter.named_parameters()}
    moved = [n for n, ptr in graphs.captured_ptrs.items() if now[n] != ptr]
    assert not moved, f"parameters re-pointed after capture: {moved}"


# ------------------------------------------------------------------ 3. verify host lengths
def _verify_forwards(host):
    return [f for f in host.target_worker.forwards if f.forward_mode.is_target_verify()]


def test_verify_batches_carry_widened_host_lengths(monkeypatch, tiny_drafter):
    """FlashInfer plans a DFLASH verify's KV from the host lengths; they must be prefix +
    verify width for a full block and for a shorter adaptive length."""
    for verify_len in ("8", "4", "2"):
        host = make_fake_host(monkeypatch, tiny_drafter, env={"SGLANG_DFLASH_VERIFY_LEN": verify_len})
        host.start(target_graphs=False)
        prefix = [17, 40, 5]
        host.worker.forward_batch_generation(host.decode_batch(prefix))
        [fb] = _verify_forwards(host)
        n = int(verify_len)
        assert fb.spec_info.draft_token_num == n
        assert fb.seq_lens.tolist() == prefix  # the device lengths stay the committed prefix
        assert fb.seq_lens_cpu.tolist() == [p + n for p in prefix], verify_len
        assert fb.seq_lens_sum == sum(prefix) + 3 * n


def test_tree_verify_is_widened_and_eager_only(monkeypatch, tiny_drafter):
    """A top-k tree verifies all its nodes (host lengths widened by the node budget) and
    carries a custom mask, which SGLang 0.5.23's FlashInfer verify graphs cannot take:
    it is marked to run eagerly, and the graph hook honours the mark."""
    from sglang_dflash.host.entry import verify_needs_eager

    env = {"SGLANG_DFLASH_TREE_TOPK": "2", "FAKE_VERIFY_WIDTH": "12"}
    host = make_fake_host(monkeypatch, tiny_drafter, env=env)
    host.start(target_graphs=True)
    prefix = [9, 30]
    host.worker.forward_batch_generation(host.decode_batch(prefix))
    [fb] = _verify_forwards(host)
    assert fb.spec_info.draft_token_num == 12 and fb.spec_info.custom_mask is not None
    assert fb.seq_lens_cpu.tolist() == [p + 12 for p in prefix]
    assert verify_needs_eager(fb)
    chain = make_fake_host(monkeypatch, tiny_drafter)
    chain.start(target_graphs=True)
    chain.worker.forward_batch_generation(chain.decode_batch(prefix))
    assert not verify_needs_eager(_verify_forwards(chain)[0])


# ------------------------------------------------------------------ 2. plain decode under graphs
def test_plain_decode_never_replays_a_verify_shaped_graph(monkeypatch, tiny_drafter):
    """With the target's graphs captured (for TARGET_VERIFY at the full width), plain
    decode is a one-node verify, which SGLang's width check runs eagerly; without
    target graphs it is SGLang's own DECODE step. The path is reported."""
    env = {"SGLANG_DFLASH_VERIFY_LEN": "1"}
    with_graphs = make_fake_host(monkeypatch, tiny_drafter, env=env)
    with_graphs.start(target_graphs=True)
    with_graphs.worker.forward_batch_generation(with_graphs.decode_batch([12, 7]))
    [fb] = with_graphs.target_worker.forwards
    assert fb.forward_mode.is_target_verify() and fb.spec_info.num_tokens_per_req == 1
    assert fb.spec_info.num_tokens_per_req != with_graphs.worker.speculator.verify_width  # graph width differs: eager
    assert fb.seq_lens_cpu.tolist() == [13, 8]
    assert with_graphs.worker.describe()["plain_decode"] == ONE_NODE_VERIFY

    eager = make_fake_host(monkeypatch, tiny_drafter, env=env)
    eager.start(target_graphs=False)
    eager.worker.forward_batch_generation(eager.decode_batch([12, 7]))
    [fb] = eager.target_worker.forwards
    assert fb.forward_mode.is_decode() and fb.spec_info is None
    assert eager.worker.describe()["plain_decode"] == DECODE


# ------------------------------------------------------------------ 5. RoPE precision
def test_drafter_rope_stays_float32_in_bf16(smollm2_drafter):
    """Loading a drafter in bf16 keeps RoPE frequencies float32: the angle at position
    1,000 matches a float64 computation to 1e-3 (a bf16 cast is off by ~0.9)."""
    from sglang_dflash.model.checkpoint import load_drafter

    drafter = load_drafter(smollm2_drafter, dtype=torch.bfloat16)
    assert drafter.fc.weight.dtype == torch.bfloat16
    assert drafter.rotary.inv_freq.dtype == torch.float32
    drafter.to(torch.float16)  # any later cast keeps them too
    assert drafter.rotary.inv_freq.dtype == torch.float32
    head_dim = drafter.config.head_dim
    base = float(drafter.config.raw.get("rope_theta") or (drafter.config.raw.get("rope_parameters") or {})["rope_theta"])
    exact = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    positions = torch.tensor([1000, 4000])
    cos, sin = drafter.rotary(positions, torch.float32)
    angles = positions.double()[:, None] * exact[None, :]
    want = torch.cat([angles, angles], dim=-1)
    assert (cos.double() - want.cos()).abs().max() < 1e-3
    assert (sin.double() - want.sin()).abs().max() < 1e-3


# ------------------------------------------------------------------ graph use is reported
def test_draft_steps_report_graph_replays_and_eager_fallbacks(monkeypatch, tiny_drafter):
    """describe() counts the draft steps that replayed a drafter graph and those that ran
    eagerly (no bucket for the batch, or a context too long for the graph buffers), so
    an eager fallback cannot pass for a graph run. Structural on CPU: the stand-in
    'replays' by running the eager proposer, and pretends batches above 2 overflow."""
    from sglang_dflash import gpu

    class Replaying(GraphRecorder):
        def bucket_for(self, batch_size: int):
            return next((b for b in self.batch_sizes if b >= batch_size), None)

        def propose(self, bonus, plan, *, sampled=None, kv_lens_cpu=None):
            self.last_replayed = bonus.shape[0] <= 2
            return self.proposer.propose(bonus, plan, sampled=sampled)

    host = make_fake_host(monkeypatch, tiny_drafter, cuda=True, dtype=torch.bfloat16)
    monkeypatch.setattr(gpu, "GraphedProposer", Replaying)
    host.start(target_graphs=True)
    assert host.worker.describe()["stats"]["drafter_graph_steps"] == {"graph": 0, "eager": 0}
    host.worker.forward_batch_generation(host.decode_batch([20, 33]))  # bucket 2: replayed
    host.worker.forward_batch_generation(host.decode_batch([20, 33, 9]))  # bucket 4, overflows: eager
    host.worker.forward_batch_generation(host.decode_batch(list(range(10, 19))))  # 9 rows, no bucket: eager
    assert host.worker.describe()["stats"]["drafter_graph_steps"] == {"graph": 1, "eager": 2}
