"""The CPU-lane GDN ops (``standins/sgl_kernel/_cpu_linear_attention.py``) against
transformers' torch references for Qwen3-Next, and the properties speculative verify
relies on: a verify of N tokens computes what N decode steps compute, caches the state
after every step, and leaves the pool's recurrent state where it was; prefill in two
chunks equals prefill in one."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from sglang_dflash.cpu_lane import STUBS_DIR

_spec = importlib.util.spec_from_file_location("cpu_linear_attention", STUBS_DIR / "sgl_kernel" / "_cpu_linear_attention.py")
gdn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gdn)

H, HV, K, V, DIM, WIDTH = 2, 4, 8, 6, 12, 4


def hf():
    from transformers.models.qwen3_next import modeling_qwen3_next as m

    return m


def inputs(seed: int, tokens: int):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        q=torch.randn(1, tokens, H, K, generator=gen),
        k=torch.randn(1, tokens, H, K, generator=gen),
        v=torch.randn(1, tokens, HV, V, generator=gen),
        a=torch.randn(tokens, HV, generator=gen),
        b=torch.randn(tokens, HV, generator=gen),
        A_log=torch.randn(HV, generator=gen) * 0.5,
        dt_bias=torch.randn(HV, generator=gen) * 0.5,
    )


def reference_recurrence(x, state):
    """transformers' per-token reference; its state is [B, HV, K, V], ours [HV, V, K]."""
    g = -x["A_log"].exp() * F.softplus(x["a"] + x["dt_bias"])
    beta = torch.sigmoid(x["b"])
    rep = HV // H
    out, final = hf().torch_recurrent_gated_delta_rule(
        x["q"].repeat_interleave(rep, 2), x["k"].repeat_interleave(rep, 2), x["v"], g[None], beta[None],
        initial_state=state.transpose(-1, -2)[None], output_final_state=True, use_qk_l2norm_in_kernel=True,
    )
    return out, final[0].transpose(-1, -2)


def decode(x, pool, slot: int):
    """One token through the decode op (state updated in place)."""
    return gdn.fused_sigmoid_gating_delta_rule_update_cpu(
        A_log=x["A_log"], a=x["a"], dt_bias=x["dt_bias"], softplus_beta=1.0, softplus_threshold=20.0,
        q=x["q"], k=x["k"], v=x["v"], b=x["b"], initial_state_source=pool,
        initial_state_indices=torch.tensor([slot]), cu_seqlens=torch.tensor([0, 1]), use_qk_l2norm_in_kernel=True,
    )


def token(x, t):
    return {n: (x[n][:, t : t + 1] if n in "qkv" else x[n][t : t + 1] if n in ("a", "b") else x[n]) for n in x}


def test_decode_steps_match_the_transformers_recurrence():
    x = inputs(0, 5)
    start = torch.randn(HV, V, K)
    pool = torch.zeros(3, HV, V, K)
    pool[2] = start
    outs = [decode(token(x, t), pool, 2) for t in range(5)]
    want_out, want_state = reference_recurrence(x, start)
    torch.testing.assert_close(torch.cat(outs, dim=1), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool[2], want_state, atol=1e-5, rtol=1e-5)
    assert torch.equal(pool[0], torch.zeros(HV, V, K))


def test_verify_caches_every_step_and_leaves_the_pool_state():
    """Two sequences of N = 4 verified at once: outputs and per-step states equal the
    decode path's, and the pool slots are untouched (the commit writes them later)."""
    n, slots, rows = 4, [5, 1], [0, 2]
    xs = [inputs(10 + i, n) for i in range(2)]
    pool = torch.randn(6, HV, V, K)
    before = pool.clone()
    cat = {name: torch.cat([x[name] for x in xs], dim=1 if name in "qkv" else 0) for name in "qkvab"}
    cat.update(A_log=xs[0]["A_log"], dt_bias=xs[0]["dt_bias"])
    buffer = torch.zeros(3, n, HV, V, K)
    out = gdn.fused_sigmoid_gating_delta_rule_update_cpu(
        A_log=cat["A_log"], a=cat["a"], dt_bias=cat["dt_bias"], softplus_beta=1.0, softplus_threshold=20.0,
        q=cat["q"], k=cat["k"], v=cat["v"], b=cat["b"], initial_state_source=pool,
        initial_state_indices=torch.tensor(slots), cu_seqlens=torch.tensor([0, n, 2 * n]), use_qk_l2norm_in_kernel=True,
        disable_state_update=True, intermediate_states_buffer=buffer, intermediate_state_indices=torch.tensor(rows),
        cache_steps=n,
    )
    assert torch.equal(pool, before)
    for i, (slot, row) in enumerate(zip(slots, rows)):
        x = {**xs[i], "A_log": cat["A_log"], "dt_bias": cat["dt_bias"]}
        replay = before.clone()
        for t in range(n):
            o = decode(token(x, t), replay, slot)
            torch.testing.assert_close(out[:, i * n + t], o[:, 0], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(buffer[row, t], replay[slot], atol=1e-6, rtol=1e-6)


def test_prefill_matches_the_chunked_reference_and_chunks_compose():
    x = inputs(3, 9)
    g, beta = gdn.fused_gdn_gating_cpu(x["A_log"], x["a"], x["b"], x["dt_bias"])
    assert g.shape == beta.shape == (1, 9, HV)
    pool = torch.zeros(2, HV, V, K)
    out, _, _ = gdn.chunk_gated_delta_rule_cpu(
        x["q"], x["k"], x["v"], g, beta, initial_state=pool, initial_state_indices=torch.tensor([1]),
        cu_seqlens=torch.tensor([0, 9]), use_qk_l2norm_in_kernel=True,
    )
    rep = HV // H
    want, final = hf().torch_chunk_gated_delta_rule(
        x["q"].repeat_interleave(rep, 2), x["k"].repeat_interleave(rep, 2), x["v"], g, beta, chunk_size=4,
        initial_state=None, output_final_state=True, use_qk_l2norm_in_kernel=True,
    )
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pool[1], final[0].transpose(-1, -2), atol=1e-4, rtol=1e-4)
    # the same 9 tokens as chunks of 4 and 5, the second starting from the pool
    chunked = torch.zeros(2, HV, V, K)
    parts = []
    for start, end in ((0, 4), (4, 9)):
        piece = {n: (x[n][:, start:end] if n in "qkv" else x[n]) for n in "qkv"}
        o, _, _ = gdn.chunk_gated_delta_rule_cpu(
            piece["q"], piece["k"], piece["v"], g[:, start:end], beta[:, start:end], initial_state=chunked,
            initial_state_indices=torch.tensor([1]), cu_seqlens=torch.tensor([0, end - start]), use_qk_l2norm_in_kernel=True,
        )
        parts.append(o)
    torch.testing.assert_close(torch.cat(parts, dim=1), out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked[1], pool[1], atol=1e-6, rtol=1e-6)


def conv_inputs(seed: int, tokens: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(DIM, tokens, generator=gen), torch.randn(DIM, WIDTH, generator=gen), torch.randn(DIM, generator=gen)


def test_conv_prefill_and_update_match_transformers_and_each_other():
    x, weight, bias = conv_inputs(0, 7)
    states = torch.zeros(3, DIM, WIDTH - 1)
    out = gdn.causal_conv1d_fn_cpu(x, weight, bias, conv_states=states, query_start_loc=torch.tensor([0, 7]),
                                   cache_indices=torch.tensor([2]), has_initial_state=torch.tensor([False]), activation="silu")
    want = hf().causal_conv1d_fn(x[None], weight, bias, activation="silu")[0]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states[2], x[:, -(WIDTH - 1):])
    # decode two more tokens from the pool window, against transformers' update
    nxt, _, _ = conv_inputs(1, 2)
    hf_state = states[2][None].clone()
    for t in range(2):
        got = gdn.causal_conv1d_update_cpu(nxt[:, t][None], states, weight, bias, "silu", conv_state_indices=torch.tensor([2]))
        want = hf().causal_conv1d_update(nxt[:, t : t + 1][None], hf_state, weight, bias, activation="silu")[:, :, 0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states[2], hf_state[0])


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_conv_verify_keeps_every_steps_window(pool_dtype):
    """A verify of N tokens: outputs equal N single-token updates bit for bit, and
    window[row, s] is the conv state after token s (what the commit copies back for
    s = commit - 1). A bfloat16 pool under float32 inputs (SGLang's default conv dtype
    on the CPU lane) is where a verify that kept its own tokens at float32 drifted."""
    n = 5
    x, weight, bias = conv_inputs(4, n)
    states = torch.randn(4, DIM, WIDTH - 1).to(pool_dtype)
    replay = states.clone()
    windows = torch.zeros(2, n, DIM, WIDTH - 1, dtype=pool_dtype)
    out = gdn.causal_conv1d_update_cpu(x[None], states, weight, bias, "silu", conv_state_indices=torch.tensor([3]),
                                       intermediate_conv_window=windows, intermediate_state_indices=torch.tensor([1]))
    for t in range(n):
        o = gdn.causal_conv1d_update_cpu(x[:, t][None], replay, weight, bias, "silu", conv_state_indices=torch.tensor([3]))
        torch.testing.assert_close(out[0, :, t], o[0], atol=0, rtol=0)
        torch.testing.assert_close(windows[1, t], replay[3], atol=0, rtol=0)


def test_qwen3_5_helpers():
    gen = torch.Generator().manual_seed(5)
    q_gate, kk = torch.randn(3, 2 * 2 * 8, generator=gen), torch.randn(3, 8, generator=gen)
    wq, wk = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    qn, kn, gate = gdn.fused_qk_gemma_rmsnorm_with_gate_cpu(q_gate, kk, wq, wk, 1e-6, 8, 2)
    per_head = q_gate.view(3, 2, 16)
    rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w)
    torch.testing.assert_close(qn, rms(per_head[..., :8], wq).reshape(-1, 8))
    torch.testing.assert_close(gate, per_head[..., 8:].reshape(-1, 8))
    torch.testing.assert_close(kn, rms(kk.view(3, 1, 8), wk).reshape(-1, 8))
    x, g = torch.randn(3, 16, generator=gen), torch.randn(3, 2, 8, generator=gen)
    want = x * torch.sigmoid(g.reshape(3, 16))
    gdn.fused_sigmoid_mul_cpu(x, g)
    torch.testing.assert_close(x, want)
    qkvz, ba = torch.randn(3, 2 * 2 * 4 + 2 * 4 * 5, generator=gen), torch.randn(3, 8, generator=gen)
    mixed, z, b, a = gdn.fused_qkvzba_split_reshape_cat_contiguous_cpu(qkvz, ba, 2, 4, 4, 5)
    assert torch.equal(mixed, qkvz[:, :36]) and torch.equal(z.reshape(3, -1), qkvz[:, 36:])
    assert torch.equal(b, ba[:, :4]) and torch.equal(a, ba[:, 4:])


@pytest.mark.parametrize("name", ["fused_sigmoid_gating_delta_rule_update_cpu", "fused_gdn_gating_cpu", "fused_qk_gemma_rmsnorm_cpu"])
def test_ops_are_bound_where_sglang_looks_them_up(name):
    import sgl_kernel  # noqa: F401  (the stand-in on the CPU lane)
    import sgl_kernel.mamba as mamba

    assert getattr(torch.ops.sgl_kernel, name).__name__ == name
    assert mamba.chunk_gated_delta_rule_cpu.__name__ == "chunk_gated_delta_rule_cpu"


# ------------------------------------------------------------------ the commit after verify
def test_verify_then_commit_equals_decoding_the_committed_tokens():
    """Two requests verify N = 5 nodes (SSM and conv); committing c nodes (3 and 1)
    with the host's torch scatter leaves each slot exactly where c decode steps would."""
    from types import SimpleNamespace

    from sglang_dflash.host.recurrent_state import scatter_committed_states

    n, slots, commits = 5, [4, 2], [3, 1]
    xs = [inputs(20 + i, n) for i in range(2)]
    A_log, dt_bias = xs[0]["A_log"], xs[0]["dt_bias"]
    conv_x = [conv_inputs(30 + i, n)[0] for i in range(2)]
    _, weight, bias = conv_inputs(29, 1)
    ssm = torch.randn(1, 6, HV, V, K)  # [layers, slots, ...]
    conv = torch.randn(1, 6, DIM, WIDTH - 1)
    start_ssm, start_conv = ssm.clone(), conv.clone()
    scratch_ssm = torch.zeros(1, 3, n, HV, V, K)
    scratch_conv = torch.zeros(1, 3, n, DIM, WIDTH - 1)
    cat = {name: torch.cat([x[name] for x in xs], dim=1 if name in "qkv" else 0) for name in "qkvab"}
    gdn.causal_conv1d_update_cpu(torch.stack(conv_x), conv[0], weight, bias, "silu", conv_state_indices=torch.tensor(slots),
                                 intermediate_conv_window=scratch_conv[0], intermediate_state_indices=torch.tensor([0, 1]))
    gdn.fused_sigmoid_gating_delta_rule_update_cpu(
        A_log=A_log, a=cat["a"], dt_bias=dt_bias, softplus_beta=1.0, softplus_threshold=20.0, q=cat["q"], k=cat["k"],
        v=cat["v"], b=cat["b"], initial_state_source=ssm[0], initial_state_indices=torch.tensor(slots),
        cu_seqlens=torch.tensor([0, n, 2 * n]), use_qk_l2norm_in_kernel=True, disable_state_update=True,
        intermediate_states_buffer=scratch_ssm[0], intermediate_state_indices=torch.tensor([0, 1]), cache_steps=n,
    )
    caches = SimpleNamespace(temporal=ssm, intermediate_ssm=scratch_ssm, conv=[conv], intermediate_conv_window=[scratch_conv])
    scatter_committed_states(caches, torch.tensor(slots), torch.tensor(commits) - 1)
    for i, (slot, c) in enumerate(zip(slots, commits)):
        want_ssm, want_conv = start_ssm[0].clone(), start_conv[0].clone()
        for t in range(c):
            decode({**token(xs[i], t), "A_log": A_log, "dt_bias": dt_bias}, want_ssm, slot)
            gdn.causal_conv1d_update_cpu(conv_x[i][:, t][None], want_conv, weight, bias, "silu", conv_state_indices=torch.tensor([slot]))
        torch.testing.assert_close(ssm[0, slot], want_ssm[slot], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(conv[0, slot], want_conv[slot])
    untouched = [s for s in range(6) if s not in slots]
    assert torch.equal(ssm[:, untouched], start_ssm[:, untouched])


def test_tracking_steps_name_the_node_at_each_crossed_boundary():
    """Radix-cache state tracking every 4 tokens: a span 6 -> 9 crosses 8, whose state
    is node 8 - 6 - 1 = 1's; 4 -> 7 crosses nothing; 7 -> 8 lands on 8 (node 0)."""
    from sglang_dflash.host.recurrent_state import steps_to_track

    got = steps_to_track(torch.tensor([6, 4, 7, 3]), torch.tensor([3, 3, 1, 6]), 4)
    assert got.tolist() == [1, -1, 0, 4]


def test_gated_rmsnorm_matches_sglangs_reference():
    """The CPU lift of the linear-attention output norm equals SGLang's own torch
    reference (``rms_norm_ref``, norm before the SiLU gate)."""
    from sglang.kernels.ops.attention.fla.layernorm_gated import rms_norm_ref

    from sglang_dflash.host.cpu_lifts import gated_rmsnorm

    gen = torch.Generator().manual_seed(6)
    x, z, w = torch.randn(5, 16, generator=gen), torch.randn(5, 16, generator=gen), torch.randn(16, generator=gen)
    torch.testing.assert_close(gated_rmsnorm(x, w, z, 1e-6, "swish"), rms_norm_ref(x, w, None, z=z, eps=1e-6))
    sig = gated_rmsnorm(x, w, z, 1e-6, "sigmoid")
    torch.testing.assert_close(sig, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w * torch.sigmoid(z))


def test_shared_expert_gate_lift_matches_its_definition():
    from sglang_dflash.host.cpu_lifts import _shared_expert_gate_on_cpu

    gen = torch.Generator().manual_seed(7)
    h, w, s, f = (torch.randn(4, 8, generator=gen), torch.randn(8, generator=gen), torch.randn(4, 8, generator=gen),
                  torch.randn(4, 8, generator=gen))
    out = f.clone()
    _shared_expert_gate_on_cpu(None, h, w, s, out, do_add=True)
    torch.testing.assert_close(out, torch.sigmoid(h @ w)[:, None] * s + f)
