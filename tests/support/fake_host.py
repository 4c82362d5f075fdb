"""SGLang 0.5.23's side of the worker contract, faked just enough to drive our host
worker through its start-up order and decode steps in-process on CPU.

What is real: our worker, target port, batch view, speculator, drafter and draft KV,
SGLang's enums and spec-input base classes. What is fake: the target model runner
(a random embedding and lm_head; features and logits drawn at random), the scheduler's
batch objects, ``ForwardBatch.init_new`` (it copies the fields our code sets), and the
published runtime settings. The fake runner follows SGLang's lifecycle: it has no
``decode_cuda_graph_runner`` until its own ``init_cuda_graphs`` ran, and reading it
earlier raises, as on a real GPU start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from sglang_dflash.model.config import DFlashConfig, capture_points


class FakeModel(torch.nn.Module):
    def __init__(self, vocab: int, hidden: int, layers_to_capture: list[int]) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        self.model = SimpleNamespace(layers_to_capture=layers_to_capture)
        self.capture_aux_hidden_states = True

    def get_input_embeddings(self):
        return self.embed


class FakeRunner:
    """A target model runner before and after its ``init_cuda_graphs``."""

    def __init__(self, config: DFlashConfig, *, num_layers: int, vocab: int, num_slots: int, dtype) -> None:
        self.device = "cpu"
        self.dtype = dtype
        hidden = config.hidden_size
        self.model_config = SimpleNamespace(
            hf_text_config=SimpleNamespace(num_hidden_layers=num_layers), vocab_size=vocab, hidden_size=hidden
        )
        torch.manual_seed(0)
        self.model = FakeModel(vocab, hidden, capture_points(config.target_layer_ids)).to(dtype)
        self.token_to_kv_pool = SimpleNamespace(size=num_slots - 1, page_size=1)
        self.attn_backend = SimpleNamespace()  # no recurrent-state commit hook: an attention-only target
        self.token_to_kv_pool_allocator = SimpleNamespace(get_kvcache=lambda: SimpleNamespace(move_kv_cache=self._move))
        self.eager_runner = object()
        self.moves: list[tuple[list[int], list[int]]] = []

    def __getattr__(self, name: str):
        if name == "decode_cuda_graph_runner":
            raise AttributeError("'ModelRunner' object has no attribute 'decode_cuda_graph_runner' (before init_cuda_graphs)")
        raise AttributeError(name)

    def init_cuda_graphs(self, *, captured: bool) -> None:
        """What SGLang's target runner does in the scheduler's init_all_cuda_graphs."""
        self.decode_cuda_graph_runner = SimpleNamespace(name="target verify graphs") if captured else self.eager_runner

    def _move(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.moves.append((dst.tolist(), src.tolist()))


class FakeTargetWorker:
    """Records every forward it is asked for and answers with random logits/features."""

    def __init__(self, runner: FakeRunner, feature_width: int, vocab: int) -> None:
        self.model_runner = runner
        self.feature_width = feature_width
        self.vocab = vocab
        self.forwards: list[SimpleNamespace] = []
        self.graphs_replayed = False

    def forward_batch_generation(self, batch=None, forward_batch=None, capture_hidden_mode=None, is_verify=False):
        fb = forward_batch if forward_batch is not None else FakeForwardBatch.init_new(batch, self.model_runner)
        self.forwards.append(fb)
        rows = fb.input_ids.numel()
        gen = torch.Generator().manual_seed(len(self.forwards))
        logits = torch.randn(rows, self.vocab, generator=gen)
        features = torch.randn(rows, self.feature_width, generator=gen)
        output = SimpleNamespace(next_token_logits=logits, hidden_states=features)
        return SimpleNamespace(logits_output=output, can_run_cuda_graph=self.graphs_replayed)


class FakeForwardBatch(SimpleNamespace):
    """The fields of SGLang's ForwardBatch our host sets or reads, copied from the batch."""

    @classmethod
    def init_new(cls, batch, model_runner, **_):
        return cls(
            forward_mode=batch.forward_mode,
            input_ids=batch.input_ids,
            out_cache_loc=batch.out_cache_loc,
            seq_lens=batch.seq_lens,
            seq_lens_cpu=batch.seq_lens_cpu,
            seq_lens_sum=batch.seq_lens_sum,
            spec_info=batch.spec_info,
            original_global_num_tokens_cpu=getattr(batch, "global_num_tokens", None),
            can_run_decode_cuda_graph=getattr(batch, "can_run_decode_cuda_graph", True),
        )


@dataclass
class FakeReq:
    rid: str
    top_k: int = 1
    decode_batch_idx: int = 0
    sampling_params: SimpleNamespace = field(init=False)
    grammar: None = None

    def __post_init__(self) -> None:
        # SGLang's SamplingParams defaults: no penalty, bias or minimum length
        self.sampling_params = SimpleNamespace(
            top_k=self.top_k, sampling_seed=None, frequency_penalty=0.0, presence_penalty=0.0,
            repetition_penalty=1.0, min_new_tokens=0, logit_bias=None, custom_params=None,
        )


@dataclass
class FakeHost:
    """A host worker wired to fakes; ``start()`` runs SGLang's start-up order."""

    worker: object
    runner: FakeRunner
    target_worker: FakeTargetWorker
    req_to_token: torch.Tensor

    def start(self, *, target_graphs: bool) -> None:
        """__init__ (done) -> alloc_memory_pool -> init_attention_backends ->
        target init_cuda_graphs -> draft init_cuda_graphs (scheduler.py 0.5.23 ~1090-1146)."""
        self.worker.alloc_memory_pool(
            req_to_token_pool=SimpleNamespace(req_to_token=self.req_to_token), token_to_kv_pool_allocator=None
        )
        self.worker.init_attention_backends()
        self.runner.init_cuda_graphs(captured=target_graphs)
        self.target_worker.graphs_replayed = target_graphs
        self.worker.init_cuda_graphs()

    def decode_batch(self, prefix_lens: list[int], *, allocated: Optional[list[int]] = None):
        """A decode ScheduleBatch as SGLang hands it to the worker after prepare_for_decode."""
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        from sglang_dflash.host.spec_inputs import DFlashDraftState

        bs = len(prefix_lens)
        width = self.worker.speculator.verify_width
        seq_lens = torch.tensor(prefix_lens, dtype=torch.int64)
        state = DFlashDraftState(
            bonus_tokens=torch.arange(3, 3 + bs, dtype=torch.int64),
            new_seq_lens=seq_lens.clone(),
            verify_width=width,
            allocated_lens_cpu=torch.tensor(allocated or [p + width for p in prefix_lens], dtype=torch.int32),
        )
        return SimpleNamespace(
            reqs=[FakeReq(f"r{i}") for i in range(bs)],
            spec_info=state,
            seq_lens=seq_lens,
            seq_lens_cpu=seq_lens.clone(),
            seq_lens_sum=int(seq_lens.sum()),
            req_pool_indices=torch.arange(bs),
            sampling_info=None,
            return_logprob=False,
            forward_mode=ForwardMode.DECODE,
            is_extend_in_batch=False,
            input_ids=None,
            out_cache_loc=None,
        )


def make_fake_host(
    monkeypatch,
    drafter_dir: Path,
    *,
    env: Optional[dict] = None,
    cuda: bool = False,
    dtype=torch.float32,
    layout=None,
    model=None,
) -> FakeHost:
    """Our host DFlashWorker over fakes. ``cuda=True`` makes the host take its CUDA
    decisions (graph plan, FlashInfer drafter, fused injector) while tensors stay on CPU:
    FlashInfer attention becomes torch SDPA and graph capture a recorder.

    ``layout``: a :class:`~sglang_dflash.host.parallel.ParallelLayout` to report
    instead of SGLang's published topology (default: one rank); ``"sglang"`` reads the
    real one (a process with SGLang's model-parallel groups initialised). ``model``:
    the target model to borrow the embedding and lm_head from (default: a plain one)."""
    from sglang_dflash.host import api, parallel, target, worker as host_worker
    from sglang_dflash.model.config import DFlashConfig

    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    config = DFlashConfig.from_pretrained(drafter_dir)
    num_layers = config.num_target_layers or max(config.target_layer_ids) + 1
    vocab = config.vocab_size
    spec = SimpleNamespace(
        speculative_draft_model_path=str(drafter_dir),
        speculative_num_draft_tokens=int((env or {}).get("FAKE_VERIFY_WIDTH", config.block_size)),
        speculative_dflash_block_size=config.block_size,
        speculative_draft_attention_backend=None,
    )
    monkeypatch.setattr(api, "get_spec", lambda: spec, raising=False)
    monkeypatch.setattr(api, "ForwardBatch", FakeForwardBatch, raising=False)
    if cuda:
        _fake_cuda_paths(monkeypatch, host_worker, target)
    if layout != "sglang":
        monkeypatch.setattr(host_worker, "layout_of", lambda model: layout or parallel.ParallelLayout())
        monkeypatch.setattr(parallel.RankAgreement, "of_batch_ranks", classmethod(lambda cls: cls(None)))
    runner = FakeRunner(config, num_layers=num_layers, vocab=vocab, num_slots=512, dtype=dtype)
    if model is not None:
        runner.model = model
    features = len(set(config.target_layer_ids)) * config.hidden_size
    target_worker = FakeTargetWorker(runner, feature_width=features, vocab=vocab)
    server_args = SimpleNamespace(
        served_model_name="fake", model_path="fake", enable_metrics=False, enable_deterministic_inference=False,
        tokenizer_path=None, trust_remote_code=False, random_seed=1234,
    )
    w = host_worker.DFlashWorker(server_args, gpu_id=0, nccl_port=0, target_worker=target_worker)
    req_to_token = torch.arange(16 * 128).view(16, 128) % 511 + 1  # slot 0 is padding
    return FakeHost(worker=w, runner=runner, target_worker=target_worker, req_to_token=req_to_token)


class GraphRecorder:
    """Stands in for GraphedProposer: records what capture would have baked in."""

    instances: list["GraphRecorder"] = []

    def __init__(self, proposer, *, batch_sizes, pad_slot, capture_context) -> None:
        self.proposer = proposer
        self.batch_sizes = list(batch_sizes)
        self.capture_context = capture_context
        self.captured_ptrs: Optional[dict[str, int]] = None
        GraphRecorder.instances.append(self)

    def capture(self) -> None:
        self.captured_ptrs = {n: p.data_ptr() for n, p in self.proposer.drafter.named_parameters()}

    def bucket_for(self, batch_size: int) -> None:
        return None  # replay is CUDA-only: drafting falls back to the eager proposer


def _fake_cuda_paths(monkeypatch, host_worker, target) -> None:
    from sglang_dflash import gpu
    from sglang_dflash.model.draft_attention import TorchDraftAttention

    GraphRecorder.instances.clear()
    monkeypatch.setattr(host_worker, "is_cuda", lambda device: True)
    monkeypatch.setattr(
        host_worker, "graph_settings", lambda: target.GraphSettings(decode_graphs=True, max_bs=8, max_running_requests=48)
    )
    monkeypatch.setattr(gpu, "flashinfer_available", lambda: True)
    monkeypatch.setattr(gpu, "FlashInferDraftAttention", lambda kv, config, graph_batch_sizes: TorchDraftAttention(kv, config))
    monkeypatch.setattr(gpu, "GraphedProposer", GraphRecorder)
