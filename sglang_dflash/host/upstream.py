"""SGLang's own DFLASH on the CPU lane (``SGLANG_DFLASH_BACKEND=upstream``).

For side-by-side runs and as a test oracle. Each lift removes one CPU refusal of
0.5.23's own DFLASH and touches nothing when the device is a GPU.
"""

from __future__ import annotations

import os

_HOOKS = "sglang.srt"


def register_cpu_lifts(registry, hook_type) -> None:
    if os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        return
    from sglang.srt.arg_groups.choices import DRAFT_ATTENTION_BACKEND_CHOICES

    if "torch_native" not in DRAFT_ATTENTION_BACKEND_CHOICES:
        DRAFT_ATTENTION_BACKEND_CHOICES.append("torch_native")  # the list is shared by reference
    _make_record_stream_cpu_safe()
    registry.register(f"{_HOOKS}.arg_groups.speculative_hook._handle_dflash", _upstream_handle_dflash_on_cpu, hook_type.AROUND)
    registry.register(f"{_HOOKS}.models.dflash.DFlashAttention.__init__", _no_triton_qk_norm_rope, hook_type.AFTER)
    registry.register(
        f"{_HOOKS}.model_executor.model_runner.ModelRunner._extend_forward_kwargs",
        _input_embeds_in_model_dtype,
        hook_type.AFTER,
    )
    if os.environ.get(TIMING_ENV) == "1":
        registry.register(f"{_HOOKS}.model_executor.model_runner.ModelRunner.forward", _time_runner_forward, hook_type.AROUND)


# Benchmark-only (SGLANG_DFLASH_TIMING=1): upstream's draft and verify forwards, timed
# on the host. Only meaningful where forwards are synchronous (the CPU lane).
TIMING_ENV = "SGLANG_DFLASH_TIMING"
_UPSTREAM_TIMES = {"draft": [0.0, 0], "verify": [0.0, 0]}


def _time_runner_forward(original, self, forward_batch, *args, **kwargs):
    kind = "draft" if self.is_draft_worker else "verify" if forward_batch.forward_mode.is_target_verify() else None
    if kind is None:
        return original(self, forward_batch, *args, **kwargs)
    import time

    start = time.perf_counter()
    out = original(self, forward_batch, *args, **kwargs)
    _UPSTREAM_TIMES[kind][0] += time.perf_counter() - start
    _UPSTREAM_TIMES[kind][1] += 1
    return out


def upstream_stats() -> dict:
    return {
        f"{kind}_ms_per_step": round(total / count * 1e3, 4) if count else None
        for kind, (total, count) in _UPSTREAM_TIMES.items()
    }


def _upstream_handle_dflash_on_cpu(original, server_args):
    """0.5.23 accepts DFLASH only on cuda/npu/xpu or an out-of-tree platform that says so."""
    import sglang.srt.arg_groups.speculative_hook as hook

    real = hook.current_platform

    class _SaysYes:
        def __getattr__(self, name):
            return getattr(real, name)

        def is_out_of_tree(self):
            return True

        def supports_speculative_algorithm(self, algorithm):
            return True

        def supports_speculative_draft_attention_backend(self, algorithm, backend):
            return backend == "torch_native"

        def get_default_speculative_draft_attention_backend(self, algorithm):
            return "torch_native"

    hook.current_platform = _SaysYes()
    try:
        original(server_args)
    finally:
        hook.current_platform = real


def _make_record_stream_cpu_safe() -> None:
    """``Tensor.record_stream`` is meaningless for CPU tensors but raises on them."""
    import torch

    original = torch.Tensor.record_stream
    if getattr(original, "_sglang_dflash_cpu_safe", False):
        return

    def record_stream(self, stream):
        if self.device.type == "cpu":
            return None
        return original(self, stream)

    record_stream._sglang_dflash_cpu_safe = True
    torch.Tensor.record_stream = record_stream


def _no_triton_qk_norm_rope(result, self, *args, **kwargs):
    """The fused q/k-norm+RoPE path of upstream's drafter is Triton-only."""
    self.use_table_qk_norm_rope = False


def _input_embeds_in_model_dtype(kwargs, self, forward_batch, pp_proxy_tensors=None):
    """0.5.23 casts input embeddings to bfloat16 whatever the model dtype; upstream's
    drafter is fed through input embeddings, so it fails on float32 models."""
    if forward_batch.input_embeds is not None and "input_embeds" in kwargs:
        kwargs["input_embeds"] = forward_batch.input_embeds.to(self.dtype)
    return kwargs
