"""The whole draft step in CUDA graphs: embed block, drafter layers, lm_head, argmax.

A draft step is ~20 small kernels per drafter layer at batch sizes where each takes a
few microseconds, so launch overhead, not HBM, bounds it when run eagerly. One graph per
batch-size bucket replays the step with one launch. Inputs live in static buffers
(bonus tokens, block positions, block slots); a batch is padded up to its bucket with
rows that read and write only ``pad_slot`` (SGLang reserves KV slot 0 for exactly this)
and whose outputs are dropped. Attention is :class:`FlashInferDraftAttention` in graph
mode: :meth:`bind` re-plans the bucket's wrappers on the host before each replay, and
the captured kernels read the re-planned index buffers.

Batches above the largest bucket, or whose total context overflows the attention's
graph index buffer, run the wrapped :class:`BlockProposer` eagerly -- the decision is
made from host-side sizes before anything runs, never by catching a failure.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Sequence

import torch

from ..model.draft_attention import DraftAttnPlan
from ..spec.proposer import BlockProposer, Proposal, make_proposal
from ..spec.sampling import SampledRows

DEFAULT_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64)


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    logits: torch.Tensor  # [bucket, B-1, V] static output
    drafts: torch.Tensor  # [bucket, B-1] static output


class GraphedProposer:
    """Replays captured draft steps for a :class:`BlockProposer` whose ``attention`` is a
    ``FlashInferDraftAttention`` built with ``graph_batch_sizes`` covering ``batch_sizes``.

    capture_context: called once around all captures, e.g. SGLang's ``graph_capture()``
                     when the embedding / lm_head communicate across TP ranks; if the
                     object it yields has a ``stream``, capture runs on that stream.

    Returned logits/drafts of a replayed step are views of graph memory: valid until the
    next :meth:`draft` / :meth:`propose` call.
    """

    def __init__(
        self,
        proposer: BlockProposer,
        *,
        batch_sizes: Sequence[int] = DEFAULT_GRAPH_BATCH_SIZES,
        pad_slot: int = 0,
        capture_context: Optional[Callable[[], ContextManager]] = None,
    ) -> None:
        self.proposer = proposer
        self.attention = proposer.attention
        self.batch_sizes = sorted({int(b) for b in batch_sizes})
        planned = getattr(self.attention, "graph", {})
        missing = [b for b in self.batch_sizes if b not in planned]
        if missing:
            raise ValueError(
                f"GraphedProposer needs FlashInferDraftAttention(graph_batch_sizes=...) covering {missing}; "
                f"got attention {getattr(self.attention, 'name', type(self.attention).__name__)!r}"
            )
        self.block_size = proposer.block_size
        self.pad_slot = int(pad_slot)
        self.capture_context = capture_context
        self.device = next(proposer.drafter.parameters()).device
        max_bs, block = self.batch_sizes[-1], self.block_size
        self.bonus = torch.full((max_bs,), proposer.mask_token_id, dtype=torch.long, device=self.device)
        self.positions = torch.zeros((max_bs, block), dtype=torch.long, device=self.device)
        self.block_slots = torch.full((max_bs * block,), self.pad_slot, dtype=torch.long, device=self.device)
        self.graphs: dict[int, _Captured] = {}
        self._pool = None
        self.last_replayed = False  # whether the last draft() replayed a graph (telemetry)

    # ------------------------------------------------------------------ capture
    def capture(self) -> None:
        """Capture every bucket, largest first so smaller ones reuse its memory pool."""
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"CUDA graphs need the drafter on a CUDA device, not {self.device}")
        context = self.capture_context() if self.capture_context is not None else contextlib.nullcontext()
        with context as ctx, torch.no_grad():
            stream = getattr(ctx, "stream", None)
            for bs in reversed(self.batch_sizes):
                self.graphs[bs] = self._capture_one(bs, stream)

    def _capture_one(self, bs: int, stream: Optional["torch.cuda.Stream"]) -> _Captured:
        plan = self._fill_padding(0, bs, kv_slots=None, kv_lens=None)
        self.attention.bind(plan, kv_lens_cpu=torch.full((bs,), self.block_size), graph=True)
        side = stream or torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up: cuBLAS handles, FlashInfer/Triton modules
                self._step(bs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=side):
            logits, drafts = self._step(bs)
        self._pool = graph.pool()
        return _Captured(graph=graph, logits=logits, drafts=drafts)

    def _step(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured body: BlockProposer.draft_logits minus ``bind``, plus argmax."""
        proposer, block = self.proposer, self.block_size
        tokens = proposer.block_tokens(self.bonus[:bs])
        x = proposer.drafter.scale_input(proposer.embed(tokens.reshape(-1)))
        hidden = proposer.drafter(x, self.positions[:bs].reshape(-1), self.attention, block)
        hidden = hidden.view(bs, block, -1)[:, 1:].reshape(bs * (block - 1), -1)
        logits = proposer.lm_head(hidden).view(bs, block - 1, -1)
        return logits, logits.argmax(dim=-1)

    # ------------------------------------------------------------------ replay
    def bucket_for(self, batch_size: int) -> Optional[int]:
        """The smallest captured bucket that holds ``batch_size`` rows, or None."""
        return next((b for b in self.batch_sizes if b >= batch_size and b in self.graphs), None)

    def draft(
        self, bonus: torch.Tensor, plan: DraftAttnPlan, *, kv_lens_cpu: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[bs] bonus tokens -> (logits [bs, B-1, V], argmax drafts [bs, B-1])."""
        bs = bonus.shape[0]
        bucket = self.bucket_for(bs)
        lens_host = (plan.kv_lens if kv_lens_cpu is None else kv_lens_cpu).to("cpu", torch.int64)
        total = int(lens_host.sum()) + (0 if bucket is None else (bucket - bs) * self.block_size)
        self.last_replayed = bucket is not None and self.attention.fits_graph(bucket, total)
        if not self.last_replayed:
            logits = self.proposer.draft_logits(bonus, plan)
            return logits, logits.argmax(dim=-1)
        self.bonus[:bs].copy_(bonus)
        self.positions[:bs].copy_(plan.q_positions)
        self.block_slots[: bs * self.block_size].copy_(plan.block_slots)
        padded = self._fill_padding(bs, bucket, kv_slots=plan.kv_slots, kv_lens=plan.kv_lens)
        pad_lens = torch.full((bucket - bs,), self.block_size, dtype=torch.int64)
        self.attention.bind(padded, kv_lens_cpu=torch.cat([lens_host, pad_lens]), graph=True)
        captured = self.graphs[bucket]
        captured.graph.replay()
        return captured.logits[:bs], captured.drafts[:bs]

    def _fill_padding(
        self, bs: int, bucket: int, *, kv_slots: Optional[torch.Tensor], kv_lens: Optional[torch.Tensor]
    ) -> DraftAttnPlan:
        """Reset rows ``bs..bucket`` of the static inputs to padding and return the
        bucket-sized plan: padding rows are a lone block at positions 0..B-1 whose keys
        and writes all hit ``pad_slot``."""
        block, pad = self.block_size, bucket - bs
        self.bonus[bs:bucket].fill_(self.proposer.mask_token_id)
        self.positions[bs:bucket].copy_(torch.arange(block, device=self.device).expand(pad, block))
        self.block_slots[bs * block : bucket * block].fill_(self.pad_slot)
        width = block if kv_slots is None else kv_slots.shape[1]
        pad_slots = torch.full((pad, width), self.pad_slot, dtype=torch.long, device=self.device)
        pad_lens = torch.full((pad,), block, dtype=torch.long, device=self.device)
        return DraftAttnPlan(
            kv_slots=pad_slots if kv_slots is None else torch.cat([kv_slots.long(), pad_slots]),
            kv_lens=pad_lens if kv_lens is None else torch.cat([kv_lens.long(), pad_lens]),
            q_positions=self.positions[:bucket],
            block_slots=self.block_slots[: bucket * block],
        )

    def propose(
        self,
        bonus: torch.Tensor,
        plan: DraftAttnPlan,
        *,
        sampled: Optional[SampledRows] = None,
        kv_lens_cpu: Optional[torch.Tensor] = None,
    ) -> Proposal:
        """``BlockProposer.propose`` on the graphed step (same arguments and result)."""
        logits, drafts = self.draft(bonus, plan, kv_lens_cpu=kv_lens_cpu)
        return make_proposal(bonus, logits, drafts.clone(), sampled)
