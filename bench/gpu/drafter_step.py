"""Kernel-level benchmark of one DFlash draft step, eager vs CUDA graph, against its
memory floor.

A draft step (block ``[bonus, MASK x (B-1)]`` through the drafter, then the target's
lm_head and argmax) at decode batch sizes is memory-bound: it must read every drafter
layer's weights, the lm_head and each request's drafter KV once. So its floor is

    (drafter layer weights + lm_head weights + KV read) / HBM bandwidth

and ``measured / floor`` says how much launch overhead, attention inefficiency or
extra traffic (e.g. the float32 logits, reported separately) is left.

Needs a CUDA machine with torch and triton; flashinfer for the FlashInfer / graph rows
(without it, eager runs on TorchDraftAttention and the table says so). No sglang:
random weights at Qwen3-8B drafter shapes, built in place.

    python bench/gpu/drafter_step.py                      # H100/H200 bandwidth by name
    python bench/gpu/drafter_step.py --bandwidth 4.8e12 --json out.json
    python bench/gpu/drafter_step.py --smoke              # tiny shapes, any device
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sglang_dflash.model.config import DFlashConfig  # noqa: E402
from sglang_dflash.model.draft_attention import DraftAttnPlan, TorchDraftAttention  # noqa: E402
from sglang_dflash.model.draft_kv import DraftKVCache  # noqa: E402
from sglang_dflash.model.drafter import DFlashDrafter  # noqa: E402
from sglang_dflash.spec.proposer import BlockProposer  # noqa: E402

BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}  # bytes/s, HBM3e / HBM3 (SXM)
QWEN3_8B = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=12288, layers=5, features=5, vocab=151936)
SMOKE = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, layers=2, features=2, vocab=512)


@dataclass
class Row:
    batch: int
    mode: str
    attention: str
    median_ms: Optional[float]
    p90_ms: Optional[float]
    floor_ms: float
    ratio: Optional[float]
    drafts_per_s: Optional[float]
    note: str = ""


# --------------------------------------------------------------------------- set-up


def make_config(shape: dict, block: int) -> DFlashConfig:
    return DFlashConfig.from_dict(
        {
            "architectures": ["DFlashDraftModel"],
            "hidden_size": shape["hidden"],
            "intermediate_size": shape["intermediate"],
            "num_hidden_layers": shape["layers"],
            "num_attention_heads": shape["heads"],
            "num_key_value_heads": shape["kv_heads"],
            "head_dim": shape["head_dim"],
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 40960,
            "vocab_size": shape["vocab"],
            "dflash_config": {
                "target_layer_ids": list(range(1, 1 + shape["features"])),
                "block_size": block,
                "mask_token_id": shape["vocab"] - 1,
            },
        }
    )


def make_drafter(config: DFlashConfig, device: torch.device, dtype: torch.dtype) -> DFlashDrafter:
    """Random weights (std 0.02, unit norms): timing does not depend on the values."""
    with torch.device(device):
        drafter = DFlashDrafter(config)
    return drafter.to(dtype).eval().init_weights(0.02)


def make_plan(batch: int, context: int, block: int, num_slots: int, device: torch.device) -> DraftAttnPlan:
    """Scattered slots (a serving pool's worst case for locality); slot 0 is padding."""
    width = context + block
    slots = (torch.randperm(num_slots - 1, device=device)[: batch * width] + 1).view(batch, width)
    return DraftAttnPlan.from_req_to_token(
        req_to_token=slots,
        req_pool_indices=torch.arange(batch, device=device),
        prefix_lens=torch.full((batch,), context, device=device),
        block_size=block,
        width=width,
    )


def floor_bytes(drafter: DFlashDrafter, lm_head: torch.Tensor, cache: DraftKVCache, batch: int, context: int, block: int) -> dict:
    """Bytes a draft step cannot avoid moving. ``fc``/``hidden_norm`` only run at
    injection, so they are not part of the step."""
    layers = sum(p.numel() * p.element_size() for n, p in drafter.named_parameters() if not n.startswith(("fc.", "hidden_norm.")))
    cfg = drafter.config
    row = cfg.num_kv_heads * cfg.head_dim * cache.k.element_size()
    kv = 2 * cfg.num_layers * batch * (context + block) * row
    logits = batch * (block - 1) * lm_head.shape[0] * 4  # float32 draft logits, written once
    return {"drafter": layers, "lm_head": lm_head.numel() * lm_head.element_size(), "kv": kv, "logits_write": logits}


# --------------------------------------------------------------------------- timing


def time_step(step: Callable[[], object], *, warmup: int, iters: int, device: torch.device) -> list[float]:
    """Milliseconds per call: CUDA events around each call (so host gaps count), or
    wall clock on CPU."""
    for _ in range(warmup):
        step()
    if device.type != "cuda":
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            out.append(1e3 * (time.perf_counter() - t0))
        return out
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def summarize(batch, mode, attention, times, floor_s, block, note="") -> Row:
    median = statistics.median(times)
    p90 = sorted(times)[min(len(times) - 1, int(0.9 * len(times)))]
    return Row(
        batch=batch, mode=mode, attention=attention, median_ms=median, p90_ms=p90, floor_ms=1e3 * floor_s,
        ratio=median / (1e3 * floor_s), drafts_per_s=batch * (block - 1) / (median / 1e3), note=note,
    )


# --------------------------------------------------------------------------- benchmark


def flashinfer_status() -> tuple[bool, str]:
    try:
        import flashinfer
    except ImportError as exc:
        return False, f"flashinfer missing ({exc.__class__.__name__})"
    return True, f"flashinfer {getattr(flashinfer, '__version__', '?')}"


class Bench:
    """One drafter, cache and set of attentions at the benchmark shapes; rows per batch."""

    def __init__(self, args) -> None:
        self.args = args
        self.device = torch.device(args.device)
        dtype = getattr(torch, args.dtype)
        self.shape = SMOKE if args.smoke else QWEN3_8B
        self.batches = [int(b) for b in args.batch_sizes.split(",")]
        self.config = make_config(self.shape, args.block)
        torch.manual_seed(0)
        self.drafter = make_drafter(self.config, self.device, dtype)
        vocab, hidden = self.shape["vocab"], self.shape["hidden"]
        self.embed = torch.randn(vocab, hidden, device=self.device, dtype=dtype) * 0.02
        self.lm_head = torch.randn(vocab, hidden, device=self.device, dtype=dtype) * 0.02
        self.num_slots = max(self.batches) * (args.context + args.block) + 1
        cfg = self.config
        self.cache = DraftKVCache(
            num_layers=cfg.num_layers, num_slots=self.num_slots, num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, dtype=dtype, device=self.device,
        )
        self.cache.k.normal_()
        self.cache.v.normal_()
        self.has_fi, self.fi_note = flashinfer_status() if self.device.type == "cuda" else (False, "CPU run")
        self.attentions = {"torch": TorchDraftAttention(self.cache, cfg)}
        self.graphed = None
        if self.has_fi:
            self._init_flashinfer()

    def _init_flashinfer(self) -> None:
        from sglang_dflash.gpu import FlashInferDraftAttention, GraphedProposer

        buckets = () if self.args.no_graph else self.batches
        attention = FlashInferDraftAttention(self.cache, self.config, graph_batch_sizes=buckets)
        self.attentions["flashinfer"] = attention
        if not self.args.no_graph:
            self.graphed = GraphedProposer(self.proposer(attention), batch_sizes=self.batches)
            with torch.inference_mode():
                self.graphed.capture()

    def proposer(self, attention) -> BlockProposer:
        drafter, embed, lm_head = self.drafter, self.embed, self.lm_head
        return BlockProposer(
            drafter, attention,
            embed=lambda ids: torch.nn.functional.embedding(ids, embed),
            lm_head=lambda hidden: drafter.logits(hidden, lm_head),
            mask_token_id=self.config.mask_token_id, block_size=self.args.block,
        )

    def rows_for(self, batch: int) -> list[Row]:
        args, block = self.args, self.args.block
        plan = make_plan(batch, args.context, block, self.num_slots, self.device)
        lens_cpu = plan.kv_lens.cpu()
        bonus = torch.randint(0, self.shape["vocab"] - 1, (batch,), device=self.device)
        nbytes = floor_bytes(self.drafter, self.lm_head, self.cache, batch, args.context, block)
        floor_s = (nbytes["drafter"] + nbytes["lm_head"] + nbytes["kv"]) / args.bandwidth
        timing = dict(warmup=args.warmup, iters=args.iters, device=self.device)
        rows = []
        with torch.inference_mode():
            for name, attention in self.attentions.items():
                eager = self.proposer(attention)
                times = time_step(lambda: eager.propose(bonus, plan), **timing)
                note = "" if self.has_fi else f"{self.fi_note}: eager falls back to TorchDraftAttention"
                rows.append(summarize(batch, "eager", name, times, floor_s, block, note))
            if self.graphed is not None:
                times = time_step(lambda: self.graphed.propose(bonus, plan, kv_lens_cpu=lens_cpu), **timing)
                rows.append(summarize(batch, "cuda-graph", "flashinfer", times, floor_s, block))
            else:
                why = "--no-graph" if args.no_graph else f"needs CUDA + flashinfer ({self.fi_note})"
                rows.append(Row(batch, "cuda-graph", "flashinfer", None, None, 1e3 * floor_s, None, None, f"skipped: {why}"))
        rows[-1].note = "; ".join(filter(None, [rows[-1].note, _bytes_note(nbytes)]))
        return rows

    def meta(self) -> dict:
        args = self.args
        return {
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "flashinfer": self.fi_note,
            "bandwidth_Bps": args.bandwidth,
            "dtype": args.dtype,
            "shape": self.shape,
            "block": args.block,
            "context": args.context,
            "iters": args.iters,
        }


def run(args) -> tuple[list[Row], dict]:
    bench = Bench(args)
    rows = [row for batch in bench.batches for row in bench.rows_for(batch)]
    return rows, bench.meta()


def _bytes_note(nbytes: dict) -> str:
    mb = {k: v / 2**20 for k, v in nbytes.items()}
    return (
        f"floor = drafter {mb['drafter']:.1f} + lm_head {mb['lm_head']:.1f} + KV {mb['kv']:.1f} MiB "
        f"(+{mb['logits_write']:.1f} MiB fp32 logits not in floor)"
    )


def markdown(rows: list[Row], meta: dict) -> str:
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    lines = [
        f"Draft step on {meta['device']} ({meta['dtype']}, {meta['flashinfer']}), context {meta['context']}, "
        f"block {meta['block']}, floor at {meta['bandwidth_Bps']:.3g} B/s",
        "",
        "| batch | mode | attention | median ms | p90 ms | floor ms | measured/floor | drafts/s | note |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.batch} | {r.mode} | {r.attention} | {fmt(r.median_ms, '.3f')} | {fmt(r.p90_ms, '.3f')} | "
            f"{r.floor_ms:.4f} | {fmt(r.ratio, '.2f')} | {fmt(r.drafts_per_s, ',.0f')} | {r.note} |"
        )
    return "\n".join(lines)


def default_bandwidth(device: str) -> float:
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
        for key, value in BANDWIDTH.items():
            if key in name:
                return value
    return BANDWIDTH["H100"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--bandwidth", type=float, default=None, help="HBM bytes/s (default: H200 4.8e12, else H100 3.35e12)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--no-graph", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write rows + metadata here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device: checks the script, not the GPU")
    args = parser.parse_args(argv)
    if args.smoke and args.device == "cuda" and not torch.cuda.is_available():
        args.device = "cpu"
    if not args.smoke and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        parser.error("needs a CUDA device (use --smoke to check the script elsewhere)")
    if args.bandwidth is None:
        args.bandwidth = default_bandwidth(args.device)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    rows, meta = run(args)
    print(markdown(rows, meta))
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
