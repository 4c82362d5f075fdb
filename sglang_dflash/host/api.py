"""The SGLang 0.5.23 internals the host layer builds on, by name.

Resolved lazily (PEP 562): the plugin imports the host layer in every SGLang process,
and most of those never run a worker. Modules of this package outside ``host/`` never
import SGLang; they reach it through the host layer's typed views.
"""

from __future__ import annotations

from typing import Any

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
    "RelayPayload": "sglang.srt.managers.overlap_utils",
    "graph_capture": "sglang.srt.distributed.parallel_state",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
