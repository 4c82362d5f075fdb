"""Distil a DFlash drafter from a Hugging Face causal LM.

    python -m sglang_dflash.train --target .cache/models/smollm2-135m \\
        --out drafters/smollm2-135m-dflash --layers 1 --block-size 8

Recipe (DFlash paper, section 4; see :mod:`.objective` for the objective):

1. Prompts from :mod:`.prompts` (authored here), split into train and held-out.
2. The target answers the training prompts; its hidden states at
   ``target_layer_ids`` are captured during that generation and cached under
   ``.cache/`` (:mod:`.data`), so training never runs the target.
3. The drafter (embedding and lm_head borrowed from the target, frozen) is trained
   on random anchored blocks with decay-weighted cross-entropy, AdamW, warmup +
   cosine schedule and gradient clipping. The drafter starts as the target's layer
   after the deepest captured one (``--init``, :mod:`.init`); ``--init-from DIR``
   starts from an existing drafter instead, so a long run can be split into stages.
4. Held-out acceptance (tau = tokens per target forward) is measured with a greedy
   speculative loop (:mod:`.eval`), and the drafter is saved in the z-lab layout.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..model.checkpoint import load_drafter, save_drafter
from ..model.config import DFlashConfig, default_target_layer_ids
from ..model.drafter import DFlashDrafter
from .data import SequenceSet, build_sequences, cache_key, cached_sequences, encode_prompt, stop_token_ids
from .eval import AcceptStats, evaluate
from .init import INITS, init_drafter
from .objective import block_loss, cosine_lr, default_gamma, loss_weights, make_batch
from .prompts import build_prompts, split_prompts

MASK_TOKEN_NAMES = ("<|MASK|>", "<mask>", "[MASK]")


@dataclass
class TrainArgs:
    target: str
    out: str
    layers: int = 1
    target_layer_ids: Optional[list[int]] = None
    block_size: int = 8
    gamma: Optional[float] = None
    intermediate_size: Optional[int] = None
    num_prompts: int = 400
    num_heldout: int = 24
    prompt_seed: int = 0
    max_new_tokens: int = 192
    gen_batch_size: int = 32
    temperature: float = 0.0
    steps: int = 1000
    seqs_per_step: int = 8
    anchors_per_seq: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    loss_vocab: str = "data"
    dtype: str = "float32"
    device: str = "auto"
    threads: Optional[int] = None
    eval_every: int = 0
    eval_prompts: int = 8
    eval_max_new_tokens: int = 128
    seed: int = 0
    cache_dir: str = ".cache/dflash-train"
    save_dtype: str = "bfloat16"
    init_from: Optional[str] = None
    init: str = "auto"
    conv_kernel_size: int = 0
    conv_group_size: int = 16
    selector_rank: int = 0
    selector_top_k: int = 16
    progress: bool = True


@dataclass
class TrainResult:
    path: Path
    final: AcceptStats
    timings: dict[str, float]
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    mask_token_id: int = -1
    num_train_tokens: int = 0
    data_from_cache: bool = False


# ----------------------------------------------------------------------------- setup
def load_target(path: str | Path, device: str | torch.device, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def choose_mask_token_id(tokenizer, used: torch.Tensor, vocab_size: int) -> int:
    """The MASK id: a token the data never contains, whose embedding row is the MASK.

    A token named like a mask (``<|MASK|>``) wins, even if the data holds it: SGLang
    resolves ``<|MASK|>`` through the tokenizer and refuses a different id. Otherwise take the highest-id
    special token that is not bos/eos/pad/unk: those are control tokens of other
    formats (for SmolLM2, ``<empty_output>``, a code-pretraining marker that chat
    never produces). Either way it must not occur in the prompts or responses; a
    random target can emit anything, so the last resort is the highest unused id.
    """
    added = {int(i): t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    named = [i for i, text in added.items() if text in MASK_TOKEN_NAMES and i < vocab_size]
    if named:  # serving stacks look the name up in the tokenizer and refuse any other id
        return named[0]
    present = set(torch.unique(used).tolist())
    roles = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    specials = sorted((i for i in added if i not in roles and i < vocab_size), reverse=True)
    for candidate in [*specials, *range(vocab_size - 1, -1, -1)]:
        if candidate not in present and candidate not in roles:
            return candidate
    raise ValueError("every token id occurs in the data; there is no id left to serve as MASK")


def dflash2_fields(args: TrainArgs) -> Optional[dict]:
    """The DFlash2 part of ``dflash_config`` (``--selector-rank`` > 0 trains a DFlash2
    drafter; ``--conv-kernel-size`` > 0 adds the block convolutions), or None."""
    if not args.selector_rank and not args.conv_kernel_size:
        return None
    fields = {}
    if args.conv_kernel_size:
        fields.update(conv_kernel_size=args.conv_kernel_size, conv_group_size=args.conv_group_size)
    if args.selector_rank:
        fields.update(selector_rank=args.selector_rank, selector_top_k=args.selector_top_k)
    return fields


def drafter_config_dict(target_config, *, num_layers: int, target_layer_ids: Sequence[int], block_size: int,
                        mask_token_id: int, intermediate_size: Optional[int] = None, dtype: str = "bfloat16",
                        dflash2: Optional[dict] = None) -> dict:
    """A z-lab style config.json for a drafter of ``target_config`` (an HF config);
    ``dflash2``: convolution / selector fields (a selector makes it a DFlash2DraftModel)."""
    cfg = target_config.to_dict()
    heads = cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}
    num_target_layers = cfg["num_hidden_layers"]
    return {
        "architectures": ["DFlash2DraftModel" if (dflash2 or {}).get("selector_rank") else "DFlashDraftModel"],
        "model_type": "qwen3",
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": int(intermediate_size or cfg["intermediate_size"]),
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": cfg.get("num_key_value_heads") or heads,
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6),
        "rope_theta": rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
        "max_position_embeddings": cfg.get("max_position_embeddings", 4096),
        "vocab_size": cfg["vocab_size"],
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "layer_types": ["full_attention"] * num_layers,
        "use_sliding_window": False,
        "sliding_window": None,
        "block_size": block_size,
        "num_target_layers": num_target_layers,
        "torch_dtype": dtype,
        "dflash_config": {
            "target_layer_ids": [int(i) for i in target_layer_ids],
            "mask_token_id": int(mask_token_id),
            "block_size": block_size,
            **(dflash2 or {}),
        },
    }


def load_start_drafter(path: str | Path, config: DFlashConfig, device) -> DFlashDrafter:
    """An existing drafter to continue from (fresh optimizer and schedule): it must be
    the drafter this run would build, same shape, target layers, block and MASK."""
    drafter = load_drafter(path, dtype=torch.float32, device=device)
    have, want = drafter.config, config
    keys = ("num_layers", "hidden_size", "intermediate_size", "target_layer_ids", "block_size", "mask_token_id",
            "conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")
    diff = [f"{k} {getattr(have, k)} != {getattr(want, k)}" for k in keys if getattr(have, k) != getattr(want, k)]
    if diff:
        raise ValueError(f"--init-from {path} does not match this run's drafter: {'; '.join(diff)}")
    return drafter.train()


def loss_vocabulary(data: SequenceSet, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids that occur as labels (response tokens) and the id -> row map.

    Training over these lm_head rows instead of the whole vocabulary is several times
    cheaper on CPU; they are the tokens the target produces on this prompt
    distribution. Evaluation always uses the full vocabulary.
    """
    lengths = data.offsets[1:] - data.offsets[:-1]
    in_response = torch.arange(data.tokens.numel()) >= torch.repeat_interleave(data.offsets[:-1] + data.prompt_lens, lengths)
    ids = torch.unique(data.tokens[in_response].long())
    index = torch.full((vocab_size,), -1, dtype=torch.long)
    index[ids] = torch.arange(ids.numel())
    return ids, index


# ----------------------------------------------------------------------------- stages
class _Clock:
    """Wall and process-CPU seconds per stage (CPU time is what contention cannot inflate)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str, timings: dict[str, float]) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        timings[f"{name}_wall_s"], timings[f"{name}_cpu_s"] = wall - self.wall, cpu - self.cpu
        self.wall, self.cpu = wall, cpu


def prepare_data(args: TrainArgs, target, tokenizer, train_prompts: list[str],
                 layer_ids: Sequence[int]) -> tuple[SequenceSet, bool]:
    """(data, from_cache); ``args.cache_dir`` empty disables the cache."""
    encoded = [encode_prompt(tokenizer, p) for p in train_prompts]
    key = cache_key(args.target, encoded, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    seed=args.seed, version=1)
    path = Path(args.cache_dir) / f"data-{Path(args.target).name}-{key}.safetensors" if args.cache_dir else None

    def build(layers):
        return build_sequences(target, tokenizer, train_prompts, layer_ids=layers, max_new_tokens=args.max_new_tokens,
                               batch_size=args.gen_batch_size, temperature=args.temperature, seed=args.seed,
                               progress=args.progress)

    return cached_sequences(path, layer_ids, build)


def run_training(args: TrainArgs, drafter: DFlashDrafter, target, data: SequenceSet, eval_fn) -> tuple[list[float], list[dict]]:
    from tqdm.auto import tqdm

    device = next(drafter.parameters()).device
    config = drafter.config
    features = data.stacked_features(config.target_layer_ids)
    embed_w = target.get_input_embeddings().weight.detach()
    head_w = target.get_output_embeddings().weight.detach()
    label_map = None
    if args.loss_vocab == "data":
        ids, label_map = loss_vocabulary(data, head_w.shape[0])
        head_w, label_map = head_w[ids.to(head_w.device)].contiguous(), label_map.to(device)
    weights = loss_weights(config.block_size, args.gamma or default_gamma(config.block_size)).to(device)
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(args.seed)
    order: list[int] = []
    losses, evals = [], []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    bar = tqdm(range(args.steps), desc="train", disable=not args.progress)
    drafter.train()
    for step in bar:
        if len(order) < args.seqs_per_step:
            order += torch.randperm(len(data), generator=generator).tolist()
        indices, order = order[: args.seqs_per_step], order[args.seqs_per_step :]
        batch = make_batch(data, indices, features, block_size=config.block_size, num_anchors=args.anchors_per_seq,
                           mask_token_id=config.mask_token_id, generator=generator).to(device)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * cosine_lr(step, args.steps, args.warmup, args.min_lr_ratio)
        with autocast:
            out = block_loss(drafter, batch, embed_w, head_w, weights, label_map=label_map)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), args.grad_clip)
        optimizer.step()
        losses.append(out.loss.item())
        acc = out.correct / out.counts.clamp_min(1)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", acc1=f"{acc[0]:.2f}", refresh=False)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            stats = eval_fn(drafter, args.eval_prompts)
            evals.append({"step": step + 1, "tau": stats.tau})
            bar.write(f"step {step + 1}: loss {losses[-1]:.3f}, held-out {stats.summary()}")
    return losses, evals


def train(args: TrainArgs) -> TrainResult:
    """Generate data (cached), train, save in the z-lab layout, evaluate held-out tau."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    timings: dict[str, float] = {}
    target, tokenizer = load_target(args.target, device)
    layer_ids = args.target_layer_ids or list(default_target_layer_ids(target.config.num_hidden_layers, args.layers))
    train_prompts, heldout = split_prompts(build_prompts(args.num_prompts + args.num_heldout, args.prompt_seed),
                                           args.num_heldout)
    clock = _Clock()
    data, from_cache = prepare_data(args, target, tokenizer, train_prompts, layer_ids)
    clock.lap("data", timings)
    heldout_ids = [encode_prompt(tokenizer, p) for p in heldout]
    all_prompt_ids = torch.tensor([t for p in heldout_ids for t in p])
    mask_id = choose_mask_token_id(tokenizer, torch.cat([data.tokens.long(), all_prompt_ids]),
                                   target.get_input_embeddings().weight.shape[0])
    raw = drafter_config_dict(target.config, num_layers=args.layers, target_layer_ids=layer_ids,
                              block_size=args.block_size, mask_token_id=mask_id,
                              intermediate_size=args.intermediate_size, dtype=args.save_dtype,
                              dflash2=dflash2_fields(args))
    config = DFlashConfig.from_dict(raw)
    drafter = (load_start_drafter(args.init_from, config, device) if args.init_from
               else init_drafter(config, target, args.seed, args.init).to(device))
    stop_ids = stop_token_ids(target, tokenizer)

    def eval_fn(model: DFlashDrafter, count: int) -> AcceptStats:
        return evaluate(target, model, heldout_ids[:count], max_new_tokens=args.eval_max_new_tokens, stop_ids=stop_ids)

    clock.lap("setup", timings)
    losses, evals = run_training(args, drafter, target, data, eval_fn)
    clock.lap("train", timings)
    path = save_drafter(drafter, args.out, dtype=getattr(torch, args.save_dtype))
    final = eval_fn(load_drafter(path, dtype=torch.float32, device=device), len(heldout_ids))
    clock.lap("eval", timings)
    return TrainResult(path=path, final=final, timings=timings, losses=losses, evals=evals, mask_token_id=mask_id,
                       num_train_tokens=data.num_response_tokens(), data_from_cache=from_cache)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> TrainArgs:
    defaults = TrainArgs(target="", out="")
    parser = argparse.ArgumentParser(prog="python -m sglang_dflash.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="HF causal-LM folder (tokenizer included)")
    parser.add_argument("--out", required=True, help="output folder for config.json + model.safetensors")
    parser.add_argument("--target-layer-ids", type=int, nargs="+", help="target layers whose outputs feed the drafter")
    for name, value in asdict(defaults).items():
        if name in ("target", "out", "target_layer_ids", "progress"):
            continue
        flag = "--" + name.replace("_", "-")
        kind = type(value) if value is not None else {"gamma": float, "init_from": str}.get(name, int)
        parser.add_argument(flag, type=kind, default=value)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parsed = vars(parser.parse_args(argv))
    if parsed["loss_vocab"] not in ("data", "full"):
        parser.error("--loss-vocab must be 'data' or 'full'")
    if parsed["init"] not in INITS:
        parser.error(f"--init must be one of {', '.join(INITS)}")
    return TrainArgs(**parsed)


def report(args: TrainArgs, result: TrainResult) -> dict:
    """What a drafter's README quotes: recipe arguments, timings, held-out acceptance."""
    tail = result.losses[-20:]
    return {
        "args": {k: v for k, v in asdict(args).items() if k != "progress"},
        "timings_s": {k: round(v, 1) for k, v in result.timings.items()},
        "mask_token_id": result.mask_token_id,
        "train_response_tokens": result.num_train_tokens,
        "data_from_cache": result.data_from_cache,
        "final_loss": round(sum(tail) / max(1, len(tail)), 4),
        "heldout_tau": round(result.final.tau, 3),
        "heldout_steps": len(result.final.accept_lengths),
        "heldout_accept_histogram": result.final.histogram(),
        "heldout_position_rates": [round(r, 3) for r in result.final.position_rates()],
        "evals": result.evals,
    }


def write_report(args: TrainArgs, result: TrainResult) -> dict:
    summary = report(args, result)
    (Path(result.path) / "train_report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    print(json.dumps(write_report(args, train(args)), indent=2))

