"""Which hidden states the target hands the drafter, per target architecture.

DFlash features are the residual stream entering layer ``i + 1`` for every
``target_layer_id`` ``i`` (HF's ``hidden_states[i + 1]``), which is what drafters are
trained on. SGLang 0.5.23's ``set_dflash_layers_to_capture`` installs that capture on
most targets; this module calls it with unique, ascending ids (Qwen3.5 refuses any
other list, and the worker regathers the features into the drafter's order anyway),
and installs the capture itself where SGLang has none:

* **Gemma-3** (``Gemma3ForCausalLM``): SGLang only has EAGLE-3 capture, which takes a
  layer's input *before* its residual add (Gemma-3 layers return the branch output
  and the residual separately). Here each capture point is the layer's input
  ``hidden_states + residual``, taken by forward hooks, and replaces SGLang's list.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..model.config import DFlashConfigError, capture_points


def install_capture(model: nn.Module, target_layer_ids: Sequence[int]) -> None:
    """Make ``model`` return DFlash features for ``target_layer_ids`` (any order, repeats)."""
    ids = sorted({int(i) for i in target_layer_ids})
    if hasattr(model, "set_dflash_layers_to_capture"):
        model.set_dflash_layers_to_capture(ids)
        return
    installer = OWN_CAPTURE.get(type(model).__name__)
    if installer is None:
        raise DFlashConfigError(
            f"target {type(model).__name__} has no DFlash feature capture in SGLang 0.5.23 "
            "(no set_dflash_layers_to_capture) and sglang-dflash adds none for it"
        )
    installer(model, ids)


def _residual_stream_capture(model: nn.Module, ids: list[int]) -> None:
    """For decoder layers called as ``layer(hidden_states=..., residual=...)`` that
    return ``(branch_output, residual)``: the stream entering layer ``p`` is
    ``hidden_states + residual`` (just ``hidden_states`` before the first layer)."""
    text = model.model
    layers = text.layers
    points = capture_points(ids)
    captured: list[torch.Tensor] = []

    def before(_module, _args, kwargs):
        hidden, residual = kwargs["hidden_states"], kwargs.get("residual")
        captured.append(hidden if residual is None else hidden + residual)

    def after_last(_module, _args, output):
        hidden, residual = output
        captured.append(hidden + residual)

    for point in points:
        if point < len(layers):
            layers[point].register_forward_pre_hook(before, with_kwargs=True)
        else:
            layers[-1].register_forward_hook(after_last)
    text.forward = _returning_captured(text.forward, captured)
    text.layers_to_capture = list(points)  # SGLang's own (pre-residual) list, replaced below
    model.capture_aux_hidden_states = True


def _returning_captured(forward: Callable, captured: list) -> Callable:
    def run(*args, **kwargs):
        captured.clear()
        out = forward(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        features = list(captured)
        captured.clear()
        return hidden, features

    return run


OWN_CAPTURE: dict[str, Callable[[nn.Module, list[int]], None]] = {
    "Gemma3ForCausalLM": _residual_stream_capture,
}
