"""Shared fixtures: models built in code (or unpacked from PyPI), pooled SGLang servers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sglang_dflash.cpu_lane import CPU_ENV, activate

for _key, _value in CPU_ENV.items():
    os.environ.setdefault(_key, _value)
activate()  # the .pth boot hook ran before these variables were set

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / ".cache" / "models"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_target(models_dir) -> Path:
    from sglang_dflash.devmodels.tiny import build_tiny_target

    return build_tiny_target(models_dir / "tiny-qwen3")


@pytest.fixture(scope="session")
def tiny_drafter(models_dir, tiny_target) -> Path:
    """A random 2-layer drafter (block 8) for the tiny target: exercises every code
    path, accepts almost nothing."""
    from sglang_dflash.devmodels.tiny import build_random_drafter

    return build_random_drafter(
        models_dir / "tiny-drafter", target=tiny_target, num_layers=2, block_size=8, target_layer_ids=[1, 2]
    )


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct converted from the PyPI wheel (cached under .cache/)."""
    from sglang_dflash.devmodels.smollm2 import convert

    return convert(MODELS / "smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_random_drafter(models_dir, smollm2) -> Path:
    from sglang_dflash.devmodels.tiny import build_random_drafter

    return build_random_drafter(models_dir / "smollm2-random-drafter", target=smollm2, num_layers=1, block_size=16)


@pytest.fixture(scope="session")
def servers():
    from sglang_dflash.local_server import ServerPool

    pool = ServerPool(capacity=3)
    yield pool
    pool.close()
