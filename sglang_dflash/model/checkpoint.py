"""Read and write drafter checkpoints in the z-lab layout.

A checkpoint is a folder with ``config.json`` (see :mod:`config`) and safetensors
weights named as in the reference (``layers.{i}.self_attn.q_proj.weight``, ``fc.weight``,
``hidden_norm.weight``, ``norm.weight``; no ``model.`` prefix, no embedding or lm_head),
either one ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
Saving writes exactly that layout, so upstream SGLang and the reference load what we
train.

DFlash2 selector codebooks are named ``candidate_selector.{predecessor,successor}_codebook``
with no ``.weight`` (SGLang's spelling, which we write). A checkpoint saved through
transformers' ``nn.Embedding`` spelling (``..._codebook.weight``) loads too; SGLang
would silently leave such tables at zero.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Optional

import torch

from .config import DFlashConfig, DFlashConfigError, locate
from .drafter import DFlashDrafter
from .rope import RotaryEmbedding

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_IGNORED_PREFIXES = ("embed_tokens.", "lm_head.", "rotary_emb.")
SELECTOR_PREFIX = "candidate_selector."
_CODEBOOKS = ("candidate_selector.predecessor_codebook", "candidate_selector.successor_codebook")


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / WEIGHTS_NAME
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise DFlashConfigError(f"DFlash drafter path {str(path)!r} has no *.safetensors weights")
    return found


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(path)):
        for name, tensor in load_file(str(file)).items():
            name = name.removeprefix("model.")
            if not name.startswith(_IGNORED_PREFIXES):
                state[name] = tensor
    return state


def canonical_names(state: Mapping[str, torch.Tensor], config: DFlashConfig) -> dict[str, torch.Tensor]:
    """Checkpoint names -> this package's: codebooks without ``.weight``; a drafter
    without a selector (a DFlash architecture) drops selector tensors, as SGLang does."""
    out = {}
    for name, tensor in state.items():
        if name.endswith(".weight") and name.removesuffix(".weight") in _CODEBOOKS:
            name = name.removesuffix(".weight")
        out[name] = tensor
    if not config.has_selector:
        dropped = [name for name in out if name.startswith(SELECTOR_PREFIX)]
        if dropped:
            logger.warning("sglang-dflash: %s has no candidate selector; ignoring %d selector tensors",
                           config.architecture, len(dropped))
        out = {k: v for k, v in out.items() if not k.startswith(SELECTOR_PREFIX)}
    return out


def load_state(drafter: DFlashDrafter, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a checkpoint state dict in, naming every missing/unexpected/misshapen tensor."""
    state = canonical_names(state, drafter.config)
    expected = {k: v for k, v in drafter.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DFlashConfigError(
            f"drafter weights do not match its config: missing {missing[:6]}"
            f"{'...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise DFlashConfigError(
                f"drafter weight {name} has shape {tuple(tensor.shape)}, config implies {tuple(expected[name].shape)}"
            )
    drafter.load_state_dict(dict(state), strict=True)


def load_drafter(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    target_num_layers: Optional[int] = None,
    config: Optional[DFlashConfig] = None,
) -> DFlashDrafter:
    """Build a drafter from a checkpoint folder, cast to ``dtype`` on ``device``."""
    path = locate(path)
    config = config or DFlashConfig.from_pretrained(path, target_num_layers=target_num_layers)
    state = read_state_dict(path)
    if "fc.weight" in state:
        config.check_fc_width(int(state["fc.weight"].shape[1]))
    with torch.device("meta"):
        drafter = DFlashDrafter(config)
    drafter = drafter.to_empty(device=device)
    drafter.rotary = RotaryEmbedding(config.hf_config()).to(device)  # buffers were on meta
    load_state(drafter, {k: v.to(dtype) for k, v in state.items()})
    return drafter.to(dtype=dtype).eval()


def save_drafter(drafter: DFlashDrafter, path: str | Path, *, dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the z-lab layout."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in drafter.state_dict().items()}
    save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    raw = dict(drafter.config.raw)
    raw.setdefault("architectures", ["DFlashDraftModel"])
    if dtype is not None:
        raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    return path
