"""A tiny random Qwen3 target (with an offline byte-level BPE tokenizer) and random
DFlash drafters for it, in the exact layouts SGLang and the reference load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Once upon a time there was a little model that could speculate. ",
    "def add(a, b):\n    return a + b\n",
    "SGLang serves large language models fast with speculative decoding. ",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 ",
    "Paris is the capital of France; Berlin is the capital of Germany. ",
]


def build_tokenizer(out: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 40, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(out)
    return fast


def build_tiny_target(
    out: str | Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    init_std: float = 0.08,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """A random Qwen3ForCausalLM. ``init_std`` well above HF's 0.02 makes its greedy
    choices decisive (few near-ties), which keeps exact-match tests meaningful. A
    vocabulary too small for a byte-level tokenizer (< 300) gets none: serve it with
    ``--skip-tokenizer-init`` and token ids."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    eos = 0
    if vocab_size >= 300:
        eos = build_tokenizer(out, vocab_size).convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=init_std,
        eos_token_id=eos,
        pad_token_id=eos,
        bos_token_id=None,
        dtype=dtype,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out)
    return out


def build_random_drafter(
    out: str | Path,
    *,
    target: str | Path,
    num_layers: int = 1,
    block_size: int = 8,
    target_layer_ids: Optional[Sequence[int]] = None,
    layer_types: Optional[Sequence[str]] = None,
    sliding_window: Optional[int] = None,
    init_std: float = 0.08,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """A random drafter in the z-lab layout for ``target`` (config.json + model.safetensors)."""
    from ...model.checkpoint import save_drafter
    from ...model.config import DFlashConfig
    from ...model.drafter import DFlashDrafter

    raw = drafter_config(target, num_layers=num_layers, block_size=block_size, target_layer_ids=target_layer_ids,
                         layer_types=layer_types, sliding_window=sliding_window, dtype=dtype)
    torch.manual_seed(seed)
    drafter = DFlashDrafter(DFlashConfig.from_dict(raw)).init_weights(init_std)
    return save_drafter(drafter, out, dtype=getattr(torch, dtype))


def drafter_config(
    target: str | Path,
    *,
    num_layers: int,
    block_size: int,
    target_layer_ids: Optional[Sequence[int]] = None,
    layer_types: Optional[Sequence[str]] = None,
    sliding_window: Optional[int] = None,
    dtype: str = "float32",
    architecture: str = "DFlashDraftModel",
    dflash_fields: Optional[dict] = None,
) -> dict:
    """A drafter ``config.json`` (z-lab layout) shaped for the target in ``target``."""
    from ...model.config import default_target_layer_ids

    tcfg = json.loads((Path(target) / "config.json").read_text())
    tokenizer_cfg = json.loads((Path(target) / "tokenizer.json").read_text()) if (Path(target) / "tokenizer.json").exists() else {}
    mask_id = next((t["id"] for t in tokenizer_cfg.get("added_tokens", []) if t["content"] == "<|MASK|>"), None)
    ids = list(target_layer_ids or default_target_layer_ids(tcfg["num_hidden_layers"], num_layers))
    return {
        "architectures": [architecture],
        "model_type": "qwen3",
        "hidden_size": tcfg["hidden_size"],
        "intermediate_size": tcfg["intermediate_size"],
        "num_hidden_layers": num_layers,
        "num_attention_heads": tcfg["num_attention_heads"],
        "num_key_value_heads": tcfg["num_key_value_heads"],
        "head_dim": tcfg.get("head_dim") or tcfg["hidden_size"] // tcfg["num_attention_heads"],
        "rms_norm_eps": tcfg.get("rms_norm_eps", 1e-6),
        "rope_theta": (tcfg.get("rope_parameters") or {}).get("rope_theta", tcfg.get("rope_theta", 10000.0)),
        "max_position_embeddings": tcfg.get("max_position_embeddings", 4096),
        "vocab_size": tcfg["vocab_size"],
        "tie_word_embeddings": False,
        "attention_bias": False,
        "hidden_act": "silu",
        "block_size": block_size,
        "num_target_layers": tcfg["num_hidden_layers"],
        "layer_types": list(layer_types or ["full_attention"] * num_layers),
        "use_sliding_window": sliding_window is not None,
        "sliding_window": sliding_window,
        "torch_dtype": dtype,
        "dflash_config": {
            "target_layer_ids": ids,
            "mask_token_id": mask_id if mask_id is not None else tcfg["vocab_size"] - 1,
            **(dflash_fields or {}),
        },
    }
