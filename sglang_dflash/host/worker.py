"""The speculative worker SGLang's scheduler runs for ``--speculative-algorithm DFLASH``.

SGLang 0.5.23's spec-v2 contract, in the order the scheduler calls it:
``__init__`` -> :meth:`alloc_memory_pool` -> :meth:`init_attention_backends` ->
:meth:`init_cuda_graphs` (after the target captured its own graphs), then
:meth:`forward_batch_generation` per batch and the host-side feedback calls.

This class only translates: SGLang's batch into a :class:`~.batch.DecodeView`, the
target into a :class:`~.target.TargetModel`, and the speculator's
:class:`~sglang_dflash.spec.worker.StepOutcome` into SGLang's ``GenerationBatchResult``.
The algorithm lives in :class:`~sglang_dflash.spec.worker.Speculator`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from ..model.checkpoint import load_drafter
from ..model.config import DFlashConfig
from ..options import DFlashOptions
from ..spec.ports import StepOutcome
from ..spec.worker import Speculator
from . import api as sg
from .batch import DecodeView
from .features import RequestFeatures
from .disagg import DraftKVTransferView
from .parallel import RankAgreement, check_vocab_parallel, layout_of
from .spec_inputs import DFlashDraftState
from .target import TargetModel, draft_graph_plan, graph_settings, is_cuda, kv_slot_count, mask_token_id_of
from .version import OURS

logger = logging.getLogger(__name__)


class DFlashWorker(sg.BaseSpecWorker):
    def __init__(self, server_args, gpu_id: int, nccl_port: int, target_worker, **_: Any) -> None:
        super().__init__()
        self.server_args = server_args
        self._target_worker = target_worker
        self._draft_worker = None  # the drafter runs inside this worker, on the target's device
        runner = target_worker.model_runner
        self.model_runner = runner
        self.device = runner.device
        spec = sg.get_spec()
        self.draft_path = spec.speculative_draft_model_path
        verify_width = int(spec.speculative_num_draft_tokens)
        block_size = int(spec.speculative_dflash_block_size or verify_width)
        model_config = runner.model_config
        num_layers = int(model_config.hf_text_config.num_hidden_layers)
        config = DFlashConfig.from_pretrained(self.draft_path, target_num_layers=num_layers)
        config.validate_target(
            hidden_size=int(model_config.hidden_size), vocab_size=int(model_config.vocab_size), num_layers=num_layers
        )
        drafter = load_drafter(self.draft_path, dtype=runner.dtype, device=self.device, config=config)
        self.deterministic = bool(getattr(server_args, "enable_deterministic_inference", False))
        # Unseeded sampled requests draw from a generator only speculation consumes,
        # seeded with the launch's seed: the same numbers on every TP rank.
        self.unseeded_rng = torch.Generator().manual_seed(int(getattr(server_args, "random_seed", None) or 0))
        layout = layout_of(runner.model)
        check_vocab_parallel(runner.model, layout)
        self.target = TargetModel(target_worker, config, layout=layout)
        self.target.bind_drafter(drafter)
        self.features = RequestFeatures(self.target.vocab_size, self.device)
        labels = {"model_name": server_args.served_model_name or server_args.model_path}
        options = DFlashOptions.from_env()
        if layout.dp_attention:
            options = pinned_for_dp_attention(options)
        self.batch_ranks = RankAgreement.of_batch_ranks()  # the TP ranks that run this batch together
        self.speculator = Speculator(
            drafter=drafter,
            config=config,
            options=options,
            block_size=block_size,
            verify_width=verify_width,
            mask_token_id=mask_token_id_of(config, server_args),
            device=self.device,
            prometheus_labels=labels if getattr(server_args, "enable_metrics", False) else None,
            ranks=self.batch_ranks,
        )
        logger.info(
            "sglang-dflash worker: drafter %s (%d layers, features from target layers %s), block %d, mask token %d",
            self.draft_path,
            config.num_layers,
            list(config.target_layer_ids),
            block_size,
            self.speculator.mask_token_id,
        )

    # ------------------------------------------------------------------ set-up
    def alloc_memory_pool(self, memory_pool_config=None, req_to_token_pool=None, token_to_kv_pool_allocator=None):
        """The drafter's cache gets one row per target KV slot (same ids, same allocator)."""
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool_allocator = token_to_kv_pool_allocator
        num_slots = kv_slot_count(self.model_runner.token_to_kv_pool)
        kv = self.speculator.alloc_kv(num_slots, self.model_runner.dtype)
        logger.info("sglang-dflash drafter KV cache: %d slots, %.1f MiB", num_slots, kv.bytes() / 2**20)

    def init_attention_backends(self) -> None:
        """Runs before any CUDA-graph capture (the target's too): graph use is decided
        from SGLang's resolved settings, and every weight the draft step reads is laid
        out here, so captured graphs never read storage that later moves."""
        self.target.check_capture_points()
        self.target.check_verify_attention()
        on_cuda = is_cuda(self.device)
        settings = graph_settings() if on_cuda else None
        self.speculator.init_drafting(
            self.target,
            attention_backend=sg.get_spec().speculative_draft_attention_backend,
            graphs=draft_graph_plan(on_cuda, settings, collectives=self.target.layout.collectives),
            cuda=on_cuda,
        )

    def init_cuda_graphs(self) -> None:
        """After the target's own capture: pick plain decode's path, capture the drafter."""
        self.target.choose_plain_decode_path()
        self.speculator.capture_graphs()

    # ------------------------------------------------------------------ steps
    @property
    def primary_draft_kv_pool(self) -> DraftKVTransferView:
        """What SGLang's PD disaggregation transfers with the target KV: the drafter's
        rows, addressed by the same page indices (see :mod:`.disagg`)."""
        return DraftKVTransferView(self.speculator.kv, page_size=self.model_runner.token_to_kv_pool.page_size)

    @torch.inference_mode()
    def forward_batch_generation(self, batch, on_publish=None, grammar_barrier=None, pp_proxy_tensors=None, **_: Any):
        # The local mode decides: under DP attention an idle rank's batch says whether
        # some other rank extends (is_extend_in_batch), never that this one does.
        mode = batch.forward_mode
        if mode.is_idle():
            return self._idle(batch, on_publish)
        if mode.is_extend():
            return self._prefill(batch, on_publish)
        return self._decode(batch, on_publish, grammar_barrier)

    def _prefill(self, batch, on_publish):
        self.features.on_prefill(batch)
        out, features, positions, slots = self.target.prefill(batch)
        self.speculator.inject_context(features, positions, slots)
        out.new_seq_lens = batch.seq_lens
        if on_publish is not None:
            on_publish(batch.seq_lens)
        out.next_draft_input = self._state(bonus_tokens=out.next_token_ids.long(), new_seq_lens=batch.seq_lens.long())
        return out

    def _decode(self, batch, on_publish, grammar_barrier=None):
        view = DecodeView(
            batch,
            verify_width=self.speculator.verify_width,
            block_size=self.speculator.block_size,
            rule=self.speculator.options.sampling_rule,
            deterministic=self.deterministic,
            req_to_token=self.req_to_token_pool.req_to_token,
            generator=self.unseeded_rng,
        )
        view.logits_steps = self.features.logits_steps(batch, view.rids, view.bonus, grammar_barrier)
        outcome = self.speculator.decode(view)
        self.features.after_step(batch, view.rids, outcome, outcome.verify.raw)
        return self._result(outcome, on_publish)

    def _result(self, outcome: StepOutcome, on_publish):
        acceptance = outcome.acceptance
        if on_publish is not None:
            on_publish(outcome.new_seq_lens)
        return sg.GenerationBatchResult(
            logits_output=outcome.verify.raw,
            next_token_ids=acceptance.out_tokens.reshape(-1),
            accept_lens=acceptance.commit_lens.to(torch.int32),
            new_seq_lens=outcome.new_seq_lens,
            next_draft_input=self._state(bonus_tokens=acceptance.bonus, new_seq_lens=outcome.new_seq_lens),
            can_run_cuda_graph=outcome.verify.graphed,
            speculative_num_draft_tokens=acceptance.out_tokens.shape[1],
        )

    def _state(self, **tensors) -> DFlashDraftState:
        return DFlashDraftState(**tensors, verify_width=self.speculator.verify_width)

    def _idle(self, batch, on_publish):
        """No requests on this rank. Under DP attention the target's forward still has
        cross-DP collectives, so this rank runs it empty, shaped like its peers' round:
        an extend when some rank extends, else a verify of the pinned width."""
        if self.target.layout.dp_attention:
            if batch.is_extend_in_batch:
                self.target.idle_prefill(batch)
            else:
                self.target.idle_verify(batch, self.speculator.pinned_verify_len())
        empty = DFlashDraftState.empty(self.device, verify_width=self.speculator.verify_width)
        if on_publish is not None:
            on_publish(empty.new_seq_lens)
        return sg.GenerationBatchResult(
            logits_output=None,
            next_token_ids=empty.bonus_tokens,
            accept_lens=torch.empty(0, dtype=torch.int32, device=self.device),
            new_seq_lens=empty.new_seq_lens,
            next_draft_input=empty,
            speculative_num_draft_tokens=self.speculator.block_size,
        )

    # ------------------------------------------------------------------ feedback
    def on_verify_complete_cpu(self, num_correct_drafts_per_req, batch_size: int = 0) -> None:
        """SGLang hands back each decode step's accepted counts, in step order."""
        self.speculator.observe_step(num_correct_drafts_per_req)

    def note_request_finished(self, *, rid: str, natural_stop: bool) -> None:
        self.speculator.forget(rid)
        self.features.forget(rid)

    def describe(self) -> dict:
        """What this worker is and holds (surfaced in SGLang's get_server_info)."""
        from .. import __version__

        config = self.speculator.config
        return {
            "backend": OURS,
            "version": __version__,
            "worker": type(self).__name__,
            "drafter": {
                "path": self.draft_path,
                "architecture": config.architecture,
                "family": config.family,
                "convolution": {"kernel_size": config.conv_kernel_size, "group_size": config.conv_group_size}
                if config.has_convolution else None,
                "selector": {"top_k": config.selector_top_k, "rank": config.selector_rank} if config.has_selector else None,
                "layers": config.num_layers,
                "target_layer_ids": list(config.target_layer_ids),
                "mask_token_id": self.speculator.mask_token_id,
            },
            "plain_decode": self.target.plain_decode_path,
            "parallel": self.target.layout.as_dict(),
            **self.speculator.describe(),
        }

    def gather_over_batch_ranks(self, obj: Any) -> list:
        """Every rank's ``obj`` (rank order) over the ranks sharing this batch; every
        rank must call it at the same point (SGLang broadcasts control requests)."""
        return self.batch_ranks.gather(obj)


def pinned_for_dp_attention(options: DFlashOptions) -> DFlashOptions:
    """Under DP attention every DP rank's verify forward must have the same width (SGLang
    scales its cross-DP token counts by each rank's own nodes per request), idle ranks
    included; one fixed length per launch guarantees it with no per-step agreement."""
    if options.adaptive and options.verify_len is None:
        logger.info("sglang-dflash: DP attention verifies whole blocks (adaptive verify length off)")
    return dataclasses.replace(options, adaptive=False)
