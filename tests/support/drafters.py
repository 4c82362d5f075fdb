"""Drafter checkpoints derived from others, for end-to-end tests with an exact oracle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import torch


def rewire_target_layers(source: Path, out: Path, layer_ids: Sequence[int]) -> Path:
    """A copy of a one-feature drafter that reads its feature through ``layer_ids``.

    ``fc`` gets one column block per listed layer: the source's weights split evenly
    over every slot that names the source's layer, zeros elsewhere. Served with the
    features gathered in the listed order (repeats included), it drafts exactly what
    the source drafts; any other order or a deduplicated list drafts something else.
    """
    from safetensors.torch import load_file, save_file

    config = json.loads((Path(source) / "config.json").read_text())
    (layer,) = config["dflash_config"]["target_layer_ids"]
    slots = [i for i, lid in enumerate(layer_ids) if lid == layer]
    if not slots:
        raise ValueError(f"{list(layer_ids)} does not name the source drafter's layer {layer}")
    state = load_file(str(Path(source) / "model.safetensors"))
    fc = state["fc.weight"]
    blocks = [fc / len(slots) if i in slots else torch.zeros_like(fc) for i in range(len(layer_ids))]
    state["fc.weight"] = torch.cat(blocks, dim=1).contiguous()
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config["dflash_config"]["target_layer_ids"] = list(layer_ids)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
