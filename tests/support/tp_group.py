"""Run a function on N CPU processes that share SGLang 0.5.23's real model-parallel
groups (gloo), as the ranks of a tensor-parallel server do.

SGLang's vocab-parallel layers, ``GroupCoordinator`` collectives and
``get_dp_tp_group`` are the real ones; only the model around them is built by the
test. Each rank returns a picklable result; :func:`run_ranks` returns them in rank
order (or raises with the failing rank's traceback).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

from sglang_dflash.testing.local_server import free_port


def init_sglang_groups(rank: int, world: int, port: int, **server_args) -> None:
    """SGLang's distributed environment and model-parallel groups on gloo, with the
    topology published as a launch with ``server_args`` would publish it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    from sglang.srt.distributed import parallel_state
    from sglang.srt.distributed.parallel_state import init_distributed_environment, initialize_model_parallel
    from sglang.srt.runtime_context import SpawnRanks, get_parallel, publish, reset_context
    from sglang.srt.server_args import ServerArgs

    init_distributed_environment(
        world_size=world, rank=rank, local_rank=rank, backend="gloo", distributed_init_method=f"tcp://127.0.0.1:{port}"
    )
    reset_context()
    publish(
        ServerArgs(model_path="dummy", device="cpu", tp_size=world, **server_args),
        role="test",
        ranks=SpawnRanks(world_rank=rank),
    )
    get_parallel().override_permanently(world_group=parallel_state._WORLD)
    initialize_model_parallel(backend="gloo")


def _rank_main(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str, server_args: dict) -> None:
    out = Path(out_dir) / f"rank{rank}.pkl"
    try:
        init_sglang_groups(rank, world, port, **server_args)
        result = ("ok", fn(rank, *args))
    except BaseException:  # report every failure to the parent, with its traceback
        result = ("error", traceback.format_exc())
    out.write_bytes(pickle.dumps(result))


def run_ranks(fn: Callable, *args: Any, world: int = 2, timeout: float = 600, **server_args) -> list:
    """``fn(rank, *args)`` on ``world`` spawned processes; their results in rank order."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _rank_main,
            args=(world, free_port(), fn, args, out_dir, server_args),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        import time

        deadline = time.time() + timeout
        while not ctx.join(timeout=max(1.0, deadline - time.time())):
            if time.time() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                raise TimeoutError(f"ranks still running after {timeout:.0f}s (a collective hangs?)")
        results = []
        for rank in range(world):
            path = Path(out_dir) / f"rank{rank}.pkl"
            status, value = pickle.loads(path.read_bytes())
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results
