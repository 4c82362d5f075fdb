"""The target model as the speculator sees it: SGLang 0.5.23's runner behind one port.

:class:`TargetModel` implements :class:`~sglang_dflash.spec.worker.TargetPort`: the
borrowed embedding and lm_head, the verify forward (TARGET_VERIFY, capturing every
node's features), the one-token step when speculation is off, and KV moves for tree
commits. It also decides, from SGLang's resolved settings, how the drafter runs on
CUDA graphs and which path plain decode takes, and records both.

Two facts of SGLang 0.5.23 shape the forwards:

* FlashInfer plans a DFLASH-style verify's KV chunks from the batch's **host** lengths,
  taking them as prefix + verify width (it adds the width itself only for EAGLE), so a
  verify batch carries widened host lengths; the CPU verify path checks the same
  invariant on every forward (:mod:`.torch_native_verify`).
* With CUDA graphs on, the target's decode graphs are captured for TARGET_VERIFY at the
  full verify width, and a DECODE batch (no spec input) would replay them; so when the
  target has graphs, plain decode is a one-node verify, which SGLang's width check runs
  eagerly. A top-k tree carries a custom mask that 0.5.23's FlashInfer verify graphs
  cannot take, so tree verifies are marked to run eagerly (:mod:`.hooks`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch.nn import functional as F

from ..model.config import DFlashConfig, DFlashConfigError, capture_points
from ..spec.verify_tree import VerifyTree, build_chain
from ..spec.ports import DraftGraphPlan, VerifyOutput
from . import api as sg
from .batch import DecodeView
from .lora import without_adapter
from .recurrent_state import commit_verified_state, has_recurrent_state
from .parallel import ParallelLayout, full_vocab_logits
from .spec_inputs import BlockVerifyInput

logger = logging.getLogger(__name__)

DECODE, ONE_NODE_VERIFY = "decode", "one-node verify"


class TargetModel:
    def __init__(self, target_worker, config: DFlashConfig, *, layout: ParallelLayout) -> None:
        self.worker = target_worker
        self.runner = target_worker.model_runner
        self.config = config
        self.layout = layout
        self.vocab_size = int(self.runner.model_config.vocab_size)
        self.feature_order = config.captured_feature_order()
        self.drafter = None  # set by bind_drafter
        self._recurrent: Optional[bool] = None  # known once SGLang built the attention backend
        self._last_forward_verified = False
        # Until the target's graphs are known, the one-node verify is the path that is
        # valid with and without them.
        self.plain_decode_path = ONE_NODE_VERIFY

    # ------------------------------------------------------------------ set-up
    def bind_drafter(self, drafter) -> None:
        self.drafter = drafter

    def check_capture_points(self) -> None:
        """Refuse to run if the target does not capture what the drafter was trained on."""
        model = self.runner.model
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

    def check_verify_attention(self) -> None:
        """On the CPU lane our torch_native verify runs the target's attention: refuse
        at start-up what it does not compute (attention logit caps)."""
        if not is_cuda(self.runner.device):
            from .torch_native_verify import check_target_layers

            check_target_layers(self.runner.model)

    def choose_plain_decode_path(self) -> str:
        """After the target captured its graphs: SGLang's DECODE step when the target has
        no decode graphs to replay (cheapest), else the one-node verify (eager)."""
        graphs = getattr(self.runner, "decode_cuda_graph_runner", None)
        eager = getattr(self.runner, "eager_runner", None)
        self.plain_decode_path = DECODE if graphs is None or graphs is eager else ONE_NODE_VERIFY
        return self.plain_decode_path

    # ------------------------------------------------------------------ borrowed layers
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The target's *raw* embedding rows, without any LoRA adapter (see :mod:`.lora`).
        The drafter scales them itself (``input_embedding_scale``), as in training and the
        reference; a target's own embedding module may scale them too (Gemma's multiplies
        by sqrt(hidden))."""
        module = without_adapter(self.runner.model.get_input_embeddings())
        return raw_embedding(module, token_ids, self.vocab_size)

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Drafter hidden [T, H] -> logits [T, V] through the target's lm_head (its
        vocab shards gathered over the head's own group, see :mod:`.parallel`)."""
        head = self.runner.model.lm_head
        return full_vocab_logits(self.drafter.logits(hidden, head.weight), head, self.vocab_size)

    def as_drafter_features(self, captured: torch.Tensor) -> torch.Tensor:
        """SGLang's captured features [T, C*H] -> the drafter's [T, K*H] order."""
        if self.feature_order is None:
            return captured
        chunks = captured.view(captured.shape[0], -1, self.config.hidden_size)
        return chunks[:, self.feature_order].reshape(captured.shape[0], -1)

    # ------------------------------------------------------------------ forwards
    def prefill(self, batch):
        """The target's extend with feature capture: (SGLang's result, features [T, K*H],
        positions [T], slots [T])."""
        out = self.worker.forward_batch_generation(batch, capture_hidden_mode=sg.CaptureHiddenMode.FULL)
        captured = out.logits_output.hidden_states
        if captured is None:
            raise RuntimeError("target prefill returned no DFlash features; aux hidden-state capture is off")
        out.logits_output.hidden_states = None  # never copy features to the host
        positions = torch.cat([torch.arange(p, p + n) for p, n in zip(batch.prefix_lens, batch.extend_lens)])
        return out, self.as_drafter_features(captured), positions.to(captured.device), batch.out_cache_loc

    def verify(self, view: DecodeView, tree: VerifyTree, slots: torch.Tensor) -> VerifyOutput:
        """One TARGET_VERIFY forward over the tree's nodes, written to ``slots``."""
        batch = view.batch
        prefix = view.prefix_lens
        spec = BlockVerifyInput(
            draft_token=tree.tokens.reshape(-1),
            positions=tree.positions(prefix).reshape(-1),
            draft_token_num=tree.num_nodes,
            custom_mask=None if tree.is_chain else tree.sglang_custom_mask(prefix),
        )
        batch.input_ids = spec.draft_token
        batch.out_cache_loc = slots.reshape(-1)
        batch.spec_info = spec
        batch.forward_mode = sg.ForwardMode.TARGET_VERIFY
        forward_batch = self._verify_forward_batch(batch)
        widen_host_lens(forward_batch, view.prefix_lens_cpu, tree.num_nodes)
        if not tree.is_chain and self.has_recurrent_state():
            raise RuntimeError("a hybrid linear-attention target verifies chains only; tree verification is refused at launch")
        out = self.worker.forward_batch_generation(batch=None, forward_batch=forward_batch, is_verify=True)
        self._last_forward_verified = True
        return self._verify_output(out, view, tree.num_nodes)

    def _verify_forward_batch(self, batch):
        forward_batch = sg.ForwardBatch.init_new(
            batch, self.runner, capture_hidden_mode=sg.CaptureHiddenMode.FULL, return_hidden_states_before_norm=False
        )
        if self.layout.dp_attention and dp_round_runs_eager(forward_batch, batch):
            forward_batch.can_run_decode_cuda_graph = False
        return forward_batch

    # ------------------------------------------------------------------ idle DP ranks
    def idle_prefill(self, batch) -> None:
        """DP attention, a round where some other rank extends: this rank's empty extend."""
        self.worker.forward_batch_generation(batch, capture_hidden_mode=sg.CaptureHiddenMode.FULL)

    def idle_verify(self, batch, width: int) -> None:
        """DP attention, a decode round: this rank's empty verify, ``width`` nodes per
        request like its peers (SGLang scales the cross-DP token counts by it)."""
        empty = torch.empty(0, dtype=torch.int64, device=self.runner.device)
        batch.input_ids = empty
        batch.out_cache_loc = empty
        batch.spec_info = BlockVerifyInput(draft_token=empty, positions=empty, draft_token_num=width)
        self.worker.forward_batch_generation(batch=None, forward_batch=self._verify_forward_batch(batch), is_verify=True)

    def plain_decode(self, view: DecodeView, slots: torch.Tensor) -> VerifyOutput:
        """Speculation off: the target's one-token step on the bonus tokens (see module doc)."""
        if self.plain_decode_path == ONE_NODE_VERIFY:
            return self.verify(view, build_chain(view.bonus[:, None].long()), slots)
        batch = view.batch
        batch.input_ids = view.bonus
        batch.out_cache_loc = slots.reshape(-1)
        batch.seq_lens = view.prefix_lens + 1
        if batch.seq_lens_cpu is not None:
            batch.seq_lens_cpu = batch.seq_lens_cpu + 1
            batch.seq_lens_sum = int(batch.seq_lens_cpu.sum())
        batch.spec_info = None
        batch.forward_mode = sg.ForwardMode.DECODE
        out = self.worker.forward_batch_generation(batch, capture_hidden_mode=sg.CaptureHiddenMode.FULL, is_verify=True)
        self._last_forward_verified = False  # DECODE advances recurrent state itself
        return self._verify_output(out, view, 1)

    def _verify_output(self, out, view: DecodeView, n: int) -> VerifyOutput:
        logits_output = out.logits_output
        bs = len(view.rids)
        features = self.as_drafter_features(logits_output.hidden_states).view(bs, n, -1)
        logits_output.hidden_states = None
        logits = logits_output.next_token_logits.view(bs, n, -1)
        return VerifyOutput(logits=logits, features=features, graphed=bool(out.can_run_cuda_graph), raw=logits_output)

    def move_kv(self, dst_slots: torch.Tensor, src_slots: torch.Tensor) -> None:
        self.worker.model_runner.token_to_kv_pool_allocator.get_kvcache().move_kv_cache(dst_slots, src_slots)

    # ------------------------------------------------------------------ recurrent state
    def has_recurrent_state(self) -> bool:
        """Whether the target has recurrent (linear-attention) layers (:mod:`.recurrent_state`)."""
        if self._recurrent is None:
            self._recurrent = has_recurrent_state(self.runner)
        return self._recurrent

    def commit(self, view: DecodeView, commit_lens: torch.Tensor) -> None:
        """After a verify, keep each request's recurrent state at its last committed node."""
        if self._last_forward_verified and self.has_recurrent_state():
            commit_verified_state(self.runner, view.batch, view.prefix_lens, commit_lens)


def raw_embedding(module, token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Rows of the embedding table, without the module's own scale: looked up in the
    table when it is whole on this rank, else the module's (TP-gathered) output divided
    by its ``embed_scale``."""
    if module.weight.shape[0] >= vocab_size:
        return F.embedding(token_ids, module.weight)
    out = module(token_ids)
    scale = getattr(module, "embed_scale", None)
    return out if scale is None else out / scale


def kv_slot_count(pool) -> int:
    """Rows of the target's full-attention KV pool (slot ids index it). A hybrid pool's
    layer 0 may be a sliding layer (a smaller SWA pool) or a linear-attention layer
    (no KV at all), so the count is the full pool's, never layer 0's buffer."""
    full = getattr(pool, "full_kv_pool", None) or pool
    return int(full.size + full.page_size)


def dp_round_runs_eager(forward_batch, batch) -> bool:
    """Under DP attention a verify replays no graph when some DP rank is idle or extends:
    an eager rank publishes raw token counts where a replaying one assumes its padded
    bucket, and their DP-gather offsets would disagree. Decided from the round's global
    counts, so every rank decides alike."""
    counts = forward_batch.original_global_num_tokens_cpu
    return bool(batch.is_extend_in_batch) or (counts is not None and min(counts) == 0)


def widen_host_lens(forward_batch, prefix_lens_cpu: Optional[torch.Tensor], width: int) -> None:
    """A verify batch's host lengths are prefix + verify width (FlashInfer's KV lengths);
    the device ``seq_lens`` stay the committed prefix (our spec input adds the width)."""
    if prefix_lens_cpu is None:
        return
    forward_batch.seq_lens_cpu = prefix_lens_cpu + width
    forward_batch.seq_lens_sum = int(forward_batch.seq_lens_cpu.sum())


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class GraphSettings:
    """SGLang's resolved CUDA-graph settings, as far as the drafter's graphs follow them."""

    decode_graphs: bool
    max_bs: Optional[int]
    max_running_requests: Optional[int]


def graph_settings() -> GraphSettings:
    """Read from SGLang's published runtime context: valid from the worker's construction
    on, long before any model runner has captured (or even planned) a graph."""
    from sglang.srt.model_executor.cuda_graph_config import Backend
    from sglang.srt.runtime_context import get_exec, get_schedule

    decode = get_exec().graph.cuda_graph_config.decode
    return GraphSettings(
        decode_graphs=decode.backend != Backend.DISABLED,
        max_bs=decode.max_bs,
        max_running_requests=get_schedule().max_running_requests,
    )


def is_cuda(device) -> bool:
    """The one place the host decides it runs the CUDA paths (graphs, FlashInfer, Triton)."""
    return torch.device(device).type == "cuda"


def draft_graph_plan(on_cuda: bool, settings: Optional[GraphSettings], *, collectives: bool) -> DraftGraphPlan:
    """Drafter CUDA graphs: on CUDA unless SGLang's decode graphs are disabled, with
    batch-size buckets up to the decode graphs' max batch size (else the running-request
    cap). Decided from settings, never from the target runner's graph state, which does
    not exist yet when SGLang sets the drafter up. A draft step with collectives (a
    vocab-parallel embedding or lm_head) captures inside SGLang's ``graph_capture``
    context, where its all-reduce/all-gather run in capture mode."""
    if not on_cuda:
        return DraftGraphPlan(reason="not on CUDA")
    if not settings.decode_graphs:
        return DraftGraphPlan(reason="CUDA graphs disabled")
    from ..gpu.cuda_graph import DEFAULT_GRAPH_BATCH_SIZES

    cap = int(settings.max_bs or settings.max_running_requests or max(DEFAULT_GRAPH_BATCH_SIZES))
    sizes = tuple(b for b in DEFAULT_GRAPH_BATCH_SIZES if b <= cap) or (DEFAULT_GRAPH_BATCH_SIZES[0],)
    return DraftGraphPlan(batch_sizes=sizes, reason="", capture_context=sg.graph_capture if collectives else None)


def mask_token_id_of(config: DFlashConfig, server_args) -> int:
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

