"""The speculator's boundary: what the host provides, and what one step gives back.

The host layer (``sglang_dflash.host``) implements :class:`DecodeBatch` and
:class:`TargetPort` over SGLang; tests implement them over fakes. Nothing here knows
SGLang.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional, Protocol, Sequence

import torch

from .accept import Acceptance
from .logits import LogitsStep
from .sampling import SampledRows
from .verify_tree import VerifyTree


@dataclass
class VerifyOutput:
    """The target's verdict on a verify batch of ``N`` nodes per request.

    logits:   [bs, N, V] next-token logits after each node.
    features: [bs, N, K*H] the nodes' captured target features, in the drafter's order.
    graphed:  whether the target forward replayed a CUDA graph.
    raw:      the host's own output object, handed back in the step's outcome.
    """

    logits: torch.Tensor
    features: torch.Tensor
    graphed: bool
    raw: Any = None


class DecodeBatch(Protocol):
    """The host's view of one decode batch (typed reads; no SGLang names)."""

    rids: list[str]
    bonus: torch.Tensor  # [bs] previous bonus tokens (node 0 of this step's block)
    prefix_lens: torch.Tensor  # [bs] committed lengths (device)
    prefix_lens_cpu: Optional[torch.Tensor]  # the same on the host, when known
    plan_width_bound: int  # host bound on max(prefix) + the reserved verify width
    sampled: Optional[SampledRows]  # the sampled (non-greedy) requests, or None
    logits_steps: Sequence[LogitsStep]  # per-request logits processing, in order

    def slot_rows(self, width: int) -> torch.Tensor:
        """[bs, width] the requests' KV slot-table rows (slot ids in position order)."""


class TargetPort(Protocol):
    """What the speculator needs from the target model (implemented by the host)."""

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor: ...

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Drafter hidden [T, H] -> full-vocabulary logits [T, V] through the target's lm_head."""

    def verify(self, batch: DecodeBatch, tree: VerifyTree, slots: torch.Tensor) -> VerifyOutput: ...

    def plain_decode(self, batch: DecodeBatch, slots: torch.Tensor) -> VerifyOutput:
        """Speculation off: the target's one-token step on the bonus tokens (N = 1)."""

    def move_kv(self, dst_slots: torch.Tensor, src_slots: torch.Tensor) -> None: ...

    def commit(self, batch: DecodeBatch, commit_lens: torch.Tensor) -> None:
        """After acceptance: target state the verify computed for every node (the
        recurrent layers of hybrid targets) is kept at each request's last committed node."""


class RankAgreement(Protocol):
    """The ranks that run one batch together (tensor parallelism) must decide alike."""

    def first_rank(self, value: int) -> int:
        """The group's first rank's ``value``, on every rank."""


class OneRank:
    """A single process: every decision is already unanimous."""

    def first_rank(self, value: int) -> int:
        return value


@dataclass(frozen=True)
class DraftGraphPlan:
    """Whether the draft step runs as CUDA graphs, for which batch sizes, and why (not)."""

    batch_sizes: tuple[int, ...] = ()
    reason: str = "not on CUDA"
    capture_context: Optional[Callable[[], ContextManager]] = None

    @property
    def enabled(self) -> bool:
        return bool(self.batch_sizes)


@dataclass
class StepOutcome:
    """One decode step's result, per request.

    acceptance:   accepted drafts, emitted tokens [bs, N] and the new bonus.
    verify_len:   nodes verified per request (1 = speculation was off).
    new_seq_lens: [bs] committed lengths after the step.
    verify:       the target's output for the step (its ``raw`` goes back to the host).
    logits:       [bs, N, V] the logits acceptance ran on (after the logits steps);
                  the emitted tokens' log-probabilities come from them.
    """

    acceptance: Acceptance
    verify_len: int
    new_seq_lens: torch.Tensor
    verify: VerifyOutput
    logits: Optional[torch.Tensor] = None
