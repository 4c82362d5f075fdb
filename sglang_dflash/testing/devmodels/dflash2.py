"""Random DFlash2 drafters built in code, in the z-lab layout, for parity with SGLang
and the reference and for every code path (a trained one that really accepts:
:func:`~.tiny_trained.train_tiny_dflash2_drafter`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from .tiny import drafter_config


def build_random_dflash2_drafter(
    out: str | Path,
    *,
    target: str | Path,
    num_layers: int = 2,
    block_size: int = 8,
    conv_kernel_size: int = 2,
    conv_group_size: int = 16,
    selector_rank: int = 8,
    selector_top_k: int = 16,
    target_layer_ids: Optional[Sequence[int]] = None,
    layer_types: Optional[Sequence[str]] = None,
    sliding_window: Optional[int] = 2048,
    is_causal: Optional[bool] = False,
    output_multiplier: Optional[float] = None,
    final_logit_softcapping: Optional[float] = None,
    architecture: str = "DFlash2DraftModel",
    init_std: float = 0.08,
    codebook_std: float = 0.5,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """A random DFlash2 drafter in the z-lab layout: the published shape (two-tap
    convolutions in groups of 16 channels, a selector over the top 16 candidates,
    block 8, bidirectional sliding-window layers, optional output multiplier and
    soft-capping), scaled down to the tiny target. Convolution kernels are the
    identity plus noise and the codebooks large enough that both really act."""
    from ...model.checkpoint import save_drafter
    from ...model.config import SLIDING_ATTENTION, DFlashConfig
    from ...model.drafter import DFlashDrafter

    selector = {
        "conv_kernel_size": conv_kernel_size,
        "conv_group_size": conv_group_size,
        "selector_rank": selector_rank,
        "selector_top_k": selector_top_k,
    }
    if output_multiplier is not None:
        selector["output_multiplier"] = output_multiplier
    if final_logit_softcapping is not None:
        selector["final_logit_softcapping"] = final_logit_softcapping
    types = list(layer_types or [SLIDING_ATTENTION] * num_layers)
    raw = drafter_config(target, num_layers=num_layers, block_size=block_size, target_layer_ids=target_layer_ids,
                         layer_types=types, sliding_window=sliding_window, dtype=dtype, architecture=architecture,
                         dflash_fields=selector)
    if is_causal is not None:
        raw["is_causal"] = is_causal
    generator = torch.Generator().manual_seed(seed)
    drafter = DFlashDrafter(DFlashConfig.from_dict(raw)).init_weights(init_std, generator=generator)
    with torch.no_grad():
        for name, param in drafter.named_parameters():
            if name.endswith("base_kernel"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
            elif name.endswith("_codebook"):
                param.normal_(0.0, codebook_std, generator=generator)
    return save_drafter(drafter, out, dtype=getattr(torch, dtype))
