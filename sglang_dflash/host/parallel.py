"""The worker past one device: SGLang 0.5.23's process groups as the speculator needs them.

Under tensor parallelism every rank of a TP group runs the same worker on the same
batch, and their steps must stay bit-identical: a rank that drafts, accepts or commits
differently hangs the group at its next collective. What this module guarantees:

* **Full-vocabulary draft logits.** The target's lm_head is vocab-parallel (a
  ``ParallelLMHead``, or the tied ``VocabParallelEmbedding``): each rank holds a
  contiguous, zero-padded row range of the padded vocabulary. :func:`full_vocab_logits`
  all-gathers the shards over **the head's own group** (the TP group, or the
  attention-TP group under ``--enable-dp-lm-head``) and cuts the padding, so every
  rank argmaxes and samples over the same ``[T, V]`` logits.
* **One decision per step.** Everything the step decides from rank-local state (the
  adaptive verify length depends on measured wall-clock step costs) is taken from the
  group's first rank (:class:`RankAgreement`, a broadcast over SGLang's CPU group of
  the ranks sharing one batch). Random draws need no communication: seeded requests'
  uniforms are keyed by (seed, step), unseeded ones come from a generator only
  speculation consumes, seeded alike on every rank
  (:func:`~sglang_dflash.spec.sampling.request_uniforms`).
* **Replicated drafter.** Captured target features are full hidden states on every
  rank (SGLang completes the all-reduce before capturing), so the drafter, its KV
  cache and context injection stay replicated; each rank does identical work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..model.config import DFlashConfigError


@dataclass(frozen=True)
class ParallelLayout:
    """How the target is spread: sizes read from SGLang's published topology."""

    tp_size: int = 1
    attn_tp_size: int = 1
    dp_size: int = 1
    dp_attention: bool = False
    head_group_size: int = 1  # ranks the lm_head's vocabulary is split over
    embed_group_size: int = 1  # ranks the input embedding's vocabulary is split over

    @property
    def collectives(self) -> bool:
        """Whether a draft step runs a collective (an all-reduce in the embedding, an
        all-gather after the lm_head): drafter CUDA graphs then capture inside SGLang's
        graph-capture context."""
        return max(self.head_group_size, self.embed_group_size) > 1

    def as_dict(self) -> dict:
        return {
            "tp_size": self.tp_size,
            "attn_tp_size": self.attn_tp_size,
            "dp_size": self.dp_size,
            "dp_attention": self.dp_attention,
            "lm_head_shards": self.head_group_size,
            "embedding_shards": self.embed_group_size,
            "drafter": "replicated",
        }


def group_size(layer: Any) -> int:
    """Ranks a vocab-parallel layer is sharded over (1 for a plain or replicated layer)."""
    return int(getattr(layer, "tp_size", 1) or 1) if getattr(layer, "tp_group", None) is not None else 1


def layout_of(model) -> ParallelLayout:
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    return ParallelLayout(
        tp_size=int(parallel.tp_size),
        attn_tp_size=int(parallel.attn_tp_size),
        dp_size=int(parallel.attn_dp_size),
        dp_attention=bool(parallel.attn_dp_enabled),
        head_group_size=group_size(model.lm_head),
        embed_group_size=group_size(model.get_input_embeddings()),
    )


def check_vocab_parallel(model, layout: ParallelLayout) -> None:
    """Refuse layouts whose gathered head is not token-ordered, or whose drafter
    collectives would span ranks that do not draft together (DP attention)."""
    head = model.lm_head
    if group_size(head) > 1 and int(getattr(head, "num_embeddings", 0)) != int(getattr(head, "org_vocab_size", 0)):
        raise DFlashConfigError(
            "sglang-dflash cannot draft through a vocab-parallel lm_head with added (LoRA) vocabulary: "
            "its gathered shards are not in token order"
        )
    if layout.dp_attention:
        for name, size in (("lm_head", layout.head_group_size), ("input embedding", layout.embed_group_size)):
            if size > layout.attn_tp_size:
                raise DFlashConfigError(
                    f"under DP attention the target's {name} is split over {size} ranks, beyond one DP rank's "
                    f"attention-TP group ({layout.attn_tp_size}): idle DP ranks do not draft, so its collective "
                    "would hang; launch with --enable-dp-lm-head (and a model whose embedding follows it)"
                )


def full_vocab_logits(local: torch.Tensor, head: Any, vocab_size: int) -> torch.Tensor:
    """This rank's logits over its vocab shard [T, V/shards] -> the full [T, V].

    SGLang's vocab-parallel layers give rank r a contiguous row range of the padded
    vocabulary (zero rows past the real vocabulary sit at the end of the last shards),
    so the rank-ordered concatenation is token order up to ``vocab_size``.
    """
    if group_size(head) > 1:
        local = head.tp_group.all_gather(local.contiguous(), dim=-1)
    return local[:, :vocab_size]


class RankAgreement:
    """The first rank's value on every rank of a process group (identity for one rank).

    Over SGLang's CPU (gloo) group of the ranks that share one batch: a host-side
    broadcast of one int64 per decision, no device synchronisation.
    """

    def __init__(self, group: Optional[Any] = None) -> None:
        self.group = group
        self.world_size = int(getattr(group, "world_size", 1) or 1) if group is not None else 1

    @classmethod
    def of_batch_ranks(cls) -> "RankAgreement":
        """The ranks that run one batch: the attention-TP group under DP attention,
        else the whole TP group (SGLang's ``get_dp_tp_group``)."""
        from sglang.srt.layers.dp_attention import get_dp_tp_group

        return cls(get_dp_tp_group())

    @classmethod
    def of_all_tp_ranks(cls) -> "RankAgreement":
        """Every rank of the TP group (all DP ranks): decisions that shape a forward with
        cross-DP collectives."""
        from sglang.srt.runtime_context import get_parallel

        return cls(get_parallel().tp_group)

    def first_rank(self, value: int) -> int:
        if self.world_size == 1:
            return int(value)
        buf = torch.tensor([int(value)], dtype=torch.int64)
        torch.distributed.broadcast(buf, src=self.group.ranks[0], group=self.group.cpu_group)
        return int(buf.item())

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order (for reporting, e.g. per-rank KV pools)."""
        if self.world_size == 1:
            return [obj]
        return self.group.all_gather_object(obj)
