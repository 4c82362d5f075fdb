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


# Verify every whole block (the policy off): with the tiny target's weak drafter on a
# CPU the adaptive policy rightly decodes plainly most of the time, and a losslessness
# test must compare multi-token commits, not plain decoding with plain decoding.
FULL_BLOCKS = {"no-speculative-dflash-adaptive": True}


def tiny_full_blocks(target, drafter, **extra) -> dict:
    """``tiny_spec`` verifying whole blocks: the tiny-target losslessness server."""
    return tiny_spec(target, drafter, **FULL_BLOCKS, **extra)
