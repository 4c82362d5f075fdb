"""The CPU ops a gated-delta-net (GDN) hybrid target needs, in torch: Qwen3-Next, Qwen3.5.

SGLang 0.5.23's CPU engine binds these from the CPU build of ``sgl_kernel``
(``torch.ops.sgl_kernel.*_cpu`` at import of ``gdn_triton.py``, ``gdn_backend.py`` and
``qwen3_5.py``; ``sgl_kernel.mamba.*_cpu`` for the convolution and the chunked
prefill). Even a real CPU build would not verify speculative blocks: 0.5.23 calls
the recurrent op with ``disable_state_update``, per-step state buffers and
``cache_steps``, which the published CPU kernel does not take. So they are written
here, with the semantics of the Triton kernels the GPU runs
(``fused_sigmoid_gating_recurrent.py``, ``causal_conv1d_triton.py``,
``fused_gdn_gating.py``):

* states: the SSM state pool is ``[slots, HV, V, K]`` (``h[v, k]``), float32 math;
  the conv state pool is ``[slots, dim, K_conv - 1]``, oldest input first;
* one recurrence step, per value head ``h``: ``S *= exp(g)``; ``u = beta * (v - S k)``;
  ``S += u k^T``; ``o = S q * scale``, with ``q, k`` L2-normalised (eps 1e-6) and the
  query/key head of value head ``h`` being ``h // (HV / H)``;
* verify (``disable_state_update``): the pool's state is read, never written, and the
  state after every step goes to ``intermediate_states_buffer[row, step]``; the conv
  update writes each step's window to ``intermediate_conv_window[row, step]`` (and,
  like the Triton kernel, still shifts the pool's conv state: the commit after
  acceptance overwrites it with the accepted step's window);
* a token entering the conv window is held at the conv pool's dtype (bfloat16 by
  default), as a decode step stores it: the next token of a verify then sees exactly
  what it would see after that decode step. On the GPU the model dtype is the pool's
  and this is a no-op; on the float32 CPU lane, keeping verified tokens at float32
  made verify-then-commit drift from decoding by up to ~5e-3 per conv output, enough
  to flip a near-tie greedy choice.

Prefill runs the same recurrence token by token, so a prefix computed by prefill, by
decode or by verify-and-commit is the same state up to float32 rounding.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------ gating and recurrence
def _gates(A_log, a, dt_bias, b, softplus_beta: float = 1.0, softplus_threshold: float = 20.0):
    """(g, beta) float32: ``g = -exp(A_log) * softplus(a + dt_bias)``, ``beta = sigmoid(b)``."""
    x = a.float() + dt_bias.float()
    g = -torch.exp(A_log.float()) * F.softplus(x, beta=softplus_beta, threshold=softplus_threshold)
    return g, torch.sigmoid(b.float())


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _step(state, q, k, v, g, beta, scale: float, l2norm: bool):
    """One token for a batch of sequences. state [B, HV, V, K] (float32, updated and
    returned); q, k [B, H, K]; v [B, HV, V]; g, beta [B, HV] -> (state, out [B, HV, V])."""
    group = v.shape[1] // q.shape[1]
    q, k = q.float().repeat_interleave(group, 1), k.float().repeat_interleave(group, 1)
    if l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = q * scale
    state = state * torch.exp(g)[:, :, None, None]
    u = (v.float() - torch.einsum("bhvk,bhk->bhv", state, k)) * beta[:, :, None]
    state = state + u[:, :, :, None] * k[:, :, None, :]
    return state, torch.einsum("bhvk,bhk->bhv", state, q)


def _segments(cu_seqlens: Optional[torch.Tensor], total: int) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, total)]
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def fused_gdn_gating_cpu(A_log, a, b, dt_bias, beta: float = 1.0, threshold: float = 20.0):
    """Prefill gates: (g, beta), each [1, T, HV] float32."""
    g, gate = _gates(A_log, a, dt_bias, b, beta, threshold)
    return g[None], gate[None]


def fused_sigmoid_gating_delta_rule_update_cpu(
    A_log,
    a,
    dt_bias,
    softplus_beta,
    softplus_threshold,
    q,
    k,
    v,
    b,
    initial_state_source,
    initial_state_indices,
    scale: Optional[float] = None,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    is_kda: bool = False,
    lower_bound: Optional[float] = None,
    disable_state_update: bool = False,
    intermediate_states_buffer: Optional[torch.Tensor] = None,
    intermediate_state_indices: Optional[torch.Tensor] = None,
    cache_steps: Optional[int] = None,
    retrieve_parent_token: Optional[torch.Tensor] = None,
    **unsupported,
):
    """Decode (one token per sequence, state updated in place) and target verify
    (``cache_steps`` tokens per sequence, per-step states cached, state untouched).
    q, k: [1, T, H, K]; v: [1, T, HV, V]; a, b: [T, HV] -> out [1, T, HV, V]."""
    if is_kda or lower_bound is not None or retrieve_parent_token is not None or any(
        value not in (None, False) for value in unsupported.values()
    ):
        raise NotImplementedError(
            "sgl_kernel stand-in: the CPU gated-delta recurrence does GDN chains only "
            "(no KDA, lower-bound gates, tree verify or ReplaySSM rings)"
        )
    q, k, v = q[0], k[0], v[0]
    total = v.shape[0]
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    g, beta = _gates(A_log, a.reshape(total, -1), dt_bias, b.reshape(total, -1), softplus_beta, softplus_threshold)
    segments = _segments(cu_seqlens, total)
    lengths = {end - start for start, end in segments}
    if len(lengths) != 1:
        raise NotImplementedError("sgl_kernel stand-in: recurrent GDN update needs equal-length segments")
    steps = lengths.pop()
    starts = torch.tensor([start for start, _ in segments])
    slots = initial_state_indices.long()[: len(segments)]
    live = slots >= 0
    state = torch.zeros(len(segments), *initial_state_source.shape[1:], dtype=torch.float32)
    state[live] = initial_state_source[slots[live]].float()
    out = v.new_empty(total, v.shape[1], v.shape[2])
    for step in range(steps):
        rows = starts + step
        state, o = _step(state, q[rows], k[rows], v[rows], g[rows], beta[rows], scale, use_qk_l2norm_in_kernel)
        out[rows] = o.to(out.dtype)
        if intermediate_states_buffer is not None:
            cache = intermediate_state_indices.long()[: len(segments)]
            keep = cache >= 0
            buffer = intermediate_states_buffer.view(intermediate_states_buffer.shape[0], -1, *state.shape[1:])
            buffer[cache[keep], step] = state[keep].to(buffer.dtype)
    if not disable_state_update:
        initial_state_source[slots[live]] = state[live].to(initial_state_source.dtype)
    return out[None]


def chunk_gated_delta_rule_cpu(
    q,
    k,
    v,
    g,
    beta,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    initial_state_indices: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    head_first: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    **_,
):
    """Prefill: varlen sequences from their pool states, written back in place.
    q, k: [1, T, H, K]; v: [1, T, HV, V]; g, beta: [1, T, HV] -> (out [1, T, HV, V], None, None)."""
    if head_first:
        raise NotImplementedError("sgl_kernel stand-in: head_first layouts are not supported")
    q, k, v, g, beta = q[0], k[0], v[0], g[0].float(), beta[0].float()
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    out = v.new_empty(v.shape)
    for i, (start, end) in enumerate(_segments(cu_seqlens, v.shape[0])):
        slot = int(initial_state_indices[i]) if initial_state_indices is not None else i
        state = initial_state[slot].float()[None] if initial_state is not None and slot >= 0 else None
        if state is None:
            state = torch.zeros(1, v.shape[1], v.shape[2], k.shape[2], dtype=torch.float32)
        for t in range(start, end):
            state, o = _step(state, q[t : t + 1], k[t : t + 1], v[t : t + 1], g[t : t + 1], beta[t : t + 1],
                             scale, use_qk_l2norm_in_kernel)
            out[t] = o[0].to(out.dtype)
        if initial_state is not None and slot >= 0:
            initial_state[slot] = state[0].to(initial_state.dtype)
    return out[None], None, None


# ------------------------------------------------------------------ causal convolution
def _activate(x: torch.Tensor, activation) -> torch.Tensor:
    return F.silu(x) if activation in ("silu", "swish", True) else x


def _conv_token(window: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """window [B, dim, K-1] (oldest first), x [B, dim] -> pre-activation [B, dim] (float32)."""
    full = torch.cat([window.float(), x.float()[:, :, None]], dim=-1)
    out = (full * weight.float()[None]).sum(-1)
    return out if bias is None else out + bias.float()


def causal_conv1d_update_cpu(
    x,
    conv_state,
    weight,
    bias=None,
    activation=None,
    cache_seqlens=None,
    conv_state_indices=None,
    num_accept_tokens=None,
    intermediate_conv_window=None,
    intermediate_state_indices=None,
    retrieve_next_token=None,
    retrieve_next_sibling=None,
    retrieve_parent_token=None,
    pad_slot_id: int = -1,
    **_,
):
    """x: [B, dim] or [B, dim, T] -> same shape. Each sequence's window comes from
    ``conv_state[conv_state_indices[i]]`` and is shifted by its T inputs; with
    ``intermediate_conv_window`` every step's window is also kept (verify)."""
    if cache_seqlens is not None or num_accept_tokens is not None or retrieve_next_token is not None:
        raise NotImplementedError("sgl_kernel stand-in: conv update does chains without circular buffers only")
    squeeze = x.dim() == 2
    xs = x[:, :, None] if squeeze else x
    batch, _, steps = xs.shape
    slots = (conv_state_indices.long() if conv_state_indices is not None else torch.arange(batch))[:batch]
    live = slots != pad_slot_id
    width = weight.shape[1]
    window = torch.zeros(batch, xs.shape[1], width - 1, dtype=torch.float32)
    window[live] = conv_state[slots[live]].float()
    out = torch.empty_like(xs)
    for step in range(steps):
        token = xs[:, :, step]
        out[:, :, step] = _activate(_conv_token(window, token, weight, bias), activation).to(out.dtype)
        stored = token.to(conv_state.dtype).float()
        window = torch.cat([window[:, :, 1:], stored[:, :, None]], dim=-1)
        if intermediate_conv_window is not None:
            rows = intermediate_state_indices.long()[:batch]
            keep = live & (rows >= 0)
            intermediate_conv_window[rows[keep], step] = window[keep].to(intermediate_conv_window.dtype)
    conv_state[slots[live]] = window[live].to(conv_state.dtype)
    return out[:, :, 0] if squeeze else out


def causal_conv1d_fn_cpu(
    x,
    weight,
    bias=None,
    conv_states=None,
    query_start_loc=None,
    seq_lens_cpu=None,
    cache_indices=None,
    has_initial_state=None,
    activation="silu",
    pad_slot_id: int = -1,
    **_,
):
    """Prefill: x [dim, T] (sequences concatenated) -> [dim, T]. A sequence starts from
    its pool window if ``has_initial_state`` says so, else from zeros, and leaves its
    last K-1 inputs in the pool."""
    width = weight.shape[1]
    out = torch.empty_like(x)
    for i, (start, end) in enumerate(_segments(query_start_loc, x.shape[1])):
        slot = int(cache_indices[i]) if cache_indices is not None else i
        window = torch.zeros(1, x.shape[0], width - 1, dtype=torch.float32)
        if conv_states is not None and has_initial_state is not None and bool(has_initial_state[i]):
            window = conv_states[slot].float()[None]
        for t in range(start, end):
            token = x[:, t][None]
            out[:, t] = _activate(_conv_token(window, token, weight, bias), activation)[0].to(out.dtype)
            window = torch.cat([window[:, :, 1:], token.float()[:, :, None]], dim=-1)
        if conv_states is not None and slot != pad_slot_id:
            conv_states[slot] = window[0].to(conv_states.dtype)
    return out


# ------------------------------------------------------------------ Qwen3.5's fused helpers
def fused_sigmoid_mul_cpu(input: torch.Tensor, gate: torch.Tensor) -> None:
    """``input *= sigmoid(gate)`` (the attention-output gate), float32 math."""
    input.copy_(input.float() * torch.sigmoid(gate.float()).reshape(input.shape))


def _gemma_rms(x: torch.Tensor, weight: torch.Tensor, eps: float, head_dim: int) -> torch.Tensor:
    rows = x.reshape(-1, head_dim).float()
    normed = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + eps) * (weight.float() + 1.0)
    return normed.to(x.dtype)


def fused_qk_gemma_rmsnorm_cpu(q, k, q_weight, k_weight, eps: float, head_dim: int):
    """Gemma RMSNorm (weight + 1) of every q and k head: ([Tq*H, D], [Tk*Hk, D])."""
    return _gemma_rms(q, q_weight, eps, head_dim), _gemma_rms(k, k_weight, eps, head_dim)


def fused_qk_gemma_rmsnorm_with_gate_cpu(q_gate, k, q_weight, k_weight, eps: float, head_dim: int, num_heads: int):
    """q and the output gate interleaved per head ([q_h, gate_h, ...]): (normed q, normed k, gate)."""
    per_head = q_gate.reshape(q_gate.shape[0], num_heads, 2 * head_dim)
    q, gate = per_head[..., :head_dim], per_head[..., head_dim:]
    return _gemma_rms(q, q_weight, eps, head_dim), _gemma_rms(k, k_weight, eps, head_dim), gate.reshape(-1, head_dim).contiguous()


def fused_qkvzba_split_reshape_cat_contiguous_cpu(mixed_qkvz, mixed_ba, num_heads_qk, num_heads_v, head_qk, head_v):
    """[q | k | v | z] and [b | a] -> (cat(q, k, v), z [T, HV, V], b [T, HV], a [T, HV])."""
    qk, vz = num_heads_qk * head_qk, num_heads_v * head_v
    q, k, v, z = mixed_qkvz.split([qk, qk, vz, vz], dim=-1)
    b, a = mixed_ba.split([num_heads_v, num_heads_v], dim=-1)
    mixed_qkv = torch.cat([q, k, v], dim=-1)
    return mixed_qkv, z.reshape(z.shape[0], num_heads_v, head_v).contiguous(), b.contiguous(), a.contiguous()


TORCH_OPS = (
    "fused_gdn_gating_cpu",
    "fused_sigmoid_gating_delta_rule_update_cpu",
    "fused_sigmoid_mul_cpu",
    "fused_qk_gemma_rmsnorm_cpu",
    "fused_qk_gemma_rmsnorm_with_gate_cpu",
    "fused_qkvzba_split_reshape_cat_contiguous_cpu",
)
MAMBA_OPS = ("causal_conv1d_fn_cpu", "causal_conv1d_update_cpu", "chunk_gated_delta_rule_cpu")


def register() -> None:
    """Bind :data:`TORCH_OPS` as ``torch.ops.sgl_kernel.<name>`` (Python callables, so
    SGLang's keyword calls pass straight through), overriding placeholders."""
    namespace = torch.ops.sgl_kernel
    for name in TORCH_OPS:
        setattr(namespace, name, globals()[name])
