"""CUDA fast paths for the drafter: Triton kernels, FlashInfer attention, CUDA graphs.

Each has a portable twin it must match numerically (``model.draft_attention``,
``model.drafter.inject``, ``spec.accept``, ``spec.proposer``). Importing this package loads neither
triton nor flashinfer nor CUDA: the names below resolve lazily, and the ``*_available``
helpers say up front whether a path can run, so the worker picks its backend once
instead of catching failures at run time.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

_LAZY = {
    "store_context_kv": "triton_kernels",
    "store_context_kv_reference": "triton_kernels",
    "FusedContextInjector": "triton_kernels",
    "greedy_commit": "triton_kernels",
    "fused_greedy_acceptance": "triton_kernels",
    "greedy_commit_reference": "triton_kernels",
    "GreedyCommit": "triton_kernels",
    "FlashInferDraftAttention": "flashinfer_attention",
    "FlashInferUnavailable": "flashinfer_attention",
    "GraphedProposer": "cuda_graph",
    "DEFAULT_GRAPH_BATCH_SIZES": "cuda_graph",
}

__all__ = sorted(_LAZY) + ["available", "cuda_available", "flashinfer_available", "triton_available"]


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def cuda_available() -> bool:
    """A CUDA device torch can use (imports torch, not flashinfer or triton)."""
    import torch

    return torch.cuda.is_available()


def triton_available() -> bool:
    """Triton is installed (its kernels still need CUDA or ``TRITON_INTERPRET=1``)."""
    return _has_module("triton")


def flashinfer_available() -> bool:
    """flashinfer is installed; it is not imported here (importing it can JIT)."""
    return _has_module("flashinfer")


def available() -> dict[str, bool]:
    """What the GPU paths need, by name: ``cuda``, ``triton``, ``flashinfer``, and the
    derived ``kernels`` (Triton kernels runnable) and ``flashinfer_attention``."""
    cuda = cuda_available()
    triton, flashinfer = triton_available(), flashinfer_available()
    return {
        "cuda": cuda,
        "triton": triton,
        "flashinfer": flashinfer,
        "kernels": cuda and triton,
        "flashinfer_attention": cuda and flashinfer,
    }


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
