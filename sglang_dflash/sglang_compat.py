"""Everything specific to SGLang 0.5.23: the one module to change for the next release.

The rest of the package imports SGLang symbols from here only. This module

* checks the installed SGLang version and refuses loudly on any other;
* re-exports the SGLang internals the worker builds on (spec-v2 worker base, batch
  structures, KV allocation helpers);
* installs the plugin hooks that make ``--speculative-algorithm DFLASH`` create *our*
  worker (``SGLANG_DFLASH_BACKEND=upstream`` keeps SGLang's), validate DFLASH server
  args and requests our way, capture the target layers our config names, and run
  TARGET_VERIFY batches on the CPU ``torch_native`` attention backend, which 0.5.23
  cannot do by itself (for both backends, so upstream can be benchmarked on CPU too).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

from . import SGLANG_VERSION

logger = logging.getLogger(__name__)

BACKEND_ENV = "SGLANG_DFLASH_BACKEND"
OURS, UPSTREAM = "sglang-dflash", "upstream"


class SGLangVersionError(RuntimeError):
    """The installed SGLang is not the release this package's glue targets."""


def installed_sglang_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("sglang")
    except Exception:
        return None


def check_version() -> None:
    found = installed_sglang_version()
    if found != SGLANG_VERSION:
        raise SGLangVersionError(
            f"sglang-dflash supports SGLang {SGLANG_VERSION} only, found {found}; "
            f"install sglang=={SGLANG_VERSION} or set {BACKEND_ENV}={UPSTREAM} to use SGLang's built-in DFLASH"
        )


def selected_backend() -> str:
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if value in ("", OURS, "ours", "sglang_dflash"):
        return OURS
    if value == UPSTREAM:
        return UPSTREAM
    raise ValueError(f"{BACKEND_ENV}={value!r} is not one of {OURS!r}, {UPSTREAM!r}")


# --------------------------------------------------------------------------------------
# SGLang internals the worker builds on. Resolved lazily (PEP 562): this module is
# imported by the plugin in every SGLang process, and most of those never run a worker.
# --------------------------------------------------------------------------------------
_EXPORTS = {
    "BaseSpecWorker": "sglang.srt.speculative.base_spec_worker",
    "SpecInput": "sglang.srt.speculative.spec_info",
    "SpecInputType": "sglang.srt.speculative.spec_info",
    "SpeculativeAlgorithm": "sglang.srt.speculative.spec_info",
    "ScheduleBatch": "sglang.srt.managers.schedule_batch",
    "GenerationBatchResult": "sglang.srt.managers.utils",
    "LogitsProcessorOutput": "sglang.srt.layers.logits_processor",
    "CaptureHiddenMode": "sglang.srt.model_executor.forward_batch_info",
    "ForwardBatch": "sglang.srt.model_executor.forward_batch_info",
    "ForwardMode": "sglang.srt.model_executor.forward_batch_info",
    "alloc_for_spec_decode": "sglang.srt.mem_cache.allocation",
    "get_spec": "sglang.srt.runtime_context",
    "get_parallel": "sglang.srt.runtime_context",
    "tensor_model_parallel_all_gather": "sglang.srt.distributed",
    "graph_capture": "sglang.srt.distributed.parallel_state",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


# --------------------------------------------------------------------------------------
# Entry points. The plugin hooks below and the source patch in ``patches/`` call the
# same functions, so both ways of enabling this package behave identically.
# --------------------------------------------------------------------------------------
def dflash_worker_class() -> Optional[type]:
    """Our worker class for DFLASH, or None when the upstream backend is selected."""
    if selected_backend() != OURS:
        return None
    from .worker import DFlashWorker

    return DFlashWorker


def handle_dflash_server_args(server_args) -> bool:
    """Validate/resolve DFLASH server args our way; False leaves them to upstream."""
    if selected_backend() != OURS:
        return False
    _handle_dflash(server_args)
    return True


def resolve_dflash_aux_hidden_state(**kwargs) -> bool:
    """Configure the target's feature capture from our config; False leaves it to upstream."""
    if selected_backend() != OURS:
        return False
    _resolve_dflash_aux_hidden_state(**kwargs)
    return True


def dflash_request_refusal(req) -> Optional[str]:
    """Why our worker refuses this request (the scheduler answers HTTP 400), or None."""
    from .request_support import unsupported_reason

    return unsupported_reason(req)


def torch_native_verify(backend, q, k, v, layer, forward_batch, save_kv_cache: bool = True):
    """TARGET_VERIFY attention on the torch_native backend (which 0.5.23 lacks)."""
    return _torch_native_verify(backend, q, k, v, layer, forward_batch, save_kv_cache)


def add_dflash_state(controller, state) -> None:
    """``get_server_info()["internal_states"][i]["dflash"]``: which DFLASH backend runs,
    what it loaded, and the KV pool counts tests use to prove nothing leaks."""
    scheduler = controller.scheduler
    if not scheduler.spec_algorithm.is_dflash():
        return
    worker = scheduler.draft_worker
    info = worker.describe() if hasattr(worker, "describe") else {"backend": UPSTREAM, "stats": _upstream_stats()}
    info["kv_pool"] = {
        "max_total_num_tokens": int(scheduler.max_total_num_tokens),
        "available": int(scheduler.token_to_kv_pool_allocator.available_size()),
        "evictable": int(scheduler.tree_cache.evictable_size()),
        "protected": int(scheduler.tree_cache.protected_size()),
        "free_req_slots": len(scheduler.req_to_token_pool.free_slots),
        "req_slots": int(scheduler.req_to_token_pool.size),
    }
    state["dflash"] = info


# --------------------------------------------------------------------------------------
# Plugin hooks
# --------------------------------------------------------------------------------------
_HOOKS = "sglang.srt"
_SPEC = f"{_HOOKS}.speculative.spec_info.SpeculativeAlgorithm"


def install() -> None:
    """Register the hooks; SGLang applies them after every plugin has run."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    try:
        check_version()
    except SGLangVersionError as exc:
        logger.error("%s", exc)
        _register_refusal(HookRegistry, HookType, str(exc))
        return
    backend = selected_backend()
    logger.info("sglang-dflash: DFLASH backend = %s", backend)
    around = HookType.AROUND
    HookRegistry.register(f"{_SPEC}.create_worker", _create_worker_hook, around)
    HookRegistry.register(
        f"{_HOOKS}.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend",
        _torch_native_forward_extend_hook,
        around,
    )
    HookRegistry.register(
        f"{_HOOKS}.managers.scheduler_components.internal_state.SchedulerInternalStateController._add_speculative",
        _internal_state_hook,
        HookType.AFTER,
    )
    if backend == UPSTREAM:
        _register_upstream_cpu_lifts(HookRegistry, HookType)
        return
    HookRegistry.register(f"{_HOOKS}.arg_groups.speculative_hook._handle_dflash", _handle_dflash_hook, around)
    HookRegistry.register(
        f"{_HOOKS}.arg_groups.speculative_hook._resolve_speculative_algorithm_alias",
        _check_drafter_first,
        HookType.BEFORE,
    )
    HookRegistry.register(
        f"{_HOOKS}.model_executor.model_runner_components.spec_aux_hidden_state._resolve_dflash_aux_hidden_state",
        _resolve_aux_hook,
        around,
    )
    HookRegistry.register(f"{_HOOKS}.speculative.dflash_utils.validate_dflash_request", _validate_request_hook, around)
    HookRegistry.register(
        f"{_HOOKS}.managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor._resolve_spec_v2_tokens",
        _record_request_stats_hook,
        HookType.AFTER,
    )
    HookRegistry.register(
        f"{_HOOKS}.managers.tokenizer_manager.TokenizerManager.update_request_meta_info",
        _summarize_request_stats_hook,
        HookType.AFTER,
    )
    HookRegistry.register(f"{_HOOKS}.server_args.ServerArgs.add_cli_args", _add_cli_args_hook, HookType.AFTER)
    HookRegistry.register(f"{_HOOKS}.server_args.ServerArgs.from_cli_args", _from_cli_args_hook, HookType.BEFORE)


def _register_refusal(registry, hook_type, message: str) -> None:
    """On a foreign SGLang, make DFLASH fail at launch instead of silently running upstream."""

    def refuse(original, self, *args, **kwargs):
        if getattr(self, "is_dflash", lambda: False)() and selected_backend() == OURS:
            raise SGLangVersionError(message)
        return original(self, *args, **kwargs)

    registry.register(f"{_SPEC}.handle_server_args", refuse, hook_type.AROUND)
    registry.register(f"{_SPEC}.create_worker", refuse, hook_type.AROUND)


def _create_worker_hook(original, self, server_args):
    worker = dflash_worker_class() if self.is_dflash() else None
    return worker if worker is not None else original(self, server_args)


def _check_drafter_first(speculative_algorithm, speculative_draft_model_path, *args, **kwargs):
    """SGLang reads the draft config through transformers before any DFLASH handling;
    parse it ourselves first, so a bad drafter fails with our one-line reason."""
    if (speculative_algorithm or "").upper() == "DFLASH" and speculative_draft_model_path:
        from .config import DFlashConfig

        DFlashConfig.from_pretrained(speculative_draft_model_path)


def _handle_dflash_hook(original, server_args):
    if not handle_dflash_server_args(server_args):
        original(server_args)


def _resolve_aux_hook(original, **kwargs):
    if not resolve_dflash_aux_hidden_state(**kwargs):
        original(**kwargs)


def _validate_request_hook(original, req, enable_overlap):
    if selected_backend() == OURS:
        return dflash_request_refusal(req)
    return original(req, enable_overlap)


def _torch_native_forward_extend_hook(original, self, q, k, v, layer, forward_batch, save_kv_cache=True, **kw):
    if forward_batch.forward_mode.is_target_verify():
        return torch_native_verify(self, q, k, v, layer, forward_batch, save_kv_cache)
    return original(self, q, k, v, layer, forward_batch, save_kv_cache, **kw)


def _internal_state_hook(result, controller, state) -> None:
    add_dflash_state(controller, state)


def _record_request_stats_hook(predict_tokens, processor, result, batch):
    """After SGLang resolved a verify step's tokens (host side): record them per request."""
    if batch.spec_algorithm.is_dflash():
        from .request_stats import record_step

        record_step(batch.reqs, predict_tokens)
    return predict_tokens


def _summarize_request_stats_hook(result, manager, meta_info, state, customized_info, index, finish_reason):
    from .request_stats import POSITIONS, complete_positions, summarize

    if finish_reason is not None and POSITIONS in meta_info:
        meta_info[POSITIONS] = positions = complete_positions(meta_info[POSITIONS], meta_info["completion_tokens"])
        meta_info.update(summarize(positions))


def _add_cli_args_hook(result, parser) -> None:
    from .options import add_cli_args

    add_cli_args(parser)


def _from_cli_args_hook(cls, args):
    """Our flags are not ServerArgs fields: hand them to the scheduler via the environment."""
    from .options import export_cli_args

    export_cli_args(args)


# --------------------------------------------------------------------------------------
# Server args: our DFLASH validation and resolution (replaces upstream's _handle_dflash)
# --------------------------------------------------------------------------------------
SUPPORTED_DEVICES = ("cuda", "cpu")
DRAFTER_ATTENTION_BACKENDS = ("torch_native", "flashinfer")


def _handle_dflash(server_args) -> None:
    """Validate a DFLASH launch for our worker; every refusal is one line saying what to change."""
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view
    from sglang.srt.runtime_context import attn_dp_enabled_of

    from .config import DFlashConfig
    from .options import DFlashOptions

    cfg = resolving_view(server_args)
    source = "sglang_dflash"
    device = str(cfg.device or "cuda")
    if not device.startswith(SUPPORTED_DEVICES):
        raise ValueError(f"sglang-dflash runs DFLASH on CUDA or CPU, not device {device!r}")
    if attn_dp_enabled_of(cfg):
        raise ValueError("sglang-dflash does not support --enable-dp-attention with DFLASH yet; drop that flag")
    if cfg.pp_size != 1:
        raise ValueError(f"sglang-dflash supports DFLASH with --pp-size 1 only, got {cfg.pp_size}")
    if cfg.speculative_draft_model_path is None:
        raise ValueError("DFLASH needs --speculative-draft-model-path (a DFlash drafter checkpoint)")
    if getattr(cfg, "enable_lora", False):
        raise ValueError("sglang-dflash does not support LoRA adapters with DFLASH yet")
    draft = DFlashConfig.from_pretrained(cfg.speculative_draft_model_path)
    _validate_against_target(cfg, draft)
    options = DFlashOptions.from_env()
    block, width = _resolve_block_and_width(cfg, draft, options)
    if options.verify_len is not None and options.verify_len > block:
        raise ValueError(f"--speculative-dflash-verify-len {options.verify_len} exceeds the block size {block}")
    attn = cfg.speculative_draft_attention_backend
    if attn is not None and attn not in DRAFTER_ATTENTION_BACKENDS:
        raise ValueError(
            f"--speculative-draft-attention-backend {attn!r} is not a sglang-dflash drafter backend; "
            f"use one of {list(DRAFTER_ATTENTION_BACKENDS)}"
        )
    resolved: dict[str, Any] = dict(
        speculative_num_draft_tokens=width, speculative_dflash_block_size=block, speculative_num_steps=1
    )
    if cfg.speculative_eagle_topk is None:
        resolved["speculative_eagle_topk"] = 1
    if cfg.max_running_requests is None:
        resolved["max_running_requests"] = 48
    if device == "cpu" and not cfg.disable_overlap_schedule:
        resolved["disable_overlap_schedule"] = True  # as SGLang does for every spec algorithm on CPU
    if getattr(cfg, "enable_mixed_chunk", False):
        logger.warning("sglang-dflash: --enable-mixed-chunk is not supported with DFLASH; disabling it")
        resolved["enable_mixed_chunk"] = False
    declare_resolution(server_args, source, **resolved)


def _validate_against_target(cfg, draft) -> None:
    """Hidden size, vocabulary and layer range, checked at launch rather than in the scheduler."""
    from sglang.srt.utils.hf_transformers_utils import get_config

    target = get_config(cfg.model_path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    text = getattr(target, "text_config", None) or target
    draft.validate_target(
        hidden_size=int(text.hidden_size), vocab_size=int(text.vocab_size), num_layers=int(text.num_hidden_layers)
    )


def _resolve_block_and_width(cfg, draft, options) -> tuple[int, int]:
    """(block size B the drafter runs, verify width W = nodes per verify).

    A chain verifies the block: W == B, and the two flags naming it must agree. A top-K
    tree takes the block from --speculative-dflash-block-size (or the checkpoint) and
    its node budget from --speculative-num-draft-tokens (default 2B); it always holds
    the top-1 chain, so W >= B.
    """
    alias, tokens = cfg.speculative_dflash_block_size, cfg.speculative_num_draft_tokens
    if options.tree:
        block = int(alias if alias is not None else draft.block_size)
        width = int(tokens if tokens is not None else 2 * block)
        if width < block:
            raise ValueError(
                f"tree verification needs --speculative-num-draft-tokens (node budget {width}) >= "
                f"the block size {block}: the tree always contains the top-1 chain"
            )
    else:
        if alias is not None and tokens is not None and int(alias) != int(tokens):
            raise ValueError(
                f"--speculative-dflash-block-size {alias} and --speculative-num-draft-tokens {tokens} differ; "
                "for DFLASH they name the same block size"
            )
        block = width = int(alias if alias is not None else tokens if tokens is not None else draft.block_size)
    if block < 2:
        raise ValueError(f"DFLASH block size must be >= 2 (a bonus token plus drafts), got {block}")
    return block, width


def _resolve_dflash_aux_hidden_state(*, config, server_args, model_config, spec_algorithm, is_draft_worker) -> None:
    """Tell the target runner which layers to capture, from *our* config parser.

    SGLang's ``set_dflash_layers_to_capture`` turns these DFlash ids into capture
    points; the worker checks at start-up that the points it installed equal
    :func:`sglang_dflash.config.capture_points`, so a changed convention fails loudly.
    """
    if not spec_algorithm.is_dflash() or is_draft_worker:
        return
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.runtime_context import get_spec

    from .config import DFlashConfig

    num_layers = int(model_config.hf_text_config.num_hidden_layers)
    draft = DFlashConfig.from_pretrained(get_spec().speculative_draft_model_path, target_num_layers=num_layers)
    config.dflash_use_aux_hidden_state = True
    config.dflash_draft_num_layers = draft.num_layers
    config.dflash_target_layer_ids = list(draft.target_layer_ids)
    config.draft_kv_num_layers = draft.num_layers
    config.draft_model_config = ModelConfig.from_server_args(
        server_args,
        model_path=get_spec().speculative_draft_model_path,
        model_revision=get_spec().speculative_draft_model_revision,
        is_draft_model=True,
    )


# --------------------------------------------------------------------------------------
# TARGET_VERIFY on the CPU torch_native attention backend
# --------------------------------------------------------------------------------------
def _torch_native_verify(backend, q, k, v, layer, fb, save_kv_cache: bool):
    """Fixed-width verify/draft block: each request's N queries see its committed prefix
    (``seq_lens``) and the block; causal within the block unless the layer is
    encoder-only (a drafter) or the spec input carries a tree mask."""
    import torch
    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    from .verify_attention import verify_attention

    if save_kv_cache and k is not None and v is not None:
        backend.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(fb.out_cache_loc, backend.swa_out_cache_loc), k, v)
    bs = fb.seq_lens.shape[0]
    n = q.shape[0] // bs
    causal = layer.attn_type != AttentionType.ENCODER_ONLY
    out = verify_attention(
        q.view(bs, n, layer.tp_q_head_num, layer.qk_head_dim),
        backend.token_to_kv_pool.get_key_buffer(layer.layer_id),
        backend.token_to_kv_pool.get_value_buffer(layer.layer_id),
        kv_slots=backend.req_to_token_pool.req_to_token[fb.req_pool_indices.long()],
        prefix_lens=fb.seq_lens,
        causal=causal,
        tree_mask=getattr(fb.spec_info, "custom_mask", None),
        scale=layer.scaling,
    )
    return out.reshape(q.shape[0], layer.tp_q_head_num * layer.v_head_dim).to(q.dtype)


# --------------------------------------------------------------------------------------
# Upstream DFLASH on the CPU lane (SGLANG_DFLASH_BACKEND=upstream), for side-by-side runs
# and as a test oracle. Each lift removes one CPU refusal of 0.5.23's own DFLASH and
# touches nothing when the device is a GPU.
# --------------------------------------------------------------------------------------
def _register_upstream_cpu_lifts(registry, hook_type) -> None:
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


def _upstream_stats() -> dict:
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
