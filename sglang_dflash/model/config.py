"""DFlash drafter configuration, parsed from a z-lab style ``config.json``.

A DFlash checkpoint is a Qwen3-style config plus DFlash fields. Newer drafts keep them
in ``dflash_config``; older ones put ``block_size`` / ``num_target_layers`` /
``mask_token_id`` at the top level. Every field is read through ``_dflash_value`` so the
``dflash_config`` copy wins and the top level is the fallback, as the reference does.

Two model families share the format (:data:`ARCHITECTURES` maps every name SGLang
0.5.23 loads to what it really is):

* **DFlash** (``DFlashDraftModel``, ``MuseGlimmerAssistantModel``): argmax drafts from
  the target's lm_head; the two-tap dynamic convolution around each sublayer is built
  when ``conv_kernel_size`` / ``conv_group_size`` are set, as SGLang does;
* **DFlash2** (``DFlash2DraftModel`` and its aliases): the same backbone plus a
  candidate selector over the lm_head's top ``selector_top_k`` tokens
  (``selector_rank``-dimensional codebooks); optional ``output_multiplier`` and
  ``final_logit_softcapping`` shape the candidates' unary scores.

Bad input fails here, once, with a one-line :class:`DFlashConfigError` that says what to
change: nothing downstream has to re-validate.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 16
DEFAULT_MASK_TOKEN = "<|MASK|>"
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
DFLASH, DFLASH2 = "dflash", "dflash2"

# Every architecture name SGLang 0.5.23 loads as a DFlash drafter, and what it really is.
# MuseGlimmerAssistantModel subclasses SGLang's DFlashDraftModel (no selector);
# MiniMaxDFlash2DraftModel and DFlash2BeamDraftModel subclass its DFlash2DraftModel
# unchanged (0.5.23 has no beam search: the "beam" drafter walks the same single path).
ARCHITECTURES = {
    "DFlashDraftModel": DFLASH,
    "MuseGlimmerAssistantModel": DFLASH,
    "DFlash2DraftModel": DFLASH2,
    "MiniMaxDFlash2DraftModel": DFLASH2,
    "DFlash2BeamDraftModel": DFLASH2,
}

# Architectures seen in the DFlash family that this package recognises but cannot run.
_KNOWN_UNSUPPORTED = {
    "DFlashLagunaForCausalLM": "Laguna DFlash drafters are not supported by sglang-dflash",
}


class DFlashConfigError(ValueError):
    """A DFlash checkpoint or its pairing with a target cannot be used as is."""


def capture_points(target_layer_ids: tuple[int, ...]) -> list[int]:
    """SGLang capture points for DFlash target layer ids: the +1 offset lives here.

    DFlash names a feature by the decoder layer that *produces* it (HF's
    ``output_hidden_states[i + 1]``: index 0 there is the embedding output). SGLang
    captures the residual stream *entering* a layer, so the output of layer ``i`` is
    captured at the input of layer ``i + 1``. The same index addresses HF's
    ``hidden_states`` tuple, which is why training and tests use this function too.
    A wrong offset does not crash anything; it silently lowers acceptance.
    """
    return [int(i) + 1 for i in target_layer_ids]


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> tuple[int, ...]:
    """The reference rule when a checkpoint names no layers: evenly spaced in [1, L-3]."""
    if num_draft_layers == 1:
        return (num_target_layers // 2,)
    if num_target_layers < 4:
        raise DFlashConfigError(
            f"cannot infer target_layer_ids for a {num_target_layers}-layer target; "
            "set dflash_config.target_layer_ids in the drafter's config.json"
        )
    span = num_target_layers - 4
    return tuple(round(1 + i * span / (num_draft_layers - 1)) for i in range(num_draft_layers))


def _dflash_value(raw: Mapping[str, Any], name: str, default: Any = None) -> Any:
    nested = raw.get("dflash_config") or {}
    if name in nested and nested[name] is not None:
        return nested[name]
    value = raw.get(name)
    return default if value is None else value


def _require(raw: Mapping[str, Any], name: str) -> Any:
    if raw.get(name) is None:
        raise DFlashConfigError(f"drafter config.json is missing '{name}'")
    return raw[name]


@dataclass(frozen=True)
class DFlashConfig:
    """Everything the drafter, the worker and the loader need to know about a checkpoint."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    attention_bias: bool
    target_layer_ids: tuple[int, ...]
    block_size: int
    mask_token_id: Optional[int]
    mask_token: str
    num_target_layers: Optional[int]
    layer_types: tuple[str, ...]
    sliding_window: Optional[int]
    is_causal: Optional[bool]
    max_position_embeddings: int
    input_embedding_scale: float = 1.0
    output_multiplier: float = 1.0
    final_logit_softcapping: Optional[float] = None
    vocab_size: Optional[int] = None
    torch_dtype: Optional[str] = None
    architecture: str = "DFlashDraftModel"
    conv_kernel_size: int = 0
    conv_group_size: int = 0
    selector_rank: int = 0
    selector_top_k: int = 0
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, target_num_layers: Optional[int] = None) -> "DFlashConfig":
        family = _check_architecture(raw)
        _check_unsupported_features(raw)
        num_layers = int(_require(raw, "num_hidden_layers"))
        hidden = int(_require(raw, "hidden_size"))
        heads = int(_require(raw, "num_attention_heads"))
        num_target_layers = _dflash_value(raw, "num_target_layers")
        num_target_layers = int(num_target_layers) if num_target_layers is not None else None
        layer_ids = _dflash_value(raw, "target_layer_ids")
        if layer_ids is None:
            known = target_num_layers or num_target_layers
            if known is None:
                raise DFlashConfigError(
                    "drafter config names no dflash_config.target_layer_ids and no num_target_layers; "
                    "cannot tell which target layers to capture"
                )
            layer_ids = default_target_layer_ids(int(known), num_layers)
        layer_types = tuple(raw.get("layer_types") or [FULL_ATTENTION] * num_layers)
        if len(layer_types) != num_layers:
            raise DFlashConfigError(
                f"drafter layer_types has {len(layer_types)} entries for {num_layers} layers"
            )
        unknown = set(layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}
        if unknown:
            raise DFlashConfigError(f"drafter layer_types has unsupported entries {sorted(unknown)}")
        # HF semantics, which the reference drafter inherits: a window only exists
        # when use_sliding_window is set; sliding layers without one are just causal.
        window = raw.get("sliding_window") if raw.get("use_sliding_window", False) else None
        is_causal = raw.get("is_causal", _dflash_value(raw, "causal"))
        softcap = _number(raw, "final_logit_softcapping", 0.0) or 0.0
        config = cls(
            hidden_size=hidden,
            intermediate_size=int(_require(raw, "intermediate_size")),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            attention_bias=bool(raw.get("attention_bias", False)),
            target_layer_ids=tuple(int(i) for i in layer_ids),
            block_size=int(_dflash_value(raw, "block_size", DEFAULT_BLOCK_SIZE)),
            mask_token_id=_optional_int(_dflash_value(raw, "mask_token_id")),
            mask_token=str(_dflash_value(raw, "mask_token", DEFAULT_MASK_TOKEN)),
            num_target_layers=num_target_layers,
            layer_types=layer_types,
            sliding_window=int(window) if window else None,
            is_causal=None if is_causal is None else bool(is_causal),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            input_embedding_scale=float(_dflash_value(raw, "input_embedding_scale", 1.0)),
            output_multiplier=_number(raw, "output_multiplier", 1.0),
            final_logit_softcapping=softcap if softcap > 0 else None,
            vocab_size=_optional_int(raw.get("vocab_size")),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            architecture=str(raw["architectures"][0]),
            **_convolution_fields(raw),
            **_selector_fields(raw, family),
            raw=dict(raw),
        )
        config._check_shapes()
        return config

    @classmethod
    def from_pretrained(cls, path: str | Path, *, target_num_layers: Optional[int] = None) -> "DFlashConfig":
        """From a local folder or a hub repo id (see :func:`locate`)."""
        config_path = locate(path, weights=False) / "config.json"
        if not config_path.is_file():
            raise DFlashConfigError(f"DFlash drafter path {str(path)!r} has no config.json")
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise DFlashConfigError(f"{config_path} is not valid JSON: {exc}") from None
        return cls.from_dict(raw, target_num_layers=target_num_layers)

    def _check_shapes(self) -> None:
        if self.output_multiplier <= 0:
            raise DFlashConfigError(f"dflash_config.output_multiplier must be > 0, got {self.output_multiplier}")
        if self.has_convolution and self.hidden_size % self.conv_group_size:
            raise DFlashConfigError(
                f"dflash_config.conv_group_size={self.conv_group_size} does not divide hidden_size={self.hidden_size}"
            )
        if self.has_selector:
            if self.vocab_size is None:
                raise DFlashConfigError(
                    "DFlash2 drafter config.json is missing 'vocab_size' (the selector's codebooks have a row per token)"
                )
            if self.selector_top_k > self.vocab_size:
                raise DFlashConfigError(
                    f"dflash_config.selector_top_k={self.selector_top_k} exceeds the vocabulary ({self.vocab_size})"
                )
        if self.block_size < 2:
            raise DFlashConfigError(f"DFlash block_size must be >= 2, got {self.block_size}")
        if self.num_heads % self.num_kv_heads:
            raise DFlashConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if not self.target_layer_ids:
            raise DFlashConfigError("dflash_config.target_layer_ids is empty")
        if any(i < 0 for i in self.target_layer_ids):
            raise DFlashConfigError(f"dflash_config.target_layer_ids has negative ids {list(self.target_layer_ids)}")

    # ------------------------------------------------------------------ queries
    @property
    def has_convolution(self) -> bool:
        """Whether each layer wraps its sublayers in the block's dynamic convolution."""
        return self.conv_kernel_size > 0

    @property
    def has_selector(self) -> bool:
        """DFlash2: drafts are a path through the candidate selector's lattice."""
        return self.selector_rank > 0

    @property
    def family(self) -> str:
        return DFLASH2 if self.has_selector else DFLASH

    @property
    def num_features(self) -> int:
        """How many target layers are concatenated into one context feature."""
        return len(self.target_layer_ids)

    def capture_points(self) -> list[int]:
        return capture_points(self.target_layer_ids)

    def captured_feature_order(self) -> Optional[list[int]]:
        """Where each listed feature sits in what SGLang captures, or None if identical.

        SGLang appends a capture when the forward reaches a listed layer, so features
        arrive in ascending layer order, each layer once; DFlash concatenates them in
        the order ``target_layer_ids`` lists them, duplicates included (the default
        rule yields ``[1, 1]`` for small targets). Gathering feature chunks by this
        index turns the first into the second.
        """
        captured = sorted(set(self.target_layer_ids))
        order = [captured.index(i) for i in self.target_layer_ids]
        return None if order == list(range(len(captured))) else order

    def layer_is_causal(self, layer: int) -> bool:
        """Sliding layers are causal within the block, full layers bidirectional,
        unless the checkpoint sets ``is_causal`` for all layers."""
        if self.is_causal is not None:
            return self.is_causal
        return self.layer_types[layer] == SLIDING_ATTENTION

    def layer_window(self, layer: int) -> Optional[int]:
        return self.sliding_window if self.layer_types[layer] == SLIDING_ATTENTION else None

    def hf_config(self):
        """The transformers ``Qwen3Config`` of this drafter, for RoPE parameters."""
        from transformers import Qwen3Config

        skip = {"architectures", "auto_map", "dflash_config", "layer_types", "model_type"}
        return Qwen3Config(**{k: v for k, v in self.raw.items() if k not in skip})

    def validate_target(
        self,
        *,
        hidden_size: int,
        vocab_size: int,
        num_layers: int,
    ) -> None:
        """Refuse a drafter that cannot be paired with this target, in one line."""
        if hidden_size != self.hidden_size:
            raise DFlashConfigError(
                f"drafter hidden_size={self.hidden_size} does not match the target's hidden_size={hidden_size}; "
                "a DFlash drafter borrows the target's embedding and lm_head, so they must match"
            )
        bad = [i for i in self.target_layer_ids if i >= num_layers - 1]
        if bad:
            raise DFlashConfigError(
                f"dflash_config.target_layer_ids {bad} are out of range for a {num_layers}-layer target "
                f"(ids must be < {num_layers - 1}: the output of the last layer is not capturable)"
            )
        if self.vocab_size is not None and self.vocab_size != vocab_size:
            raise DFlashConfigError(
                f"drafter vocab_size={self.vocab_size} does not match the target's vocab_size={vocab_size}; "
                "the drafter must have been distilled from this target's tokenizer"
            )
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < vocab_size:
            raise DFlashConfigError(
                f"dflash_config.mask_token_id={self.mask_token_id} is outside the target vocabulary (size {vocab_size})"
            )

    def check_fc_width(self, fc_in_features: int) -> None:
        """``fc`` must take one hidden-size feature per target layer id."""
        expected = self.num_features * self.hidden_size
        if fc_in_features != expected:
            raise DFlashConfigError(
                f"drafter fc.weight takes {fc_in_features} inputs but {self.num_features} target layers x "
                f"hidden {self.hidden_size} = {expected}; target_layer_ids do not match the checkpoint"
            )


def locate(path: str | Path, *, revision: Optional[str] = None, weights: bool = True) -> Path:
    """A local checkpoint folder for ``path``: the folder itself, or a hub repo id
    downloaded (or found in the cache; HF_HUB_OFFLINE is honoured) by huggingface_hub."""
    local = Path(path).expanduser()
    if local.exists():
        return local
    if str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
        raise DFlashConfigError(f"DFlash drafter path {str(path)!r} does not exist")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors"] if weights else ["config.json"]
    try:
        return Path(snapshot_download(str(path), revision=revision, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, no access: one line saying which
        raise DFlashConfigError(f"cannot fetch DFlash drafter {str(path)!r} from the hub: {type(exc).__name__}: {exc}") from None


def _optional_int(value: Any) -> Optional[int]:
    return None if value is None else int(value)


def _number(raw: Mapping[str, Any], name: str, default: Optional[float]) -> Optional[float]:
    value = _dflash_value(raw, name, default)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DFlashConfigError(f"dflash_config.{name} must be a number, got {value!r}") from None


def _count(raw: Mapping[str, Any], name: str) -> int:
    """A non-negative integer field; absent or null means 0 (off), as in SGLang."""
    value = _dflash_value(raw, name, 0)
    try:
        count = int(value)
        valid = not isinstance(value, bool) and count == float(value) and count >= 0
    except (TypeError, ValueError, OverflowError):
        valid = False
    if not valid:
        raise DFlashConfigError(f"dflash_config.{name} must be a non-negative integer, got {value!r}")
    return count


def _pair(raw: Mapping[str, Any], first: str, second: str, what: str) -> tuple[int, int]:
    a, b = _count(raw, first), _count(raw, second)
    if bool(a) != bool(b):
        raise DFlashConfigError(f"the drafter's {what} needs dflash_config.{first} and {second} together, got {a} and {b}")
    return a, b


def _convolution_fields(raw: Mapping[str, Any]) -> dict[str, int]:
    taps, group = _pair(raw, "conv_kernel_size", "conv_group_size", "block convolution")
    return {"conv_kernel_size": taps, "conv_group_size": group}


def _selector_fields(raw: Mapping[str, Any], family: str) -> dict[str, int]:
    rank, top_k = _pair(raw, "selector_rank", "selector_top_k", "candidate selector")
    arch = raw["architectures"][0]
    if family == DFLASH2 and not rank:
        raise DFlashConfigError(
            f"{arch} drafters need dflash_config.selector_rank and selector_top_k (the candidate selector)"
        )
    if family == DFLASH and rank:
        # SGLang builds no selector for this architecture and skips its tensors; so do we.
        logger.warning("sglang-dflash: %s drafters have no candidate selector; its fields and weights are ignored", arch)
        return {"selector_rank": 0, "selector_top_k": 0}
    return {"selector_rank": rank, "selector_top_k": top_k}


def _check_architecture(raw: Mapping[str, Any]) -> str:
    """The drafter's family (:data:`DFLASH` or :data:`DFLASH2`), or a one-line refusal."""
    architectures = raw.get("architectures") or []
    if not architectures:
        raise DFlashConfigError(
            "drafter config.json has no 'architectures'; expected [\"DFlashDraftModel\"] or [\"DFlash2DraftModel\"]"
        )
    arch = architectures[0]
    if arch in _KNOWN_UNSUPPORTED:
        raise DFlashConfigError(_KNOWN_UNSUPPORTED[arch])
    if arch not in ARCHITECTURES:
        raise DFlashConfigError(
            f"unknown drafter architecture {arch!r}: sglang-dflash runs {', '.join(ARCHITECTURES)} checkpoints"
        )
    if raw.get("dflash_config") is None and raw.get("block_size") is None and raw.get("target_layer_ids") is None:
        raise DFlashConfigError(
            "drafter config.json has no dflash_config (and no top-level block_size); "
            "is this a DFlash checkpoint?"
        )
    return ARCHITECTURES[arch]


def _check_unsupported_features(raw: Mapping[str, Any]) -> None:
    projector = _dflash_value(raw, "projector_type")
    if projector not in (None, "", "linear", "fc"):
        raise DFlashConfigError(f"drafter projector_type={projector!r} (Domino/DSpark heads) is not supported")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise DFlashConfigError(f"drafter hidden_act={act!r} is not supported; DFlash drafters use silu")
