"""CPU-lane lifts that let SGLang 0.5.23's CPU engine serve sliding-window and sink targets.

Without them no-speculation itself cannot serve gpt-oss or Gemma-4 on a CPU, so a
speculative run would have nothing to be compared with. Each lift is registered only
when ``SGLANG_USE_CPU_ENGINE=1`` and acts only on CPU launches, for every SGLang
process (speculative or not):

* **launch**: ``handle_model_specific_adjustments`` asserts that gpt-oss and Gemma-4 run
  on a GPU attention backend, because ``torch_native`` lacks sinks; during that call
  it is told torch_native is acceptable for those two architectures;
* **attention sinks**: ``torch_native``'s extend/decode take no ``sinks`` (gpt-oss
  crashes at its first prefill); layers with sinks run through the same attention
  the verify path uses (:func:`.torch_native_verify.verify_attention`);
* **gated RMSNorm** of linear-attention layers (Qwen3-Next, Qwen3.5): the CPU path of
  ``fla/fused_norm_gate.py`` and ``fla/layernorm_gated.py`` exists only on CPUs with AMX
  (``torch.ops.sgl_kernel.fused_rmsnorm_gated_cpu``); elsewhere they launch Triton
  kernels, which have no CPU driver. CPU tensors take :func:`gated_rmsnorm`;
* **gated shared expert** (Qwen2-MoE-style MoE layers, Qwen3-Next): the shared expert's
  sigmoid gate is a Triton kernel (``elementwise._launch_fused_gate_sigmoid_mul``) off
  AMX CPUs; CPU tensors compute it in torch;
* **recurrent-state commit**: the scatter SGLang's hybrid backend runs after a verify
  (``scatter_mamba_states_after_mtp_verify``) is a CUDA/XPU-only Triton kernel; CPU
  tensors take its torch twin (:func:`.recurrent_state.scatter_committed_states`);
* **hybrid SWA pools**: ``torch_native`` writes a sliding layer's K/V to its SWA slots
  but reads them back by full-pool ids, which is right only until the SWA allocator
  reuses a slot; those layers read through the full->SWA map here as well.
"""

from __future__ import annotations

import os

import torch

from .torch_native_verify import swa_translation, verify_attention, window_left_of

_HOOKS = "sglang.srt"
_BACKEND = f"{_HOOKS}.layers.attention.torch_native_backend.TorchNativeAttnBackend"
# Architectures whose launch asserts a GPU attention backend only because of the
# sliding windows and sinks torch_native is given here.
WINDOW_TARGETS = ("GptOssForCausalLM", "Gemma4ForCausalLM")


def register_target_lifts(registry, hook_type) -> None:
    if os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        return
    registry.register(
        f"{_HOOKS}.arg_groups.model_hook.handle_model_specific_adjustments", _accept_torch_native, hook_type.AROUND
    )
    registry.register(f"{_BACKEND}.forward_extend", _extend_with_sinks_and_swa, hook_type.AROUND)
    registry.register(f"{_BACKEND}.forward_decode", _decode_with_sinks_and_swa, hook_type.AROUND)
    registry.register(
        "sglang.kernels.ops.elementwise.elementwise._launch_fused_gate_sigmoid_mul", _shared_expert_gate_on_cpu,
        hook_type.AROUND,
    )
    fla = "sglang.kernels.ops.attention.fla"
    registry.register(f"{fla}.fused_norm_gate.FusedRMSNormGated.forward", _fused_gated_norm_on_cpu, hook_type.AROUND)
    registry.register(f"{fla}.layernorm_gated.RMSNorm.forward", _gated_norm_on_cpu, hook_type.AROUND)
    registry.register(
        "sglang.kernels.ops.mamba.mamba_state_scatter_triton.scatter_mamba_states_after_mtp_verify",
        _scatter_states_on_cpu,
        hook_type.AROUND,
    )


def _accept_torch_native(original, server_args):
    import sglang.srt.arg_groups.model_hook as model_hook

    cfg = model_hook.resolving_view(server_args)
    if not str(cfg.device or "").startswith("cpu") or _architecture(server_args) not in WINDOW_TARGETS:
        return original(server_args)
    real = model_hook.attention_backends_of

    def reported(view):
        return tuple("triton" if name == "torch_native" else name for name in real(view))

    model_hook.attention_backends_of = reported
    try:
        return original(server_args)
    finally:
        model_hook.attention_backends_of = real


def _architecture(server_args) -> str:
    from sglang.srt.arg_groups.model_override_base import model_config_of

    try:
        return model_config_of(server_args).hf_config.architectures[0]
    except Exception:  # no model config to key on (e.g. an instance connector)
        return ""


def _needs_lift(backend, layer, extra: dict) -> bool:
    return extra.get("sinks") is not None or swa_translation(backend.token_to_kv_pool, layer.layer_id) is not None


def _extend_with_sinks_and_swa(original, self, q, k, v, layer, forward_batch, save_kv_cache=True, **extra):
    if forward_batch.forward_mode.is_target_verify() or not _needs_lift(self, layer, extra):
        return original(self, q, k, v, layer, forward_batch, save_kv_cache, **extra)
    prefix = forward_batch.extend_prefix_lens
    return _per_request(self, q, k, v, layer, forward_batch, save_kv_cache, extra, prefix, forward_batch.extend_seq_lens)


def _decode_with_sinks_and_swa(original, self, q, k, v, layer, forward_batch, save_kv_cache=True, **extra):
    if not _needs_lift(self, layer, extra):
        return original(self, q, k, v, layer, forward_batch, save_kv_cache, **extra)
    prefix = forward_batch.seq_lens - 1
    return _per_request(self, q, k, v, layer, forward_batch, save_kv_cache, extra, prefix, torch.ones_like(prefix))


def _per_request(backend, q, k, v, layer, fb, save_kv_cache, extra, prefix_lens, new_lens):
    """Causal attention of each request's new tokens over its slot row (prefix, then
    the new tokens), with the layer's window, sinks and SWA slot map."""
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    from .torch_native_verify import check_layer_supported

    sinks = check_layer_supported(layer, dict(extra))
    pool = backend.token_to_kv_pool
    if save_kv_cache and k is not None and v is not None:
        pool.set_kv_buffer(layer, KVWriteLoc(fb.out_cache_loc, backend.swa_out_cache_loc), k, v)
    q = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
    out = q.new_empty(q.shape[0], layer.tp_q_head_num, layer.v_head_dim)
    k_cache, v_cache = pool.get_key_buffer(layer.layer_id), pool.get_value_buffer(layer.layer_id)
    slot_rows = backend.req_to_token_pool.req_to_token
    translate = swa_translation(pool, layer.layer_id)
    start = 0
    for i, (p, n) in enumerate(zip(prefix_lens.tolist(), new_lens.tolist())):
        rows = slice(start, start + n)
        out[rows] = verify_attention(
            q[None, rows],
            k_cache,
            v_cache,
            kv_slots=slot_rows[fb.req_pool_indices[i].long()][None],
            prefix_lens=torch.tensor([p], device=q.device),
            causal=True,
            scale=layer.scaling,
            window_left=window_left_of(layer),
            sinks=sinks,
            translate=translate,
        )[0]
        start += n
    return out.reshape(q.shape[0], layer.tp_q_head_num * layer.v_head_dim)


def _scatter_states_on_cpu(original, mamba_caches, state_indices, steps, track_indices, track_steps, src_indices_raw=None):
    if mamba_caches.temporal.device.type != "cpu":
        return original(mamba_caches, state_indices, steps, track_indices, track_steps, src_indices_raw=src_indices_raw)
    from .recurrent_state import scatter_committed_states

    scatter_committed_states(mamba_caches, state_indices, steps, track_indices, track_steps, src_indices_raw)


def gated_rmsnorm(x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor, eps: float, activation: str) -> torch.Tensor:
    """``rms_norm(x) * weight * act(gate)`` in float32, rounded once (the norm before the gate)."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()
    act = torch.sigmoid if activation == "sigmoid" else torch.nn.functional.silu
    return (out * act(gate.float())).to(x.dtype)


def _fused_gated_norm_on_cpu(original, self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
    if x.device.type != "cpu" or residual is not None or prenorm or self.weight is None:
        return original(self, x, g, residual=residual, prenorm=prenorm, residual_in_fp32=residual_in_fp32)
    return gated_rmsnorm(x, self.weight, g, self.eps, self.activation)


def _gated_norm_on_cpu(original, self, x, z=None):
    if x.device.type != "cpu" or z is None or not self.norm_before_gate or self.group_size is not None:
        return original(self, x, z)
    return gated_rmsnorm(x, self.weight, z, self.eps, self.activation)


def _shared_expert_gate_on_cpu(original, hidden_states, gate_weight, shared_output, output, *, do_add: bool):
    """``output (+)= sigmoid(hidden . gate_weight) * shared_output`` per token, float32 math."""
    if hidden_states.device.type != "cpu":
        return original(hidden_states, gate_weight, shared_output, output, do_add=do_add)
    gate = torch.sigmoid(hidden_states.float() @ gate_weight.float())[:, None]
    result = gate * shared_output.float()
    if do_add:
        result = result + output.float()
    output.copy_(result)
