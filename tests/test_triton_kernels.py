"""The Triton kernels of ``sglang_dflash.gpu.triton_kernels`` against their torch references.

They run on CPU in Triton's interpreter. ``TRITON_INTERPRET`` must be set before the
kernels' module is imported and is process-wide, so every check runs in one child
process (``python -m tests.test_triton_kernels``) that reports a JSON verdict per case;
this pytest process never imports the kernels, and other tests importing triton are
unaffected. On a CUDA machine the same checks also run natively (``gpu`` marker).

Inputs are random and never all-zero; caches start random so untouched rows are checked
too. bf16 tolerances: the kernel computes in float32 and rounds once, the torch paths
round after each op, so they differ by a few bf16 ulps (~1e-2 at |x| ~ 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# (N tokens, layers, kv_heads, head_dim, strided proj)
CONTEXT_SHAPES = [(1, 1, 1, 8, False), (6, 3, 2, 16, False), (4, 2, 3, 12, True), (9, 2, 4, 32, False)]
# (bs, N nodes)
COMMIT_SHAPES = [(1, 1), (3, 2), (5, 8), (4, 16), (7, 5)]
# (rtol, atol). Kernel vs reference: both round once, so bf16 may differ by one ulp
# (2^-7 relative) where float32 reduction order flips a rounding. Fused vs eager inject:
# eager bf16 rounds ~5 times (norm, weight, two rope products, sum).
KERNEL_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-5)}
INJECT_TOL = {torch.float32: (1e-5, 2e-5), torch.bfloat16: (4e-2, 1.6e-2)}


# --------------------------------------------------------------------------- builders


def random_drafter(*, dtype: torch.dtype = torch.float32, layers: int = 2, bias: bool = False, seed: int = 0):
    """A tiny DFlash drafter with random weights, random norm scales included."""
    from sglang_dflash.model.config import DFlashConfig
    from sglang_dflash.model.drafter import DFlashDrafter

    raw = {
        "architectures": ["DFlashDraftModel"],
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "vocab_size": 64,
        "attention_bias": bias,
        "dflash_config": {"target_layer_ids": [0, 2], "block_size": 4, "mask_token_id": 63},
    }
    torch.manual_seed(seed)
    drafter = DFlashDrafter(DFlashConfig.from_dict(raw))
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
    return drafter.to(dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float], what: str) -> float:
    """|actual - expected| <= atol + rtol * |expected| everywhere; returns the max abs error."""
    rtol, atol = tol
    a, e = actual.detach().float(), expected.detach().float()
    excess = (a - e).abs() - (atol + rtol * e.abs())
    assert float(excess.max()) <= 0, f"{what}: max |diff| {max_error(a, e):.3e} exceeds rtol={rtol}, atol={atol}"
    return max_error(a, e)


# --------------------------------------------------------------------------- checks (child)


def check_store_context_kv(shape, dtype: torch.dtype, device: str) -> str:
    from sglang_dflash.gpu import triton_kernels as tk

    n, layers, kv_heads, head_dim, strided = shape
    gen = torch.Generator().manual_seed(n * 131 + head_dim)
    slots_total = 3 * n + 5
    proj = torch.randn(2 * n if strided else n, layers, 2, kv_heads, head_dim, generator=gen)
    proj = (proj[::2] if strided else proj).to(device, dtype)
    weight = (0.5 + torch.rand(layers, head_dim, generator=gen)).to(device, dtype)
    cos, sin = rope_tables(torch.randint(0, 5000, (n,), generator=gen), head_dim, dtype)
    slots = torch.randperm(slots_total, generator=gen)[:n].to(device)
    caches = torch.randn(2, layers, slots_total, kv_heads, head_dim, generator=gen).to(device, dtype)
    ours, ref = caches.clone(), caches.clone()
    args = (proj, weight, cos.to(device), sin.to(device), slots)
    tk.store_context_kv(*args, ours[0], ours[1], 1e-6)
    tk.store_context_kv_reference(*args, ref[0], ref[1], 1e-6)
    err = assert_close(ours, ref, KERNEL_TOL[dtype], "kernel vs reference")
    assert max_error(ours[1], ref[1]) == 0.0, "V rows must be a plain copy"
    assert not torch.equal(ours, caches), "kernel wrote nothing"
    return f"max err {err:.2e}"


def check_fused_inject(dtype: torch.dtype, bias: bool, device: str) -> str:
    from sglang_dflash.model.draft_kv import DraftKVCache
    from sglang_dflash.gpu import triton_kernels as tk

    drafter = random_drafter(dtype=dtype, layers=3, bias=bias).to(device)
    before = {k: v.clone() for k, v in drafter.state_dict().items()}
    cfg = drafter.config
    gen = torch.Generator().manual_seed(7)
    n, num_slots = 6, 20
    features = torch.randn(n, cfg.num_features * cfg.hidden_size, generator=gen).to(device, dtype)
    positions = torch.randint(0, 3000, (n,), generator=gen).to(device)
    slots = torch.randperm(num_slots, generator=gen)[:n].to(device)
    caches = []
    for _ in range(2):
        cache = DraftKVCache(
            num_layers=cfg.num_layers, num_slots=num_slots, num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, dtype=dtype, device=device,
        )
        cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
        cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
        caches.append(cache)
    caches[1].k.copy_(caches[0].k)
    caches[1].v.copy_(caches[0].v)
    drafter.inject(caches[0], features, positions, slots)
    with torch.inference_mode():  # as the worker first builds it
        injector = tk.FusedContextInjector(drafter)
    assert not injector.weight.is_inference()
    assert injector.kernel, "the Triton kernel must be the one under test"
    injector(caches[1], features, positions, slots)
    err = assert_close(caches[1].k, caches[0].k, INJECT_TOL[dtype], "fused K vs drafter.inject")
    assert_close(caches[1].v, caches[0].v, KERNEL_TOL[dtype], "fused V vs drafter.inject (GEMM order only)")
    after = drafter.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "sharing storage changed drafter weights"
    attn = drafter.layers[1].self_attn
    assert injector.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    injector(caches[1], features[:0], positions[:0], slots[:0])  # empty: no-op
    return f"max err {err:.2e}"


def check_greedy_commit(shape, seq_dtype: torch.dtype, device: str) -> str:
    from sglang_dflash.gpu import triton_kernels as tk

    bs, n = shape
    gen = torch.Generator().manual_seed(bs * 17 + n)
    top1 = torch.randint(0, 4, (bs, n), generator=gen)
    drafts = torch.randint(0, 4, (bs, n), generator=gen)
    drafts[0, 1:] = top1[0, :-1]  # row 0 accepts everything
    if bs > 2:
        drafts[1, 1:] = top1[1, :-1]
        drafts[1, n // 2] = (top1[1, n // 2 - 1] + 1) % 4 if n > 1 else drafts[1, 0]  # row 1: partial
    seq_lens = torch.randint(1, 500, (bs,), generator=gen).to(seq_dtype)
    args = (drafts.to(device), top1.to(device), seq_lens.to(device))
    ours, ref = tk.greedy_commit(*args), tk.greedy_commit_reference(*args)
    for field in ("num_accepted", "bonus", "commit_lens", "new_seq_lens"):
        a, b = getattr(ours, field), getattr(ref, field)
        assert a.dtype == b.dtype and torch.equal(a, b), f"{field}: {a.tolist()} ({a.dtype}) != {b.tolist()} ({b.dtype})"
    assert int(ours.num_accepted[0]) == n - 1
    # a strided (non-contiguous) view takes the same path
    wide = torch.randint(0, 4, (bs, 2 * n), generator=gen).to(device)
    strided = tk.greedy_commit(wide[:, ::2], args[1], args[2])
    assert torch.equal(strided.num_accepted, tk.greedy_commit_reference(wide[:, ::2], args[1], args[2]).num_accepted)
    return f"accepted {ours.num_accepted.tolist()}"


def check_fused_verify_chain(shape, device: str) -> str:
    """The worker's greedy rule on CUDA inside ``verify_chain``: the same acceptance as
    the torch rule, alone and with sampled rows overwriting theirs."""
    from sglang_dflash.gpu import triton_kernels as tk
    from sglang_dflash.spec.accept import verify_chain
    from sglang_dflash.spec.sampling import RowSampling, SampledRows

    bs, n = shape
    vocab = 11
    gen = torch.Generator().manual_seed(bs * 31 + n)
    logits = torch.randn(bs, n, vocab, generator=gen) * 3
    tokens = torch.randint(0, vocab, (bs, n), generator=gen)
    tokens[0, 1:] = logits[0, :-1].argmax(-1)  # row 0 accepts everything
    if bs > 2 and n > 2:
        tokens[1, 1 : n // 2 + 1] = logits[1, : n // 2].argmax(-1)  # row 1: a partial prefix
    args = [t.to(device) for t in (tokens, logits)]
    plain = tk.greedy_commit(args[0], args[1].argmax(-1))
    assert plain.commit_lens is None and plain.new_seq_lens is None
    accepted, calls = [], []

    def fused(*tensors):  # the kernel rule, counted: verify_chain must really run it
        calls.append(1)
        return tk.fused_greedy_acceptance(*tensors)

    for sampled in (None, [r for r in range(bs) if r % 2 == 1]):
        rows = None
        if sampled:
            s = len(sampled)
            params = RowSampling(temperature=torch.full((s,), 0.8), top_k=torch.full((s,), 1 << 30),
                                 top_p=torch.ones(s), min_p=torch.zeros(s))
            rows = SampledRows(index=torch.tensor(sampled, device=device), params=params,
                               uniforms=torch.rand(s, 2 * n - 1, generator=gen).to(device))
        ours = verify_chain(*args[:1], None, args[1], rows, greedy=fused)
        ref = verify_chain(*args[:1], None, args[1], rows)
        assert len(calls) == len(accepted) + 1, "verify_chain did not apply the greedy rule it was given"
        for field in ("num_accepted", "bonus"):
            a, b = getattr(ours, field), getattr(ref, field)
            assert a.dtype == b.dtype and torch.equal(a, b), f"{field}: {a.tolist()} != {b.tolist()}"
        for r in range(bs):  # emitted tokens: columns 0 .. num_accepted
            k = int(ref.num_accepted[r]) + 1
            assert torch.equal(ours.out_tokens[r, :k], ref.out_tokens[r, :k]), r
        accepted.append(ours.num_accepted.tolist())
    assert accepted[0][0] == n - 1
    return f"accepted {accepted}"


def check_kernels_active(device: str) -> str:
    from sglang_dflash.gpu import triton_kernels as tk

    if device == "cpu":
        assert tk.interpreting(), "TRITON_INTERPRET=1 did not reach triton"
    return f"interpreting={tk.interpreting()}"


def cases(device: str) -> dict[str, Callable[[], str]]:
    out: dict[str, Callable[[], str]] = {"kernels_active": lambda: check_kernels_active(device)}
    dtypes = [("f32", torch.float32), ("bf16", torch.bfloat16)]
    for shape in CONTEXT_SHAPES:
        for tag, dtype in dtypes:
            out[f"context_kv-{'x'.join(map(str, shape[:4]))}{'-strided' if shape[4] else ''}-{tag}"] = (
                lambda s=shape, d=dtype: check_store_context_kv(s, d, device)
            )
    for tag, dtype in dtypes:
        for bias in (False, True):
            out[f"fused_inject-{tag}{'-bias' if bias else ''}"] = lambda d=dtype, b=bias: check_fused_inject(d, b, device)
    for shape in COMMIT_SHAPES:
        for seq_dtype in (torch.int64, torch.int32):
            out[f"greedy_commit-{shape[0]}x{shape[1]}-{str(seq_dtype)[6:]}"] = (
                lambda s=shape, d=seq_dtype: check_greedy_commit(s, d, device)
            )
        out[f"fused_verify_chain-{shape[0]}x{shape[1]}"] = lambda s=shape: check_fused_verify_chain(s, device)
    return out


CASE_NAMES = list(cases("cpu"))


def run_cases(device: str) -> dict[str, dict]:
    results = {}
    for name, check in cases(device).items():
        try:
            results[name] = {"ok": True, "detail": check()}
        except Exception as exc:  # reported per case by the parent
            results[name] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
    return results


# --------------------------------------------------------------------------- tests (parent)


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_triton_kernels"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CASE_NAMES)
def test_interpreted_kernel_matches_reference(interpreted, name):
    result = interpreted[name]
    assert result["ok"], result["detail"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", [n for n in CASE_NAMES if n != "kernels_active"])
def test_cuda_kernel_matches_reference(name):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process")
    with torch.no_grad():
        assert cases("cuda")[name]() is not None


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the pytest module does this itself)")
    torch.set_num_threads(1)
    with torch.no_grad():
        print(json.dumps(run_cases("cpu")))
