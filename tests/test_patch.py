"""The source-level patch: applies cleanly to the pinned SGLang, stays in sync with
the plugin's hooks, and on its own (plugin disabled) makes DFLASH run our worker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PATCH = REPO / "patches" / "sglang-0.5.23-dflash.patch"


def site_packages() -> Path:
    import sglang

    return Path(sglang.__file__).resolve().parents[1]


def test_patch_applies_cleanly_to_installed_sglang():
    proc = subprocess.run(
        ["patch", "-p1", "--dry-run", "--forward", "-i", str(PATCH)],
        cwd=site_packages(), capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAILED" not in proc.stdout and "offset" not in proc.stdout


def test_patch_is_regenerated_from_current_hooks():
    proc = subprocess.run([sys.executable, str(REPO / "patches" / "make_patch.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_patched_sglang_without_plugin(tmp_path, tiny_target, trained_tiny_drafter):
    """A patched copy of SGLang, with the entry-point plugin switched off, serves DFLASH
    with our worker and matches plain decoding, drafts accepted (whole blocks)."""
    from sglang_dflash.testing.local_server import Server
    from tests.support.prompts import token_prompts

    site = tmp_path / "site"
    shutil.copytree(site_packages() / "sglang", site / "sglang", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["patch", "-p1", "-i", str(PATCH)], cwd=site, check=True, capture_output=True)
    env = {"PYTHONPATH": f"{site}{os.pathsep}{REPO}", "SGLANG_PLUGINS": "no-such-plugin", "SGLANG_DFLASH_ADAPTIVE": "0"}
    prompts, params = token_prompts(4, vocab_size=512, seed=9), {"temperature": 0, "max_new_tokens": 40}
    server = Server(
        options={"model-path": tiny_target, "speculative-algorithm": "DFLASH",
                 "speculative-draft-model-path": trained_tiny_drafter},
        env=env,
    ).start()
    try:
        state = server.dflash_state()
        assert state["backend"] == "sglang-dflash" and state["options"]["adaptive"] is False
        got = server.generate(prompts, params)
        accepted = server.dflash_state()["stats"]["accepted_drafts"]  # a fresh server: these requests' own
    finally:
        server.stop()
    plain = Server(options={"model-path": tiny_target}).start()
    try:
        want = plain.generate(prompts, params)
    finally:
        plain.stop()
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert accepted > 0, "no draft accepted: plain decoding was compared"
