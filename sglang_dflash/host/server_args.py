"""DFLASH launch arguments, validated and resolved our way (replaces SGLang's ``_handle_dflash``).

Every refusal is one line saying what to change; a drafter is parsed by our config
parser before SGLang reads it, and the target's feature capture is configured from
the same parser, so the layers the worker expects are the layers the target captures.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED_DEVICES = ("cuda", "cpu")
DRAFTER_ATTENTION_BACKENDS = ("torch_native", "flashinfer")


def handle_dflash(server_args) -> None:
    """Validate a DFLASH launch for our worker; every refusal is one line saying what to change."""
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view
    from sglang.srt.runtime_context import attn_dp_enabled_of

    from ..model.config import DFlashConfig
    from ..options import DFlashOptions

    cfg = resolving_view(server_args)
    source = "sglang_dflash"
    device = str(cfg.device or "cuda")
    if not device.startswith(SUPPORTED_DEVICES):
        raise ValueError(f"sglang-dflash runs DFLASH on CUDA or CPU, not device {device!r}")
    options = DFlashOptions.from_env()
    if attn_dp_enabled_of(cfg):
        _check_dp_attention(cfg, device, options)
    if cfg.pp_size != 1:
        raise ValueError(f"sglang-dflash supports DFLASH with --pp-size 1 only, got {cfg.pp_size}")
    if cfg.speculative_draft_model_path is None:
        raise ValueError("DFLASH needs --speculative-draft-model-path (a DFlash drafter checkpoint)")
    if getattr(cfg, "grammar_backend", None) == "outlines":
        raise ValueError(
            "sglang-dflash cannot constrain DFLASH with --grammar-backend outlines (its matcher cannot roll back "
            "past a rejected draft); use xgrammar or llguidance"
        )
    draft = DFlashConfig.from_pretrained(cfg.speculative_draft_model_path)
    _validate_against_target(cfg, draft)
    if options.tree and draft.has_selector:
        from ..spec.worker import SELECTOR_NO_TREE

        raise ValueError(SELECTOR_NO_TREE)
    if options.tree and _has_recurrent_layers(server_args):
        raise ValueError(
            "--speculative-dflash-tree-topk > 1 is not supported on hybrid linear-attention targets: "
            "their recurrent state is verified along a chain; drop the flag"
        )
    block, width = _resolve_block_and_width(cfg, draft, options)
    if options.verify_len is not None and options.verify_len > block:
        raise ValueError(f"--speculative-dflash-verify-len {options.verify_len} exceeds the block size {block}")
    attn = cfg.speculative_draft_attention_backend
    if attn is not None and attn not in DRAFTER_ATTENTION_BACKENDS:
        raise ValueError(
            f"--speculative-draft-attention-backend {attn!r} is not a sglang-dflash drafter backend; "
            f"use one of {list(DRAFTER_ATTENTION_BACKENDS)}"
        )
    resolved: dict[str, Any] = dict(
        speculative_num_draft_tokens=width, speculative_dflash_block_size=block, speculative_num_steps=1
    )
    if cfg.speculative_eagle_topk is None:
        resolved["speculative_eagle_topk"] = 1
    if cfg.max_running_requests is None:
        resolved["max_running_requests"] = 48
    if device == "cpu" and not cfg.disable_overlap_schedule:
        resolved["disable_overlap_schedule"] = True  # as SGLang does for every spec algorithm on CPU
    if getattr(cfg, "enable_mixed_chunk", False):
        logger.warning("sglang-dflash: --enable-mixed-chunk is not supported with DFLASH; disabling it")
        resolved["enable_mixed_chunk"] = False
    declare_resolution(server_args, source, **resolved)


# Targets whose DFlash pairing SGLang special-cases in ways this worker does not follow.
UNSUPPORTED_TARGETS = {
    "muse_glimmer": "Muse Glimmer targets are not supported by sglang-dflash yet: SGLang numbers their DFlash "
    "capture layers per drafter architecture; use SGLANG_DFLASH_BACKEND=upstream",
}


def _check_dp_attention(cfg, device: str, options) -> None:
    """DP attention: SGLang's own DFLASH's requirements (CUDA, the DP lm-head, no
    attention context parallelism, no DP spec-prefill coordination), plus one verify
    width per launch, which every DP rank's forward must share (so no top-k tree and no
    one-node verify)."""
    from sglang.srt.environ import envs

    if not device.startswith("cuda"):
        raise ValueError("DFLASH with --enable-dp-attention needs CUDA (as SGLang's own DFLASH does)")
    if not cfg.enable_dp_lm_head:
        raise ValueError("DFLASH with --enable-dp-attention needs --enable-dp-lm-head: idle DP ranks do not draft")
    if cfg.attn_cp_size != 1:
        raise ValueError("DFLASH with --enable-dp-attention does not support attention context parallelism")
    if envs.SGLANG_ENABLE_DP_SPEC_PREFILL_COORDINATION.get():
        raise ValueError("DFLASH with --enable-dp-attention needs SGLANG_ENABLE_DP_SPEC_PREFILL_COORDINATION=0")
    if options.tree:
        raise ValueError("--speculative-dflash-tree-topk > 1 cannot be combined with --enable-dp-attention")
    if options.verify_len == 1:
        raise ValueError("--speculative-dflash-verify-len 1 cannot be combined with --enable-dp-attention")


def _validate_against_target(cfg, draft) -> None:
    """Hidden size, vocabulary and layer range, checked at launch rather than in the scheduler."""
    from sglang.srt.utils.hf_transformers_utils import get_config

    target = get_config(cfg.model_path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if getattr(target, "model_type", None) in UNSUPPORTED_TARGETS:
        raise ValueError(UNSUPPORTED_TARGETS[target.model_type])
    text = getattr(target, "text_config", None) or target
    draft.validate_target(
        hidden_size=int(text.hidden_size), vocab_size=int(text.vocab_size), num_layers=int(text.num_hidden_layers)
    )


def _has_recurrent_layers(server_args) -> bool:
    """Mamba-style (linear-attention) layers, whose state a tree verify cannot keep per branch."""
    from sglang.srt.arg_groups.model_override_base import model_config_of
    from sglang.srt.configs.hybrid_arch import mambaish_config

    return mambaish_config(model_config_of(server_args)) is not None


def _resolve_block_and_width(cfg, draft, options) -> tuple[int, int]:
    """(block size B the drafter runs, verify width W = nodes per verify).

    A chain verifies the block: W == B, and the two flags naming it must agree. A top-K
    tree takes the block from --speculative-dflash-block-size (or the checkpoint) and
    its node budget from --speculative-num-draft-tokens (default 2B); it always holds
    the top-1 chain, so W >= B.
    """
    alias, tokens = cfg.speculative_dflash_block_size, cfg.speculative_num_draft_tokens
    if options.tree:
        block = int(alias if alias is not None else draft.block_size)
        width = int(tokens if tokens is not None else 2 * block)
        if width < block:
            raise ValueError(
                f"tree verification needs --speculative-num-draft-tokens (node budget {width}) >= "
                f"the block size {block}: the tree always contains the top-1 chain"
            )
    else:
        if alias is not None and tokens is not None and int(alias) != int(tokens):
            raise ValueError(
                f"--speculative-dflash-block-size {alias} and --speculative-num-draft-tokens {tokens} differ; "
                "for DFLASH they name the same block size"
            )
        block = width = int(alias if alias is not None else tokens if tokens is not None else draft.block_size)
    if block < 2:
        raise ValueError(f"DFLASH block size must be >= 2 (a bonus token plus drafts), got {block}")
    return block, width


def resolve_aux_hidden_state(*, config, server_args, model_config, spec_algorithm, is_draft_worker) -> None:
    """Tell the target runner which layers to capture, from *our* config parser.

    SGLang's ``set_dflash_layers_to_capture`` turns these DFlash ids into capture
    points; the worker checks at start-up that the points it installed equal
    :func:`sglang_dflash.config.capture_points`, so a changed convention fails loudly.
    """
    if not spec_algorithm.is_dflash() or is_draft_worker:
        return
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.runtime_context import get_spec

    from ..model.config import DFlashConfig

    num_layers = int(model_config.hf_text_config.num_hidden_layers)
    draft = DFlashConfig.from_pretrained(get_spec().speculative_draft_model_path, target_num_layers=num_layers)
    config.dflash_use_aux_hidden_state = True
    config.dflash_draft_num_layers = draft.num_layers
    config.dflash_target_layer_ids = list(draft.target_layer_ids)
    config.draft_kv_num_layers = draft.num_layers
    config.draft_model_config = ModelConfig.from_server_args(
        server_args,
        model_path=get_spec().speculative_draft_model_path,
        model_revision=get_spec().speculative_draft_model_revision,
        is_draft_model=True,
    )
