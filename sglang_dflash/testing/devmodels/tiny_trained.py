"""A trained 1-layer drafter for the tiny random Qwen3 target (see :mod:`tiny`).

A random drafter accepts almost nothing, so engine tests on the tiny target would
never exercise multi-token commits. A random target's greedy continuations are not
random, though: they settle into short loops and repeated tokens, which a drafter can
learn from the target's own hidden states in about a minute of CPU. Training runs on
one thread with fixed seeds, so the same ``seed`` gives the same weights on any
machine with the same torch build.

    python -c "from sglang_dflash.testing.devmodels.tiny_trained import train_tiny_drafter as t; \\
               print(t('.cache/models/tiny-qwen3', '.cache/models/tiny-drafter-trained'))"

:func:`train_tiny_dflash2_drafter` trains a DFlash2 drafter the same way; its selector
learns the target's token-to-token transitions, so its paths really get accepted.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

# Chosen for a short wall time on two busy cores; the held-out tau it reaches is
# recorded in train_report.json next to the weights.
TINY_RECIPE = dict(
    layers=1,
    target_layer_ids=[2],
    block_size=8,
    num_prompts=120,
    num_heldout=8,
    max_new_tokens=192,
    gen_batch_size=64,
    steps=400,
    seqs_per_step=8,
    anchors_per_seq=24,
    lr=1e-2,
    warmup=20,
    eval_max_new_tokens=128,
    save_dtype="float32",
)


# A DFlash2 drafter trained by the same recipe: two-tap block convolutions in groups of
# 16 channels and a rank-8 candidate selector over the top 8 tokens.
TINY_DFLASH2 = dict(conv_kernel_size=2, conv_group_size=16, selector_rank=8, selector_top_k=8)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_tiny_drafter(target_dir: str | Path, out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Train a drafter for the tiny target in ``target_dir``; write it (z-lab layout, plus
    ``train_report.json`` with the held-out tau) to ``out_dir`` and return that path."""
    from ...train import TrainArgs, train, write_report

    settings = {"cache_dir": "", "progress": False, **TINY_RECIPE, **overrides}
    with _one_thread():
        args = TrainArgs(target=str(target_dir), out=str(out_dir), seed=seed, **settings)
        write_report(args, train(args))
    return Path(out_dir)


def train_tiny_dflash2_drafter(target_dir: str | Path, out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """:func:`train_tiny_drafter` for a DFlash2 drafter (:data:`TINY_DFLASH2`)."""
    return train_tiny_drafter(target_dir, out_dir, seed=seed, **{**TINY_DFLASH2, **overrides})
