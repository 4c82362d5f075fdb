"""Canonical server configurations, shared across test files so the session pool
starts each once (a CPU-lane server start costs ~20-40 s)."""

from __future__ import annotations

CLIENTS = 32


def tiny_plain(target, **extra) -> dict:
    return {"model-path": target, "page-size": 1, "chunked-prefill-size": 16, "max-running-requests": CLIENTS, **extra}


def tiny_spec(target, drafter, **extra) -> dict:
    """Our DFLASH on the tiny target: block 8, small chunked prefill, metrics on."""
    return {
        **tiny_plain(target),
        "speculative-algorithm": "DFLASH",
        "speculative-draft-model-path": drafter,
        "speculative-num-draft-tokens": 8,
        "enable-metrics": True,
        **extra,
    }
