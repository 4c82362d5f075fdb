"""Tiny random targets of every architecture family DFlash drafters are published for.

Each builder writes an HF checkpoint (config, float32 weights, the offline byte-level
tokenizer of :mod:`.tiny`) that both transformers and SGLang 0.5.23 load. They share
one shape, so servers start in seconds: vocabulary 512, hidden 64, 4 layers, 4 query
and 2 KV heads of 16. Sliding-window layers have a window of 8 tokens, so every
prompt and most generations cross the window edge; linear-attention layers alternate
with full attention as in the published models.

Random weights must still give a drafter something to learn: greedy continuations
that settle into runs and short loops (as a random tiny Qwen3's do), not noise. Tied
embeddings with a smaller init do that for the linear-attention families (the
residual stream keeps the current token's own embedding), and Gemma-4 needs a
slightly larger init.

    python -m sglang_dflash.testing.devmodels target gpt_oss OUT
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .tiny import build_tokenizer

VOCAB, HIDDEN, LAYERS, WINDOW = 512, 64, 4, 8
INIT_STD = 0.08  # well above HF's 0.02: decisive greedy choices (see tiny.build_tiny_target)


def _common() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        initializer_range=INIT_STD,
        bos_token_id=None,
        tie_word_embeddings=False,
        dtype="float32",
    )


_ALTERNATING = ["sliding_attention", "full_attention"] * (LAYERS // 2)
_HYBRID = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]
_LINEAR = dict(
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaConfig(**_common(), intermediate_size=128), LlamaForCausalLM


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        **_common(),
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
    )
    return config, Qwen3MoeForCausalLM


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        **{**_common(), "tie_word_embeddings": True},
        intermediate_size=128,
        query_pre_attn_scalar=16,
        sliding_window=WINDOW,
        layer_types=_ALTERNATING,
    )
    return config, Gemma3ForCausalLM


def _gemma4():
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    config = Gemma4TextConfig(
        **{**_common(), "tie_word_embeddings": True, "initializer_range": 0.1},
        intermediate_size=128,
        global_head_dim=16,
        hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=VOCAB,
        sliding_window=WINDOW,
        layer_types=_ALTERNATING,
    )
    return config, Gemma4ForCausalLM


def _gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        **_common(),
        intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=WINDOW,
        layer_types=_ALTERNATING,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return config, GptOssForCausalLM


def _qwen3_next():
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    # Untied, as the released models are: SGLang 0.5.23's Qwen3NextForCausalLM never ties
    # lm_head to the embedding, so a tied checkpoint serves an all-zero lm_head.
    config = Qwen3NextConfig(
        **{**_common(), "tie_word_embeddings": False, "initializer_range": 0.07},
        **_LINEAR,
        intermediate_size=128,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        layer_types=_HYBRID,
    )
    return config, Qwen3NextForCausalLM


def _qwen3_5():
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    config = Qwen3_5TextConfig(**{**_common(), "tie_word_embeddings": True, "initializer_range": 0.06}, **_LINEAR, intermediate_size=128, layer_types=_HYBRID)
    return config, Qwen3_5ForCausalLM


BUILDERS: dict[str, Callable] = {
    "llama": _llama,
    "qwen3_moe": _qwen3_moe,
    "gemma3": _gemma3,
    "gemma4": _gemma4,
    "gpt_oss": _gpt_oss,
    "qwen3_next": _qwen3_next,
    "qwen3_5": _qwen3_5,
}
ARCHITECTURES = tuple(BUILDERS)
HYBRID_LINEAR = ("qwen3_next", "qwen3_5")
HYBRID_SWA = ("gemma4", "gpt_oss")

# SGLang flags each family needs, beyond the lane's usual ones. CPU: no platform
# snapshot support, so a hybrid linear-attention radix cache keeps whole-request
# states (which needs the overlap scheduler off); hybrid SWA pools get a sliding
# side of ~800 slots, so sliding slots are freed and reused under a 16-request batch.
# GPU: gpt-oss and Gemma-4 refuse FlashInfer; Triton attention has windows and sinks.
CPU_FLAGS = {
    **{name: {"mamba-radix-cache-strategy": "no_buffer", "disable-overlap-schedule": True} for name in HYBRID_LINEAR},
    **{name: {"swa-full-tokens-ratio": 0.1} for name in HYBRID_SWA},
}
GPU_FLAGS = {name: {"attention-backend": "triton"} for name in HYBRID_SWA}


def server_flags(name: str, device: str = "cpu") -> dict:
    """The extra launch flags the ``name`` family needs on ``device`` (cpu or cuda)."""
    return dict((CPU_FLAGS if device == "cpu" else GPU_FLAGS).get(name, {}))


# SGLang keeps a GDN layer's conv state in bfloat16 unless told otherwise. Under the CPU
# lane's float32 model that rounds the state wherever a prefill chunk ends, so even
# no-spec output depends on how the scheduler chunked a prompt (one near-tie of 3e-4 in
# 750 tokens flips on the tiny Qwen3.5). At the model's own dtype, as on a bf16 GPU,
# storing the state loses nothing and greedy outputs are comparable token for token.
CPU_ENV = {name: {"SGLANG_MAMBA_CONV_DTYPE": "float32"} for name in HYBRID_LINEAR}


def server_env(name: str, device: str = "cpu") -> dict:
    """The environment the ``name`` family's servers need on ``device`` (cpu or cuda)."""
    return dict(CPU_ENV.get(name, {})) if device == "cpu" else {}


# Keys transformers 5.x leaves out that SGLang 0.5.23's config classes read directly.
def _sglang_config_keys(name: str, config) -> dict:
    if name in HYBRID_LINEAR:
        # configs/qwen3_next.py and qwen3_5.py derive the layer pattern from this interval.
        return {"full_attention_interval": _HYBRID.index("full_attention") + 1}
    if name == "gemma4":
        # mem_cache/kv_cache_configurator.py sizes a hybrid SWA pool's sliding side from it.
        return {"swa_num_key_value_heads": config.num_key_value_heads}
    return {}


@torch.no_grad()
def _liven(model) -> None:
    """Give parameters HF initialises to constants random values, so that every part of
    the architecture changes the outputs (gpt-oss sinks, MoE router biases)."""
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if name.endswith("sinks"):
            param.copy_(torch.randn(param.shape, generator=generator))
        elif name.endswith("router.bias"):
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def build_target(name: str, out: str | Path, *, seed: int = 0, dtype: str = "float32") -> Path:
    """Write a tiny random ``name`` checkpoint (one of :data:`ARCHITECTURES`) to ``out``."""
    if name not in BUILDERS:
        raise ValueError(f"unknown tiny architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    import json

    out = Path(out)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    eos = build_tokenizer(out, VOCAB).convert_tokens_to_ids("<|endoftext|>")
    config, model_class = BUILDERS[name]()
    config.eos_token_id = config.pad_token_id = eos
    torch.manual_seed(seed)
    model = model_class(config).to(getattr(torch, dtype))
    _liven(model)
    model.save_pretrained(out)
    extra = _sglang_config_keys(name, config)
    if extra:
        path = out / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **extra}, indent=2))
    return out

