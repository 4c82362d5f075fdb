"""Starting weights for a freshly trained drafter.

``normal``: Normal(0, 0.02) linears and unit norms (the drafter's final norm scales
like the target's, since both feed the same lm_head).

``target`` (warm start): a drafter layer is a decoder layer of the target's width, so
it can start as one. Drafter layer ``i`` copies target layer ``src + i`` where ``src``
is the layer right after the deepest captured one (``target_layer_ids`` name layer
*outputs*, so feature ``d`` is exactly what layer ``d + 1`` reads). ``fc`` starts as
the identity on that feature's slice (plus small noise on the others, so their
gradients are not all equal) and ``hidden_norm`` as the source layer's input norm:
the injected context K/V then start as the target's own K/V at that depth, up to that
noise (a Llama-style target has no per-head q/k norms: the drafter's start as unit
norms; a Qwen3-style target's are copied). On SmolLM2-135M one 3,500-step run from
here reaches held-out tau 2.10 where 3,000 steps from ``normal`` reached 1.87 (same
data, batches and schedule shape).

``auto`` takes ``target`` when the shapes allow it, else ``normal``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..model.config import DFlashConfig
from ..model.drafter import DFlashDrafter

INITS = ("auto", "target", "normal")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")
_QK_NORMS = ("q_norm", "k_norm")


def init_drafter(config: DFlashConfig, target, seed: int, how: str = "normal") -> DFlashDrafter:
    """A new drafter for ``target``, initialised per ``how`` (one of :data:`INITS`)."""
    if how not in INITS:
        raise ValueError(f"--init must be one of {', '.join(INITS)}, not {how!r}")
    torch.manual_seed(seed)
    drafter = DFlashDrafter(config).init_weights(0.02)
    with torch.no_grad():
        final_norm = _final_norm_scale(target)
        if final_norm is not None and final_norm.shape == drafter.norm.weight.shape:
            drafter.norm.weight.copy_(final_norm)
        if how != "normal":
            why = warm_start_problem(config, target)
            if why is None:
                _warm_start(drafter, target)
            elif how == "target":
                raise ValueError(f"--init target: {why}")
    return drafter


def warm_start_problem(config: DFlashConfig, target) -> Optional[str]:
    """Why the drafter cannot start as the target's layers, or None if it can."""
    layers = _decoder_layers(target)
    if layers is None:
        return f"{type(target).__name__} exposes no decoder layers (model.layers)"
    norm = getattr(_decoder(target), "norm", None)
    if getattr(norm, "weight", None) is not None and not _is_plain_rmsnorm(norm):
        return f"{type(target).__name__}'s norms are not plain RMSNorms (Gemma-style: they scale by 1 + weight)"
    for i, (src, dst) in enumerate(zip(source_layers(config, len(layers)), DFlashDrafter(config).layers)):
        have, want = _layer_tensors(layers[src]), _layer_tensors(dst)
        if have is None:
            return f"target layer {src} is not a q/k/v/o + gate/up/down decoder layer"
        bad = [k for k in want if k not in _QK_NORMS and (k not in have or have[k].shape != want[k].shape)]
        if bad:
            return f"target layer {src} does not match drafter layer {i} in {', '.join(sorted(bad))}"
    return None


def source_layers(config: DFlashConfig, num_target_layers: int) -> list[int]:
    """Per drafter layer, the target layer it starts as: the one that reads the deepest
    captured feature, then the layers after it (the last one repeated if they run out)."""
    first = max(config.target_layer_ids) + 1
    return [min(first + i, num_target_layers - 1) for i in range(config.num_layers)]


def _warm_start(drafter: DFlashDrafter, target) -> None:
    layers = _decoder_layers(target)
    sources = source_layers(drafter.config, len(layers))
    for src, dst in zip(sources, drafter.layers):
        have = _layer_tensors(layers[src])
        for name, tensor in _layer_tensors(dst).items():
            if name in have and have[name].shape == tensor.shape:
                tensor.copy_(have[name].float())
    hidden = drafter.config.hidden_size
    deepest = drafter.config.target_layer_ids.index(max(drafter.config.target_layer_ids))
    fc = drafter.fc.weight
    fc.mul_(0.1)  # Normal(0, 0.002) on the other features' slices
    fc[:, deepest * hidden : (deepest + 1) * hidden] = torch.eye(hidden, dtype=fc.dtype)
    drafter.hidden_norm.weight.copy_(_layer_tensors(layers[sources[0]])["input_layernorm"].float())


def _decoder(target) -> Optional[nn.Module]:
    return target.get_decoder() if hasattr(target, "get_decoder") else getattr(target, "model", None)


def _decoder_layers(target) -> Optional[nn.ModuleList]:
    layers = getattr(_decoder(target), "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


def _layer_tensors(layer: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """The weights a drafter layer shares with a Llama/Qwen-style decoder layer."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    try:
        out = {n: getattr(attn, n).weight for n in _ATTN}
        out.update({f"{n}.bias": getattr(attn, n).bias for n in _ATTN if getattr(attn, n).bias is not None})
        out.update({n: getattr(mlp, n).weight for n in _MLP})
        out.update({n: getattr(layer, n).weight for n in _NORMS})
    except AttributeError:
        return None
    for n in _QK_NORMS:  # Qwen3-style targets have them; Llama-style ones keep the drafter's unit norms
        if getattr(attn, n, None) is not None:
            out[n] = getattr(attn, n).weight
    return out


def _final_norm_scale(target) -> Optional[torch.Tensor]:
    """The target's final norm as a plain RMSNorm weight (its own weight when it is one)."""
    norm = getattr(_decoder(target), "norm", None)
    if getattr(norm, "weight", None) is None:
        return None
    return norm.weight.float() if _is_plain_rmsnorm(norm) else _norm_scale(norm)


@torch.no_grad()
def _norm_scale(norm: nn.Module) -> torch.Tensor:
    """What an RMSNorm multiplies a unit-RMS row by, as a plain RMSNorm weight: its
    weight for Llama/Qwen3-style norms, 1 + weight for the zero-centred norms of Gemma
    and Qwen3.5/Qwen3-Next (whose weights start at zero)."""
    weight = norm.weight
    return norm(torch.ones(1, weight.shape[-1], dtype=weight.dtype, device=weight.device))[0].float()


def _is_plain_rmsnorm(norm: nn.Module) -> bool:
    return torch.allclose(_norm_scale(norm), norm.weight.float(), rtol=1e-4, atol=1e-5)
