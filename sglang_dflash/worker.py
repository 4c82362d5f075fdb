"""The DFlash speculative worker inside SGLang's scheduler (spec-v2 contract).

One decode step, per batch:

1. **draft** -- the block ``[bonus, MASK x (B-1)]`` of every request goes through the
   drafter once (:class:`~sglang_dflash.proposer.BlockProposer`), attending over the
   request's injected context; drafts are argmax (greedy) or samples (sampled requests).
2. **verify** -- the block becomes a linear verify tree and one TARGET_VERIFY forward of
   the target scores every node and captures its target features.
3. **accept** -- longest matching prefix plus a bonus token (greedy), or rejection
   sampling against the drafter's probabilities (sampled).
4. **inject** -- the verified nodes' target features become drafter K/V rows at their
   slots. Only committed rows are ever read again: rows past a request's new length
   are rewritten by the next step before anything attends to them.

Prefill runs the target with feature capture and injects the prompt. KV slots, their
lifetime and the committed lengths stay SGLang's: the worker reads ``req_to_token``,
writes the drafter's own cache rows at the target's slot ids, and reports accepted
tokens; the scheduler commits them, handles EOS/stop strings/length mid-block, and
frees what a request no longer needs.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from . import sglang_compat as sg
from .checkpoint import load_drafter
from .config import DFlashConfig, DFlashConfigError, capture_points
from .draft_attention import DraftAttnPlan, TorchDraftAttention
from .draft_kv import DraftKVCache
from .proposer import BlockProposer
from .sampling import RowSampling
from .spec_state import BlockVerifyInput, DFlashDraftState
from .verification import sampled_row_index, verify_chain
from .verify_tree import VerifyTree, build_chain

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
        self.block_size = int(spec.speculative_num_draft_tokens)
        model_config = runner.model_config
        self.num_target_layers = int(model_config.hf_text_config.num_hidden_layers)
        self.vocab_size = int(model_config.vocab_size)
        path = spec.speculative_draft_model_path
        self.config = DFlashConfig.from_pretrained(path, target_num_layers=self.num_target_layers)
        self.config.validate_target(
            hidden_size=int(model_config.hidden_size), vocab_size=self.vocab_size, num_layers=self.num_target_layers
        )
        self.drafter = load_drafter(path, dtype=runner.dtype, device=self.device, config=self.config)
        self.mask_token_id = _resolve_mask_token_id(self.config, server_args)
        self.tp_size = int(getattr(runner, "tp_size", 1))
        self._feature_order = self.config.captured_feature_order()
        self.kv: Optional[DraftKVCache] = None
        self.proposer: Optional[BlockProposer] = None
        logger.info(
            "sglang-dflash worker: drafter %s (%d layers, features from target layers %s), block %d, mask token %d",
            path,
            self.config.num_layers,
            list(self.config.target_layer_ids),
            self.block_size,
            self.mask_token_id,
        )

    # ------------------------------------------------------------------ set-up
    def alloc_memory_pool(self, memory_pool_config=None, req_to_token_pool=None, token_to_kv_pool_allocator=None):
        """The drafter's cache gets one row per target KV slot (same ids, same allocator)."""
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool_allocator = token_to_kv_pool_allocator
        num_slots = self.model_runner.token_to_kv_pool.get_key_buffer(0).shape[0]
        self.kv = DraftKVCache(
            num_layers=self.config.num_layers,
            num_slots=num_slots,
            num_kv_heads=self.config.num_kv_heads,
            head_dim=self.config.head_dim,
            dtype=self.model_runner.dtype,
            device=self.device,
        )
        logger.info("sglang-dflash drafter KV cache: %d slots, %.1f MiB", num_slots, self.kv.bytes() / 2**20)

    def init_attention_backends(self) -> None:
        self._check_capture_points()
        model = self.model_runner.model
        self.proposer = BlockProposer(
            self.drafter,
            TorchDraftAttention(self.kv, self.config),
            embed=model.get_input_embeddings(),
            lm_head=self._full_vocab_logits,
            mask_token_id=self.mask_token_id,
            block_size=self.block_size,
        )

    def init_cuda_graphs(self) -> None:
        pass

    def _check_capture_points(self) -> None:
        """Refuse to run if the target does not capture what the drafter was trained on."""
        model = self.model_runner.model
        installed = getattr(getattr(model, "model", model), "layers_to_capture", None)
        if not getattr(model, "capture_aux_hidden_states", False) or installed is None:
            raise DFlashConfigError(
                f"target {type(model).__name__} does not capture DFlash features (no set_dflash_layers_to_capture)"
            )
        expected = capture_points(self.config.target_layer_ids)
        if sorted(set(installed)) != sorted(set(expected)):
            raise RuntimeError(
                f"target captures hidden states before layers {list(installed)}, but DFlash target_layer_ids "
                f"{list(self.config.target_layer_ids)} need {expected}: SGLang's capture convention changed"
            )

    def _as_drafter_features(self, captured: torch.Tensor) -> torch.Tensor:
        """SGLang's captured features [T, C*H] -> the drafter's [T, K*H] order."""
        if self._feature_order is None:
            return captured
        chunks = captured.view(captured.shape[0], -1, self.config.hidden_size)
        return chunks[:, self._feature_order].reshape(captured.shape[0], -1)

    def _full_vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Drafter hidden [T, H] -> logits [T, V] through the target's lm_head (TP-gathered)."""
        logits = self.drafter.logits(hidden, self.model_runner.model.lm_head.weight)
        if self.tp_size > 1:
            logits = sg.tensor_model_parallel_all_gather(logits)
        return logits[:, : self.vocab_size]

    def describe(self) -> dict:
        """What this worker is and holds (surfaced in SGLang's get_server_info)."""
        from . import __version__

        return {
            "backend": sg.OURS,
            "version": __version__,
            "worker": type(self).__name__,
            "drafter": {
                "path": sg.get_spec().speculative_draft_model_path,
                "layers": self.config.num_layers,
                "target_layer_ids": list(self.config.target_layer_ids),
                "mask_token_id": self.mask_token_id,
            },
            "block_size": self.block_size,
            "drafter_attention": getattr(self.proposer.attention, "name", None) if self.proposer else None,
            "drafter_kv_bytes": self.kv.bytes() if self.kv is not None else 0,
        }

    # ------------------------------------------------------------------ steps
    @torch.inference_mode()
    def forward_batch_generation(self, batch, on_publish=None, grammar_barrier=None, pp_proxy_tensors=None, **_: Any):
        if batch.forward_mode.is_extend() or batch.is_extend_in_batch:
            return self._prefill(batch, on_publish)
        if batch.forward_mode.is_idle():
            return self._idle(on_publish)
        return self._decode(batch, on_publish)

    def _prefill(self, batch, on_publish):
        out = self.target_worker.forward_batch_generation(batch, capture_hidden_mode=sg.CaptureHiddenMode.FULL)
        features = out.logits_output.hidden_states
        if features is None:
            raise RuntimeError("target prefill returned no DFlash features; aux hidden-state capture is off")
        features = self._as_drafter_features(features)
        positions = torch.cat(
            [torch.arange(p, p + n) for p, n in zip(batch.prefix_lens, batch.extend_lens)]
        ).to(self.device)
        self.drafter.inject(self.kv, features, positions, batch.out_cache_loc)
        out.logits_output.hidden_states = None  # never copy features to the host
        out.new_seq_lens = batch.seq_lens
        if on_publish is not None:
            on_publish(batch.seq_lens)
        out.next_draft_input = DFlashDraftState(
            bonus_tokens=out.next_token_ids.long(), new_seq_lens=batch.seq_lens.long()
        )
        return out

    def _decode(self, batch, on_publish):
        state: DFlashDraftState = batch.spec_info
        prefix = batch.seq_lens
        plan = DraftAttnPlan.from_req_to_token(
            req_to_token=self.req_to_token_pool.req_to_token,
            req_pool_indices=batch.req_pool_indices,
            prefix_lens=prefix,
            block_size=self.block_size,
            width=self._plan_width(batch, state),
        )
        sampled_rows = sampled_row_index([r.sampling_params.top_k == 1 for r in batch.reqs], self.device)
        sampling = None
        if sampled_rows is not None:
            sampling = RowSampling.from_sglang(batch.sampling_info).select(sampled_rows)
        proposal = self.proposer.propose(
            state.bonus_tokens,
            plan,
            sampled_rows=sampled_rows,
            sampling=sampling,
            uniforms=None if sampled_rows is None else torch.rand(sampled_rows.numel(), self.block_size - 1, device=self.device),
        )
        tree = build_chain(proposal.tokens)
        logits_output, can_run_graph = self._verify(batch, tree, plan)
        bs, n = tree.batch_size, tree.num_nodes
        acceptance = verify_chain(
            proposal,
            logits_output.next_token_logits.view(bs, n, -1),
            sampled_rows=sampled_rows,
            sampling=sampling,
        )
        features = self._as_drafter_features(logits_output.hidden_states)
        self.drafter.inject(self.kv, features, tree.positions(prefix).reshape(-1), plan.block_slots)
        logits_output.hidden_states = None
        commit_lens = acceptance.commit_lens
        new_seq_lens = prefix + commit_lens
        if on_publish is not None:
            on_publish(new_seq_lens)
        return sg.GenerationBatchResult(
            logits_output=logits_output,
            next_token_ids=acceptance.out_tokens.reshape(-1),
            accept_lens=commit_lens.to(torch.int32),
            new_seq_lens=new_seq_lens,
            next_draft_input=DFlashDraftState(bonus_tokens=acceptance.bonus, new_seq_lens=new_seq_lens),
            can_run_cuda_graph=can_run_graph,
            speculative_num_draft_tokens=self.block_size,
        )

    def _verify(self, batch, tree: VerifyTree, plan: DraftAttnPlan):
        """One TARGET_VERIFY forward over the tree's nodes, written to the block's slots."""
        prefix = batch.seq_lens
        verify = BlockVerifyInput(
            draft_token=tree.tokens.reshape(-1),
            positions=tree.positions(prefix).reshape(-1),
            draft_token_num=tree.num_nodes,
            custom_mask=None if tree.is_chain else tree.sglang_custom_mask(prefix),
        )
        batch.input_ids = verify.draft_token
        batch.out_cache_loc = plan.block_slots
        batch.spec_info = verify
        batch.forward_mode = sg.ForwardMode.TARGET_VERIFY
        forward_batch = sg.ForwardBatch.init_new(
            batch, self.model_runner, capture_hidden_mode=sg.CaptureHiddenMode.FULL, return_hidden_states_before_norm=False
        )
        out = self.target_worker.forward_batch_generation(batch=None, forward_batch=forward_batch, is_verify=True)
        return out.logits_output, out.can_run_cuda_graph

    def _plan_width(self, batch, state: DFlashDraftState) -> int:
        """A host-side bound on ``prefix + block`` over the batch (no device sync)."""
        if batch.seq_lens_cpu is not None:
            return int(batch.seq_lens_cpu.max()) + self.block_size
        return int(state.allocated_lens_cpu.max())

    def _idle(self, on_publish):
        empty = DFlashDraftState.empty(self.device)
        if on_publish is not None:
            on_publish(empty.new_seq_lens)
        return sg.GenerationBatchResult(
            logits_output=None,
            next_token_ids=empty.bonus_tokens,
            accept_lens=torch.empty(0, dtype=torch.int32, device=self.device),
            new_seq_lens=empty.new_seq_lens,
            next_draft_input=empty,
            speculative_num_draft_tokens=self.block_size,
        )


def _resolve_mask_token_id(config: DFlashConfig, server_args) -> int:
    """``dflash_config.mask_token_id``, else the target tokenizer's id of ``mask_token``."""
    if config.mask_token_id is not None:
        return config.mask_token_id
    from transformers import AutoTokenizer

    path = server_args.tokenizer_path or server_args.model_path
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=server_args.trust_remote_code)
    token_id = tokenizer.convert_tokens_to_ids(config.mask_token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise DFlashConfigError(
            f"drafter names mask token {config.mask_token!r}, which the target tokenizer lacks; "
            "set dflash_config.mask_token_id in the drafter's config.json"
        )
    return int(token_id)
