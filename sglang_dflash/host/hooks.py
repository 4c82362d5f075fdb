"""The plugin's hooks: how ``--speculative-algorithm DFLASH`` reaches this package.

SGLang's plugin loader calls :func:`install` in every process it starts; the hooks make
``SpeculativeAlgorithm.create_worker`` build our worker (``SGLANG_DFLASH_BACKEND=upstream``
keeps SGLang's), validate DFLASH server args and requests our way, capture the target
layers our config names, report our state in ``get_server_info``, add our CLI flags,
and run TARGET_VERIFY batches on the CPU ``torch_native`` attention backend (for both
backends, so upstream can be benchmarked on CPU too). Each hook is a thin wrapper
around a function of :mod:`.entry`, which the source patch calls too.
"""

from __future__ import annotations

import logging
import os

from .disagg import register_cpu_transfer_lift
from .entry import (
    add_dflash_state,
    configure_dflash_capture,
    dflash_disagg_draft_input,
    dflash_request_refusal,
    dflash_worker_class,
    handle_dflash_server_args,
    resolve_dflash_aux_hidden_state,
    torch_native_verify,
    verify_needs_eager,
)
from .cpu_lifts import register_target_lifts
from .upstream import register_cpu_lifts
from .version import OURS, UPSTREAM, SGLangVersionError, check_version, selected_backend

logger = logging.getLogger(__name__)

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
    if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
        HookRegistry.register(f"{_HOOKS}.lora.lora_manager.LoRAManager.__init__", _lora_on_cpu_hook, HookType.BEFORE)
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
    register_target_lifts(HookRegistry, HookType)
    register_cpu_transfer_lift(HookRegistry, HookType)
    if backend == UPSTREAM:
        register_cpu_lifts(HookRegistry, HookType)
        return
    HookRegistry.register(f"{_SPEC}.build_disagg_draft_input", _disagg_draft_input_hook, around)
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
    HookRegistry.register(
        f"{_HOOKS}.model_executor.model_runner_components.attention_backend_setup.configure_aux_hidden_state_capture",
        _configure_capture_hook,
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
    HookRegistry.register(
        f"{_HOOKS}.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.can_run_graph",
        _eager_only_verify_hook,
        around,
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


def _lora_on_cpu_hook(*args, **kwargs):
    """CPU lane: SGLang's LoRA modules may ask for pinned memory (see :mod:`.lora`)."""
    from .lora import lift_pinned_memory_on_cpu

    lift_pinned_memory_on_cpu()


def _create_worker_hook(original, self, server_args):
    worker = dflash_worker_class() if self.is_dflash() else None
    return worker if worker is not None else original(self, server_args)


def _disagg_draft_input_hook(original, self, batch, last_tokens_tensor, future_map):
    if self.is_dflash():
        return dflash_disagg_draft_input(batch, last_tokens_tensor, future_map)
    return original(self, batch, last_tokens_tensor, future_map)


def _check_drafter_first(speculative_algorithm, speculative_draft_model_path, *args, **kwargs):
    """SGLang reads the draft config through transformers before any DFLASH handling;
    parse it ourselves first, so a bad drafter fails with our one-line reason."""
    if (speculative_algorithm or "").upper() == "DFLASH" and speculative_draft_model_path:
        from ..model.config import DFlashConfig

        DFlashConfig.from_pretrained(speculative_draft_model_path)


def _handle_dflash_hook(original, server_args):
    if not handle_dflash_server_args(server_args):
        original(server_args)


def _resolve_aux_hook(original, **kwargs):
    if not resolve_dflash_aux_hidden_state(**kwargs):
        original(**kwargs)


def _configure_capture_hook(original, **kwargs):
    if (
        kwargs.get("dflash_use_aux_hidden_state")
        and not kwargs.get("is_dspark")
        and configure_dflash_capture(kwargs["model"], kwargs["dflash_target_layer_ids"])
    ):
        kwargs["dflash_use_aux_hidden_state"] = False
    return original(**kwargs)


def _validate_request_hook(original, req, enable_overlap):
    if selected_backend() == OURS:
        return dflash_request_refusal(req)
    return original(req, enable_overlap)


def _torch_native_forward_extend_hook(original, self, q, k, v, layer, forward_batch, save_kv_cache=True, **kw):
    if forward_batch.forward_mode.is_target_verify():
        return torch_native_verify(self, q, k, v, layer, forward_batch, save_kv_cache, **kw)
    return original(self, q, k, v, layer, forward_batch, save_kv_cache, **kw)


def _eager_only_verify_hook(original, self, forward_batch):
    if verify_needs_eager(forward_batch):
        return False
    return original(self, forward_batch)


def _internal_state_hook(result, controller, state) -> None:
    add_dflash_state(controller, state)


def _record_request_stats_hook(predict_tokens, processor, result, batch):
    """After SGLang resolved a verify step's tokens (host side): record them per request."""
    if batch.spec_algorithm.is_dflash():
        from .requests import record_step

        record_step(batch.reqs, predict_tokens)
    return predict_tokens


def _summarize_request_stats_hook(result, manager, meta_info, state, customized_info, index, finish_reason):
    if finish_reason is not None:
        from .requests import summarize_meta_info

        summarize_meta_info(meta_info)


def _add_cli_args_hook(result, parser) -> None:
    from ..options import add_cli_args

    add_cli_args(parser)


def _from_cli_args_hook(cls, args):
    """Our flags are not ServerArgs fields: hand them to the scheduler via the environment."""
    from ..options import export_cli_args

    export_cli_args(args)
