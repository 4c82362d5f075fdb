"""Triton kernels for the two small per-step jobs around the drafter, each with its
same-signature plain-torch reference (the spec the kernel is tested against).

* :func:`store_context_kv` -- context-KV injection after the projection GEMM: per-head
  ``k_norm`` RMSNorm, neox RoPE at the tokens' absolute positions, and the stores into
  ``cache.k[layer, slot]`` / ``cache.v[layer, slot]``, for every drafter layer in one
  launch. Unfused, that is ``3 * layers`` elementwise kernels and ``layers`` scatters per
  step; :class:`FusedContextInjector` puts the one GEMM over stacked ``k_proj``/``v_proj``
  weights in front of it so it equals ``DFlashDrafter.inject``.
* :func:`greedy_commit` -- greedy chain acceptance (plus, given ``seq_lens``, the commit
  arithmetic ``commit_lens``, ``new_seq_lens``) in one launch instead of the small
  torch ops of ``spec.accept.greedy_chain_acceptance``;
  :func:`fused_greedy_acceptance` is the worker's greedy rule on CUDA.

The kernels need CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before
this module is imported (that is how the CPU tests run them). Everything is computed in
float32 and rounded once at the store, so bf16 results can differ from the eager
drafter (which rounds after each op) by a few bf16 ulps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..spec.accept import Acceptance, greedy_chain_acceptance
from ..model.draft_kv import DraftKVCache
from ..model.drafter import DFlashDrafter
from ..model.rope import rotate_half


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_launchable(*tensors: torch.Tensor) -> None:
    if interpreting():
        return
    if not all(t.is_cuda for t in tensors):
        raise RuntimeError(
            "sglang_dflash Triton kernels need CUDA tensors (set TRITON_INTERPRET=1 before "
            "importing sglang_dflash.gpu.triton_kernels to run them on CPU)"
        )


# =========================================================================== context KV


@triton.jit
def _store_context_kv_kernel(
    proj_ptr,
    k_norm_ptr,
    cos_ptr,
    sin_ptr,
    slots_ptr,
    k_cache_ptr,
    v_cache_ptr,
    stride_pn,
    stride_pl,
    stride_pkv,
    stride_ph,
    stride_wl,
    stride_rn,
    stride_cl,
    stride_cs,
    stride_ch,
    eps,
    KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """One program per (token, layer): all kv heads of that row, as two head-dim halves
    so ``rotate_half`` is a swap of registers rather than a gather."""
    tok = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    dim_ok = dims < HALF
    mask = (heads[:, None] < KV_HEADS) & dim_ok[None, :]

    src = proj_ptr + tok * stride_pn + layer * stride_pl + heads[:, None] * stride_ph + dims[None, :]
    k1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    k2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    v1 = tl.load(src + stride_pkv, mask=mask, other=0.0)
    v2 = tl.load(src + stride_pkv + HALF, mask=mask, other=0.0)

    rstd = tl.rsqrt((tl.sum(k1 * k1, axis=1) + tl.sum(k2 * k2, axis=1)) / (2 * HALF) + eps)
    w = k_norm_ptr + layer * stride_wl + dims
    w1 = tl.load(w, mask=dim_ok, other=0.0).to(tl.float32)
    w2 = tl.load(w + HALF, mask=dim_ok, other=0.0).to(tl.float32)
    k1 = k1 * rstd[:, None] * w1[None, :]
    k2 = k2 * rstd[:, None] * w2[None, :]

    rope = tok * stride_rn + dims
    c1 = tl.load(cos_ptr + rope, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + rope + HALF, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + rope, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + rope + HALF, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    out1 = k1 * c1 - k2 * s1
    out2 = k2 * c2 + k1 * s2

    slot = tl.load(slots_ptr + tok).to(tl.int64)
    dst = layer * stride_cl + slot * stride_cs + heads[:, None] * stride_ch + dims[None, :]
    dtype = k_cache_ptr.dtype.element_ty
    tl.store(k_cache_ptr + dst, out1.to(dtype), mask=mask)
    tl.store(k_cache_ptr + dst + HALF, out2.to(dtype), mask=mask)
    tl.store(v_cache_ptr + dst, v1.to(dtype), mask=mask)
    tl.store(v_cache_ptr + dst + HALF, v2.to(dtype), mask=mask)


def _check_context_shapes(proj, k_norm_weight, cos, sin, slots, k_cache, v_cache) -> None:
    n, layers, two, kv_heads, head_dim = proj.shape
    if two != 2 or head_dim % 2:
        raise ValueError(f"proj must be [N, layers, 2, kv_heads, even head_dim], got {tuple(proj.shape)}")
    if k_cache.shape[0] != layers or k_cache.shape[2:] != (kv_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache {tuple(k_cache.shape)} does not fit proj {tuple(proj.shape)}")
    if k_norm_weight.shape != (layers, head_dim):
        raise ValueError(f"k_norm_weight must be [{layers}, {head_dim}], got {tuple(k_norm_weight.shape)}")
    if cos.shape != (n, head_dim) or sin.shape != cos.shape or cos.stride() != sin.stride():
        raise ValueError(f"cos/sin must both be [{n}, {head_dim}] with equal strides")
    if slots.shape != (n,):
        raise ValueError(f"slots must be [{n}], got {tuple(slots.shape)}")
    inner = [proj.stride(-1), k_norm_weight.stride(-1), cos.stride(-1), k_cache.stride(-1), v_cache.stride(-1)]
    if any(s != 1 for s in inner) or k_cache.stride() != v_cache.stride():
        raise ValueError("head_dim must be the contiguous dimension of every operand, and k/v caches alike")


def store_context_kv(
    proj: torch.Tensor,
    k_norm_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    eps: float,
) -> None:
    """Write context K/V of N tokens into every layer's cache rows (Triton).

    proj:          [N, layers, 2, kv_heads, head_dim] pre-norm ``k_proj`` (index 0) and
                   ``v_proj`` (index 1) outputs; head_dim contiguous.
    k_norm_weight: [layers, head_dim] each layer's ``k_norm.weight``.
    cos, sin:      [N, head_dim] neox RoPE tables at the tokens' absolute positions.
    slots:         [N] cache rows (distinct).
    k_cache, v_cache: [layers, slots, kv_heads, head_dim], written in place.
    """
    _check_context_shapes(proj, k_norm_weight, cos, sin, slots, k_cache, v_cache)
    n, layers, _, kv_heads, head_dim = proj.shape
    if n == 0:
        return
    _check_launchable(proj, k_norm_weight, cos, sin, slots, k_cache, v_cache)
    half = head_dim // 2
    _store_context_kv_kernel[(n, layers)](
        proj,
        k_norm_weight,
        cos,
        sin,
        slots,
        k_cache,
        v_cache,
        proj.stride(0),
        proj.stride(1),
        proj.stride(2),
        proj.stride(3),
        k_norm_weight.stride(0),
        cos.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        float(eps),
        KV_HEADS=kv_heads,
        HALF=half,
        BLOCK_H=triton.next_power_of_2(kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
    )


def store_context_kv_reference(
    proj: torch.Tensor,
    k_norm_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    eps: float,
) -> None:
    """Plain-torch :func:`store_context_kv`: float32 math, one rounding at the store."""
    _check_context_shapes(proj, k_norm_weight, cos, sin, slots, k_cache, v_cache)
    k = proj[:, :, 0].float()  # [N, L, kvh, hd]
    k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps) * k_norm_weight.float()[None, :, None, :]
    k = k * cos.float()[:, None, None, :] + rotate_half(k) * sin.float()[:, None, None, :]
    k_cache.index_copy_(1, slots.long(), k.transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(1, slots.long(), proj[:, :, 1].transpose(0, 1).to(v_cache.dtype))


class FusedContextInjector:
    """``DFlashDrafter.inject`` as fc -> hidden_norm -> one GEMM -> one kernel.

    The GEMM runs over every layer's ``k_proj`` and ``v_proj`` weights stacked into one
    ``[layers * 2 * kv_heads * head_dim, hidden]`` matrix, so injection reads the
    context vectors once instead of ``2 * layers`` times. With ``share_storage`` the
    drafter's own k/v weights become views into that matrix, so it costs no extra
    memory and later in-place weight loads stay visible to both.

    Construction is the only moment parameters are re-pointed: build it once, before
    anything (a CUDA graph) records the addresses of the drafter's weights; calling it
    never moves storage.

    ``kernel=None`` picks the Triton kernel when the drafter lives on CUDA (or the
    interpreter is on) and the torch reference otherwise; the choice is made once.
    Build it after the drafter has its final device and dtype: ``.to()`` replaces the
    parameters and ends the sharing.
    """

    def __init__(self, drafter: DFlashDrafter, *, share_storage: bool = True, kernel: Optional[bool] = None) -> None:
        self.drafter = drafter
        self.config = drafter.config
        attns = [layer.self_attn for layer in drafter.layers]
        weights = [w for a in attns for w in (a.k_proj.weight, a.v_proj.weight)]
        # normal tensors even when first built inside the worker's inference_mode:
        # they become the drafter's parameters' storage
        with torch.inference_mode(False), torch.no_grad():
            self.weight = torch.cat(weights).contiguous()
            self.bias = None
            if self.config.attention_bias:
                self.bias = torch.cat([b for a in attns for b in (a.k_proj.bias, a.v_proj.bias)])
            self.k_norm_weight = torch.stack([a.k_norm.weight for a in attns])
            if share_storage:
                self._share(attns)
        self.eps = float(attns[0].k_norm.eps)
        device = self.weight.device
        self.kernel = (device.type == "cuda" or interpreting()) if kernel is None else kernel

    def _share(self, attns) -> None:
        rows = self.config.num_kv_heads * self.config.head_dim
        for i, attn in enumerate(attns):
            attn.k_proj.weight.data = self.weight[(2 * i) * rows : (2 * i + 1) * rows]
            attn.v_proj.weight.data = self.weight[(2 * i + 1) * rows : (2 * i + 2) * rows]
            attn.k_norm.weight.data = self.k_norm_weight[i]
            if self.bias is not None:
                attn.k_proj.bias.data = self.bias[(2 * i) * rows : (2 * i + 1) * rows]
                attn.v_proj.bias.data = self.bias[(2 * i + 1) * rows : (2 * i + 2) * rows]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """[N, K*H] target features -> [N, layers, 2, kv_heads, head_dim] pre-norm K/V."""
        ctx = self.drafter.project_context(features)
        proj = torch.nn.functional.linear(ctx, self.weight, self.bias)
        cfg = self.config
        return proj.view(-1, cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim)

    def __call__(self, cache: DraftKVCache, features: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        proj = self.project(features)
        cos, sin = self.drafter.rotary(positions, proj.dtype)
        store = store_context_kv if self.kernel else store_context_kv_reference
        store(proj, self.k_norm_weight, cos, sin, slots, cache.k, cache.v, self.eps)


# ====================================================================== greedy commit


@dataclass
class GreedyCommit:
    """One verify step's greedy outcome, per request ([bs] each, int64 unless noted).

    num_accepted: accepted drafts (bonus not counted).
    bonus:        the new bonus token (``target_top1``'s dtype).
    commit_lens:  ``num_accepted + 1`` tokens emitted and committed (None without seq_lens).
    new_seq_lens: ``seq_lens + commit_lens`` (``seq_lens``' dtype; None without seq_lens).
    """

    num_accepted: torch.Tensor
    bonus: torch.Tensor
    commit_lens: Optional[torch.Tensor]
    new_seq_lens: Optional[torch.Tensor]

    def acceptance(self, target_top1: torch.Tensor) -> Acceptance:
        """The same outcome as ``acceptance.Acceptance`` (emitted tokens are target_top1)."""
        return Acceptance(num_accepted=self.num_accepted, out_tokens=target_top1, bonus=self.bonus)


@triton.jit
def _greedy_commit_kernel(
    draft_ptr,
    top1_ptr,
    seq_lens_ptr,
    num_accepted_ptr,
    bonus_ptr,
    commit_ptr,
    new_lens_ptr,
    stride_d,
    stride_t,
    num_nodes,
    BLOCK: tl.constexpr,
    WITH_LENS: tl.constexpr,
):
    """One program per request: the first mismatch of ``draft[j+1]`` vs ``top1[j]``."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = offs < num_nodes - 1
    drafts = tl.load(draft_ptr + row * stride_d + offs + 1, mask=valid, other=0)
    top1 = tl.load(top1_ptr + row * stride_t + offs, mask=valid, other=0)
    miss = valid & (drafts != top1)
    accepted = tl.min(tl.where(miss, offs, num_nodes - 1), axis=0).to(tl.int64)
    bonus = tl.load(top1_ptr + row * stride_t + accepted)
    tl.store(num_accepted_ptr + row, accepted)
    tl.store(bonus_ptr + row, bonus)
    if WITH_LENS:
        seq_len = tl.load(seq_lens_ptr + row)
        tl.store(commit_ptr + row, accepted + 1)
        tl.store(new_lens_ptr + row, (seq_len + accepted + 1).to(new_lens_ptr.dtype.element_ty))


def _check_commit_shapes(draft_tokens, target_top1, seq_lens) -> None:
    if draft_tokens.dim() != 2 or draft_tokens.shape != target_top1.shape or draft_tokens.shape[1] < 1:
        raise ValueError(
            f"draft_tokens {tuple(draft_tokens.shape)} and target_top1 {tuple(target_top1.shape)} must both be [bs, N>=1]"
        )
    if seq_lens is not None and seq_lens.shape != draft_tokens.shape[:1]:
        raise ValueError(f"seq_lens must be [{draft_tokens.shape[0]}], got {tuple(seq_lens.shape)}")


def greedy_commit(
    draft_tokens: torch.Tensor, target_top1: torch.Tensor, seq_lens: Optional[torch.Tensor] = None
) -> GreedyCommit:
    """draft_tokens, target_top1: [bs, N] (node 0 = previous bonus); seq_lens: [bs]
    committed lengths before this step, or None to skip the length arithmetic ->
    :class:`GreedyCommit` (Triton, no host sync)."""
    _check_commit_shapes(draft_tokens, target_top1, seq_lens)
    bs, n = draft_tokens.shape
    device = draft_tokens.device
    with_lens = seq_lens is not None
    out = GreedyCommit(
        num_accepted=torch.empty(bs, dtype=torch.long, device=device),
        bonus=torch.empty(bs, dtype=target_top1.dtype, device=device),
        commit_lens=torch.empty(bs, dtype=torch.long, device=device) if with_lens else None,
        new_seq_lens=torch.empty(bs, dtype=seq_lens.dtype, device=device) if with_lens else None,
    )
    if bs == 0:
        return out
    draft_tokens = draft_tokens if draft_tokens.stride(1) == 1 else draft_tokens.contiguous()
    target_top1 = target_top1 if target_top1.stride(1) == 1 else target_top1.contiguous()
    _check_launchable(draft_tokens, target_top1, *([seq_lens] if with_lens else []))
    unused = out.num_accepted  # the length pointers of a launch WITH_LENS=False: never read or written
    _greedy_commit_kernel[(bs,)](
        draft_tokens,
        target_top1,
        seq_lens if with_lens else unused,
        out.num_accepted,
        out.bonus,
        out.commit_lens if with_lens else unused,
        out.new_seq_lens if with_lens else unused,
        draft_tokens.stride(0),
        target_top1.stride(0),
        n,
        BLOCK=triton.next_power_of_2(max(n - 1, 1)),
        WITH_LENS=with_lens,
    )
    return out


def fused_greedy_acceptance(draft_tokens: torch.Tensor, target_top1: torch.Tensor) -> Acceptance:
    """``spec.accept.greedy_chain_acceptance`` in one launch: the worker's greedy rule on
    CUDA (``verify_chain(..., greedy=fused_greedy_acceptance)``)."""
    return greedy_commit(draft_tokens, target_top1).acceptance(target_top1)


def greedy_commit_reference(
    draft_tokens: torch.Tensor, target_top1: torch.Tensor, seq_lens: Optional[torch.Tensor] = None
) -> GreedyCommit:
    """Plain-torch :func:`greedy_commit`, through ``spec.accept.greedy_chain_acceptance``."""
    _check_commit_shapes(draft_tokens, target_top1, seq_lens)
    result = greedy_chain_acceptance(draft_tokens, target_top1)
    commit_lens = result.num_accepted.long() + 1
    return GreedyCommit(
        num_accepted=result.num_accepted.long(),
        bonus=result.bonus,
        commit_lens=commit_lens if seq_lens is not None else None,
        new_seq_lens=(seq_lens + commit_lens).to(seq_lens.dtype) if seq_lens is not None else None,
    )
