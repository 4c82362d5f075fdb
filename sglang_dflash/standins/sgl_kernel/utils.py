"""sglang-kernel 0.4.10 `sgl_kernel.utils`: small helpers, implemented."""

from __future__ import annotations

import functools

import torch


def cache_once(fn):
    """Memoize on the call's arguments (torch.compile friendly, as upstream)."""
    results = {}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in results:
            results[key] = fn(*args, **kwargs)
        return results[key]

    return wrapper


@cache_once
def is_arch_support_pdl() -> bool:
    """Programmatic dependent launch needs sm90+ (only FlashInfer's kernels use it here)."""
    if getattr(torch.version, "hip", None) or getattr(torch.version, "musa", None):
        return False
    try:
        major, _ = torch.cuda.get_device_capability(torch.cuda.current_device())
    except Exception:
        return False
    return major >= 9
