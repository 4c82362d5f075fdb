"""The DFlash drafter: a few Qwen3-style layers that draft a whole block in one pass.

The drafter owns no embedding and no lm_head; it borrows the target's. It is
conditioned on target hidden states from several layers: their concatenation is
projected once (``fc`` then ``hidden_norm``) into a context vector per committed
token, and every layer turns that vector into K/V with its own ``k_proj``/``k_norm``/
``v_proj`` (RoPE'd at the token's absolute position). Those K/V rows are *injected*
into the :class:`DraftKVCache` as tokens commit, so a draft step only runs the block
``[bonus, MASK x (B-1)]`` through the layers, attending over cached context plus the
block (non-causal for full-attention layers). Position ``k >= 1`` of the block predicts
the token at that position itself: there is no shift.

Attention is a callable ``attend(layer, q, k, v)`` so that the same layers serve the
serving path (torch or FlashInfer over the cache) and training (block-sparse masks).

DFlash2 drafters add two things (:mod:`.convolution`, :mod:`.selector`): each layer's
sublayers are wrapped in a dynamic convolution along the block, and a candidate
selector scores transitions between adjacent drafts. Block rows therefore always come
block-major, ``block_size`` rows per block.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .config import DFlashConfig
from .convolution import BlockConvolution
from .draft_kv import DraftKVCache
from .rope import RotaryEmbedding, apply_rope
from .selector import CandidateSelector

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: reduce in float32, scale in the activation dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class DrafterAttention(nn.Module):
    def __init__(self, config: DFlashConfig, layer: int) -> None:
        super().__init__()
        hidden, hd = config.hidden_size, config.head_dim
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        bias = config.attention_bias
        self.q_proj = nn.Linear(hidden, config.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(hidden, config.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(hidden, config.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(config.num_heads * hd, hidden, bias=bias)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, hidden] -> k, v: [T, kv_heads, head_dim]. Shared by context and block tokens."""
        k = self.k_norm(self.k_proj(x).view(-1, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        return apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        q = self.q_norm(self.q_proj(x).view(-1, self.num_heads, self.head_dim))
        k, v = self.project_kv(x, cos, sin)
        return self.o_proj(attend(self.layer, apply_rope(q, cos, sin), k, v))


class DrafterMLP(nn.Module):
    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DrafterLayer(nn.Module):
    def __init__(self, config: DFlashConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = DrafterAttention(config, layer)
        self.mlp = DrafterMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention_conv: Optional[BlockConvolution] = None
        self.mlp_conv: Optional[BlockConvolution] = None
        if config.has_convolution:
            self.attention_conv = BlockConvolution(config.hidden_size, config.conv_kernel_size, config.conv_group_size)
            self.mlp_conv = BlockConvolution(config.hidden_size, config.conv_kernel_size, config.conv_group_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend, block_size: int) -> torch.Tensor:
        attention = lambda h: self.self_attn(h, cos, sin, attend)  # noqa: E731
        x = x + _wrapped(self.attention_conv, attention, self.input_layernorm(x), block_size)
        return x + _wrapped(self.mlp_conv, self.mlp, self.post_attention_layernorm(x), block_size)


def _wrapped(conv: Optional[BlockConvolution], sublayer, x: torch.Tensor, block_size: int) -> torch.Tensor:
    return sublayer(x) if conv is None else conv.around(sublayer, x, block_size)


class DFlashDrafter(nn.Module):
    """Parameter names match the z-lab checkpoint layout (no ``model.`` prefix)."""

    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(DrafterLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.fc = nn.Linear(config.num_features * config.hidden_size, config.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.hf_config())
        self.candidate_selector: Optional[CandidateSelector] = None
        if config.has_selector:
            self.candidate_selector = CandidateSelector(
                config.hidden_size, config.vocab_size, config.selector_rank, config.selector_top_k
            )

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: Optional[torch.Generator] = None) -> "DFlashDrafter":
        """Fresh weights for training, tests and benchmarks: Normal(0, std) linears and
        codebooks, unit norms, identity convolution kernels."""
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("base_kernel"):
                param.zero_()[:, 0] = 1.0
            else:
                param.normal_(0.0, std, generator=generator)
        return self

    # ------------------------------------------------------------- context side
    def project_context(self, features: torch.Tensor) -> torch.Tensor:
        """Concatenated target features [N, K*H] -> context vectors [N, H]."""
        return self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))

    def context_kv(self, features: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer K/V of N context tokens: ([L, N, kvh, hd], [L, N, kvh, hd])."""
        ctx = self.project_context(features)
        cos, sin = self.rotary(positions, ctx.dtype)
        ks, vs = zip(*(layer.self_attn.project_kv(ctx, cos, sin) for layer in self.layers))
        return torch.stack(ks), torch.stack(vs)

    def inject(self, cache: DraftKVCache, features: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """Write the context K/V of newly committed tokens into their cache rows."""
        if slots.numel() == 0:
            return
        k, v = self.context_kv(features, positions)
        cache.write_all_layers(slots, k, v)

    # --------------------------------------------------------------- block side
    def embed(self, token_ids: torch.Tensor, embed_weight: torch.Tensor) -> torch.Tensor:
        """The target's raw embedding rows (bypassing any scaled-embedding module)."""
        return self.scale_input(F.embedding(token_ids, embed_weight))

    def scale_input(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Raw target embeddings -> block input (``input_embedding_scale``, drafter dtype)."""
        if self.config.input_embedding_scale != 1.0:
            embeddings = embeddings * self.config.input_embedding_scale
        return embeddings.to(self.fc.weight.dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attend: Attend, block_size: int) -> torch.Tensor:
        """Block embeddings [T, H] at absolute ``positions`` [T], block-major with
        ``block_size`` rows per block -> final-normed hidden [T, H]."""
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attend, block_size)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draft logits through the target's (local shard of the) lm_head."""
        logits = F.linear(hidden.to(lm_head_weight.dtype), lm_head_weight, bias).float()
        if self.config.output_multiplier != 1.0:
            logits = logits * self.config.output_multiplier
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
