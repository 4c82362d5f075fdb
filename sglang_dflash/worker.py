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
from collections import deque
from typing import Any, Optional

import torch

from . import sglang_compat as sg
from .checkpoint import load_drafter
from .config import DFlashConfig, DFlashConfigError, capture_points
from .metrics import DFlashMetrics
from .draft_attention import DraftAttnPlan, TorchDraftAttention
from .draft_kv import DraftKVCache
from .adaptive import VerifyLengthPolicy
from .options import DFlashOptions
from .proposer import BlockProposer, Proposal
from .step_clock import StepClock
from .sampling import RowSampling
from .spec_state import BlockVerifyInput, DFlashDraftState
from .acceptance import greedy_tree_acceptance
from .sampled_rows import SampledRows, request_uniforms
from .verification import verify_chain
from .verify_tree import VerifyTree, build_chain, build_topk_tree

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
        self.options = DFlashOptions.from_env()
        self.verify_width = int(spec.speculative_num_draft_tokens)
        self.block_size = int(spec.speculative_dflash_block_size or self.verify_width)
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
        self.deterministic = bool(getattr(server_args, "enable_deterministic_inference", False))
        self._feature_order = self.config.captured_feature_order()
        self.policy = VerifyLengthPolicy(
            self.block_size, fixed=self.options.verify_len, adaptive=self.options.adaptive and not self.options.tree
        )
        self._pending_steps: deque = deque()
        self._clock = StepClock(self.policy.cost)
        labels = {"model_name": server_args.served_model_name or server_args.model_path}
        self.metrics = DFlashMetrics(
            block_size=self.verify_width,
            device=self.device,
            prometheus_labels=labels if getattr(server_args, "enable_metrics", False) else None,
        )
        self.kv: Optional[DraftKVCache] = None
        self.proposer: Optional[BlockProposer] = None
        self.graphed = None
        self.graph_batch_sizes: tuple[int, ...] = ()
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
            self._drafter_attention(),
            embed=model.get_input_embeddings(),
            lm_head=self._full_vocab_logits,
            mask_token_id=self.mask_token_id,
            block_size=self.block_size,
        )
        self._inject = self.drafter.inject
        if self._on_cuda():
            from .gpu import fused_inject

            self._inject = lambda *args: fused_inject(self.drafter, *args)

    def init_cuda_graphs(self) -> None:
        """Capture the whole draft step per batch-size bucket (CUDA + FlashInfer only)."""
        if not self.graph_batch_sizes:
            return
        from .gpu import GraphedProposer

        self.graphed = GraphedProposer(
            self.proposer,
            batch_sizes=self.graph_batch_sizes,
            pad_slot=0,  # SGLang's KV slot 0 is the padding slot, never a token's
            capture_context=sg.graph_capture if self.tp_size > 1 else None,
        )
        self.graphed.capture()

    def _on_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def _drafter_attention(self):
        """FlashInfer on CUDA (bf16/fp16) when available, else the portable torch SDPA."""
        requested = sg.get_spec().speculative_draft_attention_backend
        if not self._on_cuda() or requested == "torch_native":
            if requested == "flashinfer":
                raise DFlashConfigError("--speculative-draft-attention-backend flashinfer needs a CUDA device")
            return TorchDraftAttention(self.kv, self.config)
        from . import gpu

        if not gpu.flashinfer_available() or self.model_runner.dtype not in (torch.bfloat16, torch.float16):
            if requested == "flashinfer":
                raise DFlashConfigError("the FlashInfer drafter needs flashinfer installed and a bf16/fp16 model")
            logger.warning("sglang-dflash: FlashInfer unavailable for the drafter; using torch SDPA")
            return TorchDraftAttention(self.kv, self.config)
        self.graph_batch_sizes = self._graph_batch_sizes()
        return gpu.FlashInferDraftAttention(self.kv, self.config, graph_batch_sizes=self.graph_batch_sizes)

    def _graph_batch_sizes(self) -> tuple[int, ...]:
        """Graph buckets up to the running-request cap; none when the target runs eagerly."""
        if self.model_runner.decode_cuda_graph_runner is None:
            return ()
        from .gpu import DEFAULT_GRAPH_BATCH_SIZES

        cap = int(self.server_args.max_running_requests or max(DEFAULT_GRAPH_BATCH_SIZES))
        sizes = tuple(b for b in DEFAULT_GRAPH_BATCH_SIZES if b <= cap)
        return sizes or (DEFAULT_GRAPH_BATCH_SIZES[0],)

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
            "drafter_kv_bytes": self.kv.bytes() if self.kv is not None else 0,
            "cuda_graph_batch_sizes": list(self.graphed.batch_sizes) if self.graphed is not None else [],
            "stats": self.metrics.totals.as_dict(),
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
        self._clock.other_forward()
        out = self.target_worker.forward_batch_generation(batch, capture_hidden_mode=sg.CaptureHiddenMode.FULL)
        features = out.logits_output.hidden_states
        if features is None:
            raise RuntimeError("target prefill returned no DFlash features; aux hidden-state capture is off")
        features = self._as_drafter_features(features)
        positions = torch.cat(
            [torch.arange(p, p + n) for p, n in zip(batch.prefix_lens, batch.extend_lens)]
        ).to(self.device)
        self._inject(self.kv, features, positions, batch.out_cache_loc)
        out.logits_output.hidden_states = None  # never copy features to the host
        out.new_seq_lens = batch.seq_lens
        if on_publish is not None:
            on_publish(batch.seq_lens)
        out.next_draft_input = self._state(bonus_tokens=out.next_token_ids.long(), new_seq_lens=batch.seq_lens.long())
        return out

    def _state(self, **tensors) -> DFlashDraftState:
        return DFlashDraftState(**tensors, verify_width=self.verify_width)

    def _decode(self, batch, on_publish):
        state: DFlashDraftState = batch.spec_info
        prefix = batch.seq_lens
        rids = [r.rid for r in batch.reqs]
        sampled = self._sampled_rows(batch)
        use_tree = self.options.tree and sampled is None
        verify_len = self.verify_width if use_tree else self.policy.choose(rids)
        self._clock.decode_started(len(rids), verify_len)
        if verify_len == 1:
            return self._plain_decode(batch, state, rids, sampled, on_publish)
        with self.metrics.phase("draft"):
            proposal = self._propose(batch, state, verify_len, sampled)
        if use_tree:
            top = proposal.logits.float().log_softmax(dim=-1).topk(self.options.tree_topk, dim=-1)
            tree = build_topk_tree(proposal.tokens, top.indices, top.values, verify_len)
        else:
            tree = build_chain(proposal.tokens)
        slots = self._verify_slots(batch, tree.num_nodes)
        with self.metrics.phase("verify"):
            logits_output, can_run_graph = self._verify(batch, tree, slots)
        bs, n = tree.batch_size, tree.num_nodes
        target_logits = logits_output.next_token_logits.view(bs, n, -1)
        features = self._as_drafter_features(logits_output.hidden_states).view(bs, n, -1)
        logits_output.hidden_states = None
        if tree.is_chain:
            acceptance = verify_chain(proposal, target_logits, sampled)
        else:
            acceptance = greedy_tree_acceptance(tree.tokens, tree.parents, target_logits.argmax(dim=-1), self.block_size - 1)
            features = self._commit_tree_path(acceptance.path, slots, features)
        committed = acceptance.out_tokens.shape[1]
        positions = prefix.long()[:, None] + torch.arange(committed, device=self.device)
        self._inject(self.kv, features[:, :committed].reshape(bs * committed, -1), positions.reshape(-1), slots[:, :committed].reshape(-1))
        return self._result(rids, verify_len, prefix, acceptance, logits_output, can_run_graph, on_publish)

    def _plain_decode(self, batch, state, rids, sampled: Optional[SampledRows], on_publish):
        """Speculation off: SGLang's own one-token DECODE forward of the target (its
        cheapest step), still capturing the token's features so the drafter's context
        stays complete for when speculation turns back on."""
        prefix = batch.seq_lens
        slots = self._verify_slots(batch, 1)
        batch.input_ids = state.bonus_tokens
        batch.out_cache_loc = slots.reshape(-1)
        batch.seq_lens = prefix + 1
        if batch.seq_lens_cpu is not None:
            batch.seq_lens_cpu = batch.seq_lens_cpu + 1
            batch.seq_lens_sum = int(batch.seq_lens_cpu.sum())
        batch.spec_info = None
        batch.forward_mode = sg.ForwardMode.DECODE
        with self.metrics.phase("verify"):
            out = self.target_worker.forward_batch_generation(batch, capture_hidden_mode=sg.CaptureHiddenMode.FULL, is_verify=True)
        logits_output = out.logits_output
        bs = len(rids)
        proposal = Proposal(tokens=state.bonus_tokens[:, None].long())
        acceptance = verify_chain(proposal, logits_output.next_token_logits.view(bs, 1, -1), sampled)
        features = self._as_drafter_features(logits_output.hidden_states)
        logits_output.hidden_states = None
        self._inject(self.kv, features, prefix.long(), slots.reshape(-1))
        return self._result(rids, 1, prefix, acceptance, logits_output, out.can_run_cuda_graph, on_publish)

    def _result(self, rids, verify_len, prefix, acceptance, logits_output, can_run_graph, on_publish):
        self._pending_steps.append((rids, verify_len))
        commit_lens = acceptance.commit_lens
        new_seq_lens = prefix + commit_lens
        if on_publish is not None:
            on_publish(new_seq_lens)
        return sg.GenerationBatchResult(
            logits_output=logits_output,
            next_token_ids=acceptance.out_tokens.reshape(-1),
            accept_lens=commit_lens.to(torch.int32),
            new_seq_lens=new_seq_lens,
            next_draft_input=self._state(bonus_tokens=acceptance.bonus, new_seq_lens=new_seq_lens),
            can_run_cuda_graph=can_run_graph,
            speculative_num_draft_tokens=acceptance.out_tokens.shape[1],
        )

    def _propose(self, batch, state, verify_len: int, sampled: Optional[SampledRows]) -> Proposal:
        """Draft one block (column 0 is the bonus) and keep the first ``verify_len`` nodes."""
        bonus = state.bonus_tokens
        plan = DraftAttnPlan.from_req_to_token(
            req_to_token=self.req_to_token_pool.req_to_token,
            req_pool_indices=batch.req_pool_indices,
            prefix_lens=batch.seq_lens,
            block_size=self.block_size,
            width=self._plan_width(batch, state),
        )
        if self.graphed is not None and self.graphed.bucket_for(bonus.shape[0]) is not None:
            seq_lens_cpu = batch.seq_lens_cpu
            kv_lens_cpu = None if seq_lens_cpu is None else seq_lens_cpu + self.block_size
            proposal = self.graphed.propose(bonus, plan, sampled=sampled, kv_lens_cpu=kv_lens_cpu)
        else:
            proposal = self.proposer.propose(bonus, plan, sampled=sampled)
        if verify_len < self.block_size and not self.options.tree:
            proposal = proposal.truncated(verify_len)
        return proposal

    def _sampled_rows(self, batch) -> Optional[SampledRows]:
        """The batch's sampled requests (SGLang encodes greedy as top_k == 1)."""
        rows = [i for i, req in enumerate(batch.reqs) if req.sampling_params.top_k != 1]
        if not rows:
            return None
        reqs = [batch.reqs[i] for i in rows]
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        # SGLang seeds sampling only under --enable-deterministic-inference, with 42 by default.
        default_seed = 42 if self.deterministic else None
        seeds = [r.sampling_params.sampling_seed for r in reqs]
        uniforms = request_uniforms(
            [default_seed if seed is None else seed for seed in seeds],
            [r.decode_batch_idx for r in reqs],
            2 * self.block_size - 1,
            self.device,
        )
        params = RowSampling.from_sglang(batch.sampling_info).select(index)
        return SampledRows(index=index, params=params, uniforms=uniforms, rule=self.options.sampling_rule)

    def _verify_slots(self, batch, n: int) -> torch.Tensor:
        """[bs, n] KV slots of the verify nodes: the reserved slots after each prefix."""
        cols = batch.seq_lens.long()[:, None] + torch.arange(n, device=self.device)
        rows = self.req_to_token_pool.req_to_token[batch.req_pool_indices.long()]
        return rows.gather(1, cols).long()

    def _commit_tree_path(self, path: torch.Tensor, slots: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Move the accepted path's target KV to the committed slots (depth order) and
        return the path's features in that order."""
        depth_slots = slots[:, : path.shape[1]]
        path_slots = slots.gather(1, path)
        self.token_to_kv_pool_allocator.get_kvcache().move_kv_cache(depth_slots.reshape(-1), path_slots.reshape(-1))
        return features.gather(1, path[:, :, None].expand(-1, -1, features.shape[-1]))

    def _verify(self, batch, tree: VerifyTree, slots: torch.Tensor):
        """One TARGET_VERIFY forward over the tree's nodes, written to ``slots``."""
        prefix = batch.seq_lens
        verify = BlockVerifyInput(
            draft_token=tree.tokens.reshape(-1),
            positions=tree.positions(prefix).reshape(-1),
            draft_token_num=tree.num_nodes,
            custom_mask=None if tree.is_chain else tree.sglang_custom_mask(prefix),
        )
        batch.input_ids = verify.draft_token
        batch.out_cache_loc = slots.reshape(-1)
        batch.spec_info = verify
        batch.forward_mode = sg.ForwardMode.TARGET_VERIFY
        forward_batch = sg.ForwardBatch.init_new(
            batch, self.model_runner, capture_hidden_mode=sg.CaptureHiddenMode.FULL, return_hidden_states_before_norm=False
        )
        out = self.target_worker.forward_batch_generation(batch=None, forward_batch=forward_batch, is_verify=True)
        return out.logits_output, out.can_run_cuda_graph

    # ------------------------------------------------------------------ feedback
    def on_verify_complete_cpu(self, num_correct_drafts_per_req, batch_size: int = 0) -> None:
        """SGLang hands back each decode step's accepted counts, in step order."""
        if not self._pending_steps:
            return
        rids, verify_len = self._pending_steps.popleft()
        if len(rids) != len(num_correct_drafts_per_req):
            logger.warning("sglang-dflash: step feedback out of sync; dropping it")
            self._pending_steps.clear()
            return
        self.policy.observe(rids, verify_len, num_correct_drafts_per_req, None)
        self.metrics.observe_step(verify_len, num_correct_drafts_per_req)

    def note_request_finished(self, *, rid: str, natural_stop: bool) -> None:
        self.policy.acceptance.forget([rid])

    def _plan_width(self, batch, state: DFlashDraftState) -> int:
        """A host-side bound on ``prefix + block`` over the batch (no device sync)."""
        if batch.seq_lens_cpu is not None:
            return int(batch.seq_lens_cpu.max()) + self.block_size
        return int(state.allocated_lens_cpu.max())

    def _idle(self, on_publish):
        empty = DFlashDraftState.empty(self.device, verify_width=self.verify_width)
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
