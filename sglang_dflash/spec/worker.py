"""The DFlash speculative decoder: one decode step for a batch, independent of SGLang.

    request -> draft -> verify tree -> target verify -> logits steps -> accept -> inject

1. **draft** -- the block ``[bonus, MASK x (B-1)]`` of every request goes through the
   drafter once (:class:`~.proposer.BlockProposer`, or its CUDA-graph replay), attending
   over the request's injected context; drafts are argmax (greedy) or samples.
2. **verify tree** -- the block becomes a chain, or a top-k tree (:mod:`.verify_tree`).
3. **target verify** -- one forward of the target scores every node and captures its
   target features (the host does it: :class:`~.ports.TargetPort`).
4. **logits steps** -- per-position request features (grammar masks, penalties, bias)
   rewrite the target's logits (:mod:`.logits`).
5. **accept** -- longest matching prefix plus a bonus token, or p/q rejection sampling
   (:mod:`.accept`).
6. **inject** -- the committed nodes' target features become drafter K/V rows at their
   KV slots. Rows past a request's new length are rewritten by the next step before
   anything attends to them.

The host layer (``sglang_dflash.host``) owns everything SGLang: it builds the batch
view this module reads (:class:`~.ports.DecodeBatch`), runs the target
(:class:`~.ports.TargetPort`), and turns a :class:`~.ports.StepOutcome` into SGLang's
result. KV slots, their lifetime and
the committed lengths stay SGLang's; the drafter's cache rows are addressed by the
target's own slot ids.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Callable, Optional, Sequence

import torch

from ..model.config import DFlashConfig, DFlashConfigError
from ..model.draft_attention import DraftAttnPlan, TorchDraftAttention
from ..model.draft_kv import DraftKVCache
from ..model.drafter import DFlashDrafter
from ..options import DFlashOptions
from ..telemetry.metrics import DFlashMetrics
from ..telemetry.step_clock import StepClock
from .accept import (
    Acceptance,
    GreedyRule,
    greedy_chain_acceptance,
    greedy_tree_acceptance,
    off_chain_paths,
    verify_chain,
)
from .adaptive import VerifyLengthPolicy
from .logits import apply_logits_steps, prepare_logits_steps
from .ports import DecodeBatch, DraftGraphPlan, OneRank, RankAgreement, StepOutcome, TargetPort, VerifyOutput
from .proposer import BlockProposer, Proposal
from .verify_tree import VerifyTree, build_chain, build_topk_tree

logger = logging.getLogger(__name__)

# Why a DFlash2 draft step is not captured: the walk's sampled rows read per-request
# temperatures and uniforms that the graph's static inputs do not carry yet.
SELECTOR_RUNS_EAGER = "DFlash2 draft steps (candidate selector) are not captured; they run eagerly"
SELECTOR_NO_TREE = (
    "tree verification (--speculative-dflash-tree-topk > 1) is not supported with DFlash2 drafters: "
    "their drafts are one path through the selector's lattice; verify the chain"
)


def drafter_graph_plan(config: DFlashConfig, plan: DraftGraphPlan) -> DraftGraphPlan:
    """The attention's graph plan, unless the drafter's step cannot be captured (DFlash2)."""
    if config.has_selector and plan.enabled:
        return DraftGraphPlan(reason=SELECTOR_RUNS_EAGER)
    return plan


# ------------------------------------------------------------------ the speculator
class Speculator:
    """Drafts, verifies and commits DFlash blocks; set up in SGLang's start-up order:
    :meth:`alloc_kv`, :meth:`init_drafting` (all weights, attention, injection, before
    any capture), then :meth:`capture_graphs`."""

    def __init__(
        self,
        *,
        drafter: DFlashDrafter,
        config: DFlashConfig,
        options: DFlashOptions,
        block_size: int,
        verify_width: int,
        mask_token_id: int,
        device: torch.device,
        prometheus_labels: Optional[dict] = None,
        ranks: Optional[RankAgreement] = None,
    ) -> None:
        if options.tree and config.has_selector:
            raise DFlashConfigError(SELECTOR_NO_TREE)
        self.drafter = drafter
        self.config = config
        self.options = options
        self.block_size = block_size
        self.verify_width = verify_width
        self.mask_token_id = mask_token_id
        self.device = torch.device(device)
        adaptive = options.adaptive and not options.tree
        self.policy = VerifyLengthPolicy(block_size, fixed=options.verify_len, adaptive=adaptive)
        # Tensor-parallel ranks run this step on the same batch; the adaptive length
        # depends on rank-local step timings, so the group takes its first rank's.
        self.ranks: RankAgreement = ranks or OneRank()
        self.clock = StepClock(self.policy.cost)
        self.metrics = DFlashMetrics(block_size=verify_width, device=self.device, prometheus_labels=prometheus_labels)
        self.kv: Optional[DraftKVCache] = None
        self.proposer: Optional[BlockProposer] = None
        self.graphed = None
        self.graph_plan = DraftGraphPlan()
        self.inject: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] = self._not_ready
        self.inject_kind = "none"
        self.greedy: GreedyRule = greedy_chain_acceptance
        self._pending_steps: deque = deque()

    # ------------------------------------------------------------------ set-up
    def alloc_kv(self, num_slots: int, dtype: torch.dtype) -> DraftKVCache:
        """The drafter's cache: one row per target KV slot (same ids, same allocator)."""
        cfg = self.config
        self.kv = DraftKVCache(
            num_layers=cfg.num_layers,
            num_slots=num_slots,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            dtype=dtype,
            device=self.device,
        )
        return self.kv

    def init_drafting(
        self, target: TargetPort, *, attention_backend: Optional[str], graphs: DraftGraphPlan, cuda: bool
    ) -> None:
        """Build everything that owns or re-lays weights, before any CUDA-graph capture:
        the drafter's attention, the proposer and the context injector (a captured
        step keeps the addresses of every weight it reads). ``cuda``: take the CUDA
        paths (FlashInfer attention, graphs, the fused Triton injector and greedy rule)."""
        self.target = target
        attention, plan = self._drafter_attention(attention_backend, graphs, cuda)
        self.graph_plan = drafter_graph_plan(self.config, plan)
        self.proposer = BlockProposer(
            self.drafter,
            attention,
            embed=target.embed,
            lm_head=target.draft_logits,
            mask_token_id=self.mask_token_id,
            block_size=self.block_size,
        )
        if cuda:
            from ..gpu import FusedContextInjector, fused_greedy_acceptance

            injector = FusedContextInjector(self.drafter)
            self.inject = lambda features, positions, slots: injector(self.kv, features, positions, slots)
            self.inject_kind = "fused-triton" if injector.kernel else "fused-torch"
            if injector.kernel:
                self.greedy = fused_greedy_acceptance
        else:
            self.inject = lambda features, positions, slots: self.drafter.inject(self.kv, features, positions, slots)
            self.inject_kind = "torch"

    def capture_graphs(self) -> None:
        """Capture the draft step per batch-size bucket, if the plan says so."""
        if not self.graph_plan.enabled:
            return
        from ..gpu import GraphedProposer

        self.graphed = GraphedProposer(
            self.proposer,
            batch_sizes=self.graph_plan.batch_sizes,
            pad_slot=0,  # the target's KV slot 0 is its padding slot, never a token's
            capture_context=self.graph_plan.capture_context,
        )
        self.graphed.capture()

    def _drafter_attention(self, requested: Optional[str], graphs: DraftGraphPlan, on_cuda: bool):
        """FlashInfer on CUDA (bf16/fp16) when available, else the portable torch SDPA;
        graphs only with FlashInfer, and the reason when there are none."""
        if not on_cuda or requested == "torch_native":
            if requested == "flashinfer":
                raise DFlashConfigError("--speculative-draft-attention-backend flashinfer needs a CUDA device")
            reason = graphs.reason if not on_cuda else "drafter attention is torch_native"
            return TorchDraftAttention(self.kv, self.config), DraftGraphPlan(reason=reason)
        from .. import gpu

        if not gpu.flashinfer_available() or self.kv.k.dtype not in (torch.bfloat16, torch.float16):
            if requested == "flashinfer":
                raise DFlashConfigError("the FlashInfer drafter needs flashinfer installed and a bf16/fp16 model")
            logger.warning("sglang-dflash: FlashInfer unavailable for the drafter; torch SDPA, no drafter CUDA graphs")
            return TorchDraftAttention(self.kv, self.config), DraftGraphPlan(reason="FlashInfer unavailable")
        attention = gpu.FlashInferDraftAttention(self.kv, self.config, graph_batch_sizes=graphs.batch_sizes)
        return attention, graphs

    def _not_ready(self, *args) -> None:
        raise RuntimeError("Speculator.init_drafting() must run before the first forward")

    # ------------------------------------------------------------------ prefill
    def inject_context(self, features: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """Committed tokens' target features [T, K*H] become drafter K/V at their slots."""
        self.clock.other_forward()
        self.inject(features, positions, slots)

    # ------------------------------------------------------------------ decode
    def decode(self, batch: DecodeBatch) -> StepOutcome:
        sampled = batch.sampled
        use_tree = self.options.tree and sampled is None
        verify_len = self.verify_width if use_tree else self._choose_verify_len(batch.rids)
        self.clock.decode_started(len(batch.rids), verify_len)
        if verify_len == 1:
            return self._plain_decode(batch)
        with self.metrics.phase("draft"):
            proposal = self._propose(batch, verify_len)
        tree = self._verify_tree(proposal, verify_len, use_tree)
        slots = self._verify_slots(batch, tree.num_nodes)
        prepare_logits_steps(batch.logits_steps, tree)
        with self.metrics.phase("verify"):
            out = self.target.verify(batch, tree, slots)
        logits = apply_logits_steps(batch.logits_steps, out.logits, tree)
        features = out.features
        if tree.is_chain:
            acceptance = verify_chain(proposal.tokens, proposal.draft_probs, logits, sampled, self.greedy)
        else:
            acceptance = greedy_tree_acceptance(tree.tokens, tree.parents, logits.argmax(dim=-1), self.block_size - 1)
            features = self._commit_tree_path(acceptance.path, slots, features)
        self.target.commit(batch, acceptance.commit_lens)
        self._inject_committed(batch, acceptance, features, slots)
        return self._outcome(batch, verify_len, acceptance, out, logits)

    def pinned_verify_len(self) -> int:
        """The one verify length of a launch whose length never varies (DP attention)."""
        if self.policy.varies or self.options.tree:
            raise RuntimeError("the verify length varies per step in this configuration")
        return self.policy.choose(())

    def _choose_verify_len(self, rids: Sequence[str]) -> int:
        choice = self.policy.choose(rids)
        return self.ranks.first_rank(choice) if self.policy.varies else choice

    def _plain_decode(self, batch: DecodeBatch) -> StepOutcome:
        """Speculation off: the target's own one-token step on the bonus, still
        injecting the token's features so the drafter's context stays complete."""
        slots = self._verify_slots(batch, 1)
        chain = build_chain(batch.bonus[:, None].long())
        prepare_logits_steps(batch.logits_steps, chain)
        with self.metrics.phase("verify"):
            out = self.target.plain_decode(batch, slots)
        logits = apply_logits_steps(batch.logits_steps, out.logits, chain)
        acceptance = verify_chain(chain.tokens, None, logits, batch.sampled, self.greedy)
        self.target.commit(batch, acceptance.commit_lens)
        self._inject_committed(batch, acceptance, out.features, slots)
        return self._outcome(batch, 1, acceptance, out, logits)

    def _verify_tree(self, proposal: Proposal, verify_len: int, use_tree: bool) -> VerifyTree:
        if not use_tree:
            return build_chain(proposal.tokens)
        top = proposal.logits.float().log_softmax(dim=-1).topk(self.options.tree_topk, dim=-1)
        return build_topk_tree(proposal.tokens, top.indices, top.values, verify_len)

    def _inject_committed(self, batch: DecodeBatch, acceptance: Acceptance, features: torch.Tensor, slots) -> None:
        """Inject every node a request may commit (its whole accepted prefix); rows past
        its commit length hold rejected nodes' features and are rewritten before use."""
        bs, committed = acceptance.out_tokens.shape
        positions = batch.prefix_lens.long()[:, None] + torch.arange(committed, device=self.device)
        self.inject(
            features[:, :committed].reshape(bs * committed, -1), positions.reshape(-1), slots[:, :committed].reshape(-1)
        )

    def _outcome(
        self, batch: DecodeBatch, verify_len: int, acceptance: Acceptance, out: VerifyOutput, logits: torch.Tensor
    ) -> StepOutcome:
        self._pending_steps.append((batch.rids, verify_len, off_chain_paths(acceptance)))
        self.metrics.note_graph(verify_len, out.graphed)
        new_seq_lens = batch.prefix_lens + acceptance.commit_lens
        return StepOutcome(acceptance, verify_len, new_seq_lens, verify=out, logits=logits)

    def _propose(self, batch: DecodeBatch, verify_len: int) -> Proposal:
        """Draft one block (column 0 is the bonus) and keep the first ``verify_len`` nodes."""
        plan = DraftAttnPlan.from_slot_rows(
            slot_rows=batch.slot_rows(batch.plan_width_bound),
            prefix_lens=batch.prefix_lens,
            block_size=self.block_size,
            width=batch.plan_width_bound,
        )
        bonus = batch.bonus
        replayed = False
        if self.graphed is not None and self.graphed.bucket_for(bonus.shape[0]) is not None:
            kv_lens_cpu = None if batch.prefix_lens_cpu is None else batch.prefix_lens_cpu + self.block_size
            proposal = self.graphed.propose(bonus, plan, sampled=batch.sampled, kv_lens_cpu=kv_lens_cpu)
            replayed = self.graphed.last_replayed
        else:
            proposal = self.proposer.propose(bonus, plan, sampled=batch.sampled)
        self.metrics.note_draft(replayed)
        if verify_len < self.block_size and not self.options.tree:
            proposal = proposal.truncated(verify_len)
        return proposal

    def _verify_slots(self, batch: DecodeBatch, n: int) -> torch.Tensor:
        """[bs, n] KV slots of the verify nodes: the reserved slots after each prefix."""
        cols = batch.prefix_lens.long()[:, None] + torch.arange(n, device=self.device)
        return batch.slot_rows(batch.plan_width_bound).gather(1, cols).long()

    def _commit_tree_path(self, path: torch.Tensor, slots: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Move the accepted path's target KV to the committed slots (depth order) and
        return the path's features in that order."""
        depth_slots = slots[:, : path.shape[1]]
        path_slots = slots.gather(1, path)
        self.target.move_kv(depth_slots.reshape(-1), path_slots.reshape(-1))
        return features.gather(1, path[:, :, None].expand(-1, -1, features.shape[-1]))

    # ------------------------------------------------------------------ feedback
    def observe_step(self, num_accepted_per_req: Sequence[int]) -> None:
        """A decode step's accepted counts, on the host, in step order."""
        if not self._pending_steps:
            return
        rids, verify_len, off_chain = self._pending_steps.popleft()
        if len(rids) != len(num_accepted_per_req):
            logger.warning("sglang-dflash: step feedback out of sync; dropping it")
            self._pending_steps.clear()
            return
        self.policy.observe(rids, verify_len, num_accepted_per_req, None)
        # The step's results are on the host by now, so reading its count costs no wait.
        self.metrics.observe_step(verify_len, num_accepted_per_req, 0 if off_chain is None else int(off_chain))

    def forget(self, rid: str) -> None:
        self.policy.acceptance.forget([rid])

    def describe(self) -> dict:
        """What this speculator runs, holds and has measured."""
        return {
            "block_size": self.block_size,
            "verify_width": self.verify_width,
            "options": {
                "adaptive": self.options.adaptive,
                "verify_len": self.options.verify_len,
                "tree_topk": self.options.tree_topk,
                "sampling": self.options.sampling_rule,
            },
            "acceptance_by_position": [round(float(a), 4) for a in self.policy.acceptance.global_alpha()],
            "step_ms": {f"bs{b}_len{l}": round(t * 1e3, 3) for (b, l), t in sorted(self.policy.cost.cells.items())},
            "drafter_attention": getattr(self.proposer.attention, "name", None) if self.proposer else None,
            "drafter_graphs": {
                "batch_sizes": list(self.graphed.batch_sizes) if self.graphed is not None else [],
                "reason": None if self.graphed is not None else self.graph_plan.reason,
            },
            "context_injection": self.inject_kind,
            "greedy_acceptance": "triton" if self.greedy is not greedy_chain_acceptance else "torch",
            "drafter_kv_bytes": self.kv.bytes() if self.kv is not None else 0,
            "stats": self.metrics.totals.as_dict(),
        }
