"""Block attention for the drafter on FlashInfer: the GPU twin of ``TorchDraftAttention``.

Each drafter layer's cache ``cache.k[layer]`` ``[slots, kv_heads, hd]`` is read in place
as a page-size-1 paged cache ``[slots, 1, kv_heads, hd]`` (NHD), so nothing is gathered:
a request's pages are its ``kv_slots`` row, context then block. The mapping of
:class:`DraftAttnPlan`'s masks onto FlashInfer's:

* full-attention layers: ``causal=False`` -- every block query sees all ``kv_len`` keys;
* sliding layers: ``causal=True`` (FlashInfer aligns the ``B`` queries with the last
  ``B`` keys, i.e. query ``j`` sits at position ``prefix + j``, which is exactly
  ``plan.q_positions``) and ``window_left = window - 1`` (keys with
  ``q_pos - k_pos < window``). A non-causal sliding layer only has FlashInfer's left
  window, which equals the torch mask while ``window >= block_size``; smaller windows
  are refused.

Layers of one kind share one wrapper (planned once per step, run per layer). CUDA-graph
mode keeps one wrapper set per batch-size bucket over fixed index buffers: ``bind``
(host work, outside the graph) re-plans them and the captured ``run`` reads the buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..model.config import DFlashConfig
from ..model.draft_attention import DraftAttnPlan
from ..model.draft_kv import DraftKVCache

DEFAULT_WORKSPACE_BYTES = 256 << 20


class FlashInferUnavailable(RuntimeError):
    """FlashInfer attention cannot run here (no CUDA device or no flashinfer)."""


def _import_flashinfer():
    try:
        import flashinfer
    except ImportError as exc:
        raise FlashInferUnavailable(
            "FlashInferDraftAttention needs flashinfer (pip install 'sglang-dflash[gpu]', i.e. "
            "flashinfer-python==0.7.2); use sglang_dflash.draft_attention.TorchDraftAttention without it"
        ) from exc
    return flashinfer


@dataclass(frozen=True)
class LayerKind:
    """What FlashInfer is planned with for a group of layers."""

    causal: bool
    window_left: int  # -1: no window


def layer_kinds(config: DFlashConfig) -> tuple[list[LayerKind], list[int]]:
    """(distinct kinds, kind index of every layer), from the config's per-layer mask."""
    kinds: list[LayerKind] = []
    of_layer: list[int] = []
    for layer in range(config.num_layers):
        window = config.layer_window(layer)
        causal = config.layer_is_causal(layer)
        if window is not None and not causal and window < config.block_size:
            raise ValueError(
                f"drafter layer {layer}: a non-causal sliding window of {window} < block_size "
                f"{config.block_size} is not expressible in FlashInfer; use TorchDraftAttention"
            )
        kind = LayerKind(causal=causal, window_left=-1 if window is None else int(window) - 1)
        if kind not in kinds:
            kinds.append(kind)
        of_layer.append(kinds.index(kind))
    return kinds, of_layer


@dataclass
class PagedCSR:
    """A plan in FlashInfer's page-size-1 CSR form.

    qo_indptr:  [bs + 1] int32, host: ``i * B``.
    kv_indptr:  [bs + 1] int32, host: prefix sums of ``kv_lens``.
    kv_indices: [kv_indptr[-1]] int32, on the plan's device: ``kv_slots[i, :kv_lens[i]]``
                of every request, concatenated.
    """

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor

    @property
    def total_kv(self) -> int:
        return int(self.kv_indptr[-1])


def paged_csr(plan: DraftAttnPlan, kv_lens_cpu: Optional[torch.Tensor] = None) -> PagedCSR:
    """Flatten ``plan`` without a device sync beyond ``kv_lens_cpu`` (fetched if absent).

    Valid entries are scattered to their CSR offsets; padding columns all go to one spare
    element past the end, so no boolean indexing (and no sync) is needed.
    """
    bs, block = plan.batch_size, plan.block_size
    lens_host = (plan.kv_lens if kv_lens_cpu is None else kv_lens_cpu).to("cpu", torch.int64)
    width = plan.kv_slots.shape[1]
    if bs and int(lens_host.max()) > width:
        raise ValueError(f"kv_lens up to {int(lens_host.max())} exceed the plan's {width} kv_slots columns")
    kv_indptr = torch.zeros(bs + 1, dtype=torch.int32)
    kv_indptr[1:] = torch.cumsum(lens_host, 0)
    total = int(kv_indptr[-1])
    device = plan.kv_slots.device
    lens = plan.kv_lens.to(torch.int64)
    cols = torch.arange(width, device=device)
    dst = (torch.cumsum(lens, 0) - lens)[:, None] + cols[None, :]
    dst = torch.where(cols[None, :] < lens[:, None], dst, torch.full_like(dst, total))
    flat = torch.empty(total + 1, dtype=torch.int32, device=device)
    flat.scatter_(0, dst.reshape(-1), plan.kv_slots.reshape(-1).to(torch.int32))
    qo_indptr = torch.arange(bs + 1, dtype=torch.int32) * block
    return PagedCSR(qo_indptr=qo_indptr, kv_indptr=kv_indptr, kv_indices=flat[:total])


class FlashInferDraftAttention:
    """``bind(plan)`` / ``__call__(layer, q, k, v)`` like ``TorchDraftAttention``.

    graph_batch_sizes: buckets that get CUDA-graph wrappers (fixed index buffers);
                       ``bind(plan, graph=True)`` needs ``plan.batch_size`` among them.
    max_kv_tokens:     capacity of the graph-mode kv_indices buffer (sum of kv_lens over a
                       batch); check with :meth:`fits_graph` before a graphed step.
    """

    name = "flashinfer"

    def __init__(
        self,
        cache: DraftKVCache,
        config: DFlashConfig,
        *,
        graph_batch_sizes: Sequence[int] = (),
        max_kv_tokens: Optional[int] = None,
        workspace: Optional[torch.Tensor] = None,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
        backend: str = "fa2",
    ) -> None:
        if not cache.k.is_cuda:
            raise FlashInferUnavailable(
                f"FlashInferDraftAttention needs the drafter KV cache on a CUDA device, not {cache.k.device}; "
                "use TorchDraftAttention"
            )
        if cache.k.dtype not in (torch.float16, torch.bfloat16):
            raise FlashInferUnavailable(
                f"FlashInferDraftAttention runs float16/bfloat16 caches, not {cache.k.dtype}; use TorchDraftAttention"
            )
        self._flashinfer = _import_flashinfer()
        self.cache = cache
        self.config = config
        self.scale = config.head_dim**-0.5
        self.backend = backend
        self.kinds, self.kind_of_layer = layer_kinds(config)
        device = cache.k.device
        self.workspace = workspace if workspace is not None else torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        self.eager = [self._wrapper() for _ in self.kinds]
        self.graph_batch_sizes = sorted({int(b) for b in graph_batch_sizes})
        max_bs = max(self.graph_batch_sizes, default=0)
        self.max_kv_tokens = int(max_kv_tokens or 2 * cache.num_slots + max_bs * config.block_size)
        self.graph: dict[int, list] = {}
        if self.graph_batch_sizes:
            self._alloc_graph_buffers(max_bs, device)
            self.graph = {bs: [self._graph_wrapper(bs) for _ in self.kinds] for bs in self.graph_batch_sizes}
        self.plan: Optional[DraftAttnPlan] = None
        self._active: Optional[list] = None

    # ------------------------------------------------------------------ wrappers
    def _wrapper(self, **kwargs):
        return self._flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend=self.backend, **kwargs)

    def _alloc_graph_buffers(self, max_bs: int, device: torch.device) -> None:
        """One set of index buffers shared by every bucket (views of the same memory):
        only one bucket is planned and replayed at a time."""
        self._qo_indptr_buf = torch.zeros(max_bs + 1, dtype=torch.int32, device=device)
        self._kv_indptr_buf = torch.zeros(max_bs + 1, dtype=torch.int32, device=device)
        self._kv_indices_buf = torch.zeros(self.max_kv_tokens, dtype=torch.int32, device=device)
        self._last_page_len_buf = torch.ones(max_bs, dtype=torch.int32, device=device)

    def _graph_wrapper(self, bs: int):
        return self._wrapper(
            use_cuda_graph=True,
            qo_indptr_buf=self._qo_indptr_buf[: bs + 1],
            paged_kv_indptr_buf=self._kv_indptr_buf[: bs + 1],
            paged_kv_indices_buf=self._kv_indices_buf,
            paged_kv_last_page_len_buf=self._last_page_len_buf[:bs],
        )

    def fits_graph(self, batch_size: int, total_kv: int) -> bool:
        """Whether a (padded) batch can run on the graph wrappers."""
        return batch_size in self.graph and total_kv <= self.max_kv_tokens

    # ------------------------------------------------------------------ planning
    def bind(self, plan: DraftAttnPlan, *, kv_lens_cpu: Optional[torch.Tensor] = None, graph: bool = False) -> None:
        """Plan every layer kind for ``plan`` (host work; never inside a graph capture).

        kv_lens_cpu: ``plan.kv_lens`` on the host, if the caller has it (saves a sync).
        graph:       plan the CUDA-graph wrappers of bucket ``plan.batch_size``.
        """
        csr = paged_csr(plan, kv_lens_cpu)
        if graph:
            if not self.fits_graph(plan.batch_size, csr.total_kv):
                raise ValueError(
                    f"batch {plan.batch_size} with {csr.total_kv} kv tokens does not fit the graph buffers "
                    f"(buckets {self.graph_batch_sizes}, max_kv_tokens {self.max_kv_tokens})"
                )
            wrappers = self.graph[plan.batch_size]
        else:
            wrappers = self.eager
        last_page_len = torch.ones(plan.batch_size, dtype=torch.int32)
        cfg, dtype = self.config, self.cache.k.dtype
        for kind, wrapper in zip(self.kinds, wrappers):
            wrapper.plan(
                csr.qo_indptr,
                csr.kv_indptr,
                csr.kv_indices,
                last_page_len,
                cfg.num_heads,
                cfg.num_kv_heads,
                cfg.head_dim,
                1,
                causal=kind.causal,
                window_left=kind.window_left,
                sm_scale=self.scale,
                q_data_type=dtype,
                kv_data_type=dtype,
            )
        self.plan = plan
        self._active = wrappers

    # ------------------------------------------------------------------ attention
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [bs*B, heads, hd]; k, v: [bs*B, kv_heads, hd] (the block's own) -> [bs*B, heads*hd]."""
        if self._active is None:
            raise RuntimeError("FlashInferDraftAttention.bind(plan) must run before attention")
        self.cache.write(layer, self.plan.block_slots, k, v)
        wrapper = self._active[self.kind_of_layer[layer]]
        pages = (self.cache.k[layer].unsqueeze(1), self.cache.v[layer].unsqueeze(1))
        out = wrapper.run(q.to(self.cache.k.dtype).contiguous(), pages)
        return out.to(q.dtype).reshape(q.shape[0], -1)
