"""Issue [1 of 8]: the plugin makes --speculative-algorithm DFLASH run *our* worker.

Real servers on 127.0.0.1 (CPU lane), the programmatic Engine in a subprocess (SGLang
keeps process-global state), the upstream fall-back, launch-time refusals, and the
light-import and version-pin promises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import requests

from sglang_dflash.cpu_lane import CPU_ENV
from tests.support.configs import tiny_full_blocks, tiny_plain, tiny_spec
from tests.support.equivalence import activity_since, worker_stats
from tests.support.prompts import token_prompts
from sglang_dflash.testing.local_server import CPU_ARGS, cli_args

GREEDY = {"temperature": 0.0, "max_new_tokens": 24}


def dflash_options(target, drafter, **extra):
    return {"model-path": target, "speculative-algorithm": "DFLASH", "speculative-draft-model-path": drafter, **extra}


def test_entry_point_is_registered():
    (ep,) = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "dflash"]
    assert ep.value == "sglang_dflash.plugin:register"


def test_import_is_light():
    code = "import sys, sglang_dflash, sglang_dflash.plugin; print(sorted(m for m in ('torch','sglang') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_launch_server_uses_our_worker(servers, tiny_target, trained_tiny_drafter):
    server = servers.get(tiny_full_blocks(tiny_target, trained_tiny_drafter))
    state = server.dflash_state()
    assert state["backend"] == "sglang-dflash" and state["worker"] == "DFlashWorker"
    assert state["block_size"] == 8 and state["drafter"]["layers"] == 1
    info = server.server_info()
    assert info["speculative_algorithm"] == "DFLASH" and info["speculative_num_draft_tokens"] == 8

    before = worker_stats(server)
    out = server.generate_one("The quick brown fox", GREEDY)
    # Our worker ran the steps: its own step counter moved by one per decode step
    # (SGLang's spec_verify_ct would count any worker's steps).
    steps = activity_since(server, before).steps_by_verify_len
    assert out["meta_info"]["completion_tokens"] == 24 and steps == {8: len(out["meta_info"]["spec_dflash_accepted_per_step"])}
    completion = requests.post(
        f"{server.url}/v1/completions",
        json={"model": "x", "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0},
        timeout=120,
    ).json()
    assert completion["choices"][0]["text"] == out["text"]


def test_upstream_backend_switch(servers, tiny_target, trained_tiny_drafter):
    """SGLANG_DFLASH_BACKEND=upstream runs SGLang's own DFLASH (its CPU refusals lifted)
    and it is lossless too, which makes it a usable oracle."""
    # The oracle tests' upstream server (tests/test_oracles.py), shared.
    upstream = servers.get(tiny_spec(tiny_target, trained_tiny_drafter), env={"SGLANG_DFLASH_BACKEND": "upstream"})
    assert upstream.dflash_state()["backend"] == "upstream"
    plain = servers.get(tiny_plain(tiny_target))
    prompts = token_prompts(8, vocab_size=512, seed=21)  # prompts whose continuations the drafter predicts
    params = {**GREEDY, "max_new_tokens": 48, "ignore_eos": True}
    got = upstream.generate(prompts, params)
    want = plain.generate(prompts, params)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert sum(o["meta_info"].get("spec_num_correct_drafts", 0) for o in got) > 0  # multi-token commits


ENGINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import sglang as sgl

    def main():
        target, drafter, spec, prompts = sys.argv[1], sys.argv[2], sys.argv[3] == "spec", json.loads(sys.argv[4])
        kwargs = dict(model_path=target, device="cpu", attention_backend="torch_native", disable_cuda_graph=True,
                      mem_fraction_static=0.25, max_total_tokens=4096, dtype="float32", random_seed=0, log_level="error",
                      sleep_on_idle=True)
        if spec:  # our options come from the environment (SGLANG_DFLASH_ADAPTIVE=0: whole blocks)
            kwargs.update(speculative_algorithm="DFLASH", speculative_draft_model_path=drafter)
        llm = sgl.Engine(**kwargs)
        try:
            outs = llm.generate(prompts, {"temperature": 0.0, "max_new_tokens": 40})
            states = llm.get_server_info()["internal_states"][0]
            print(json.dumps({"ids": [o["output_ids"] for o in outs], "dflash": states.get("dflash")}))
        finally:
            llm.shutdown()

    if __name__ == "__main__":
        main()
    """
)


ENGINE_PROMPTS = ["Once upon a time", "def add(a, b):", "Paris is the capital of", "1 2 3 4 5"]


def run_engine(tmp_path, target, drafter, mode, env=None):
    script = tmp_path / "engine_script.py"
    script.write_text(ENGINE_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(target), str(drafter), mode, json.dumps(ENGINE_PROMPTS)],
        capture_output=True, text=True, timeout=600, env={**os.environ, **CPU_ENV, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_programmatic_engine(tmp_path, servers, tiny_target, trained_tiny_drafter):
    """sglang.Engine runs our worker, takes our options from the environment, and its
    greedy output (with drafts accepted) is plain decoding's."""
    spec = run_engine(tmp_path, tiny_target, trained_tiny_drafter, "spec", env={"SGLANG_DFLASH_ADAPTIVE": "0"})
    assert spec["dflash"]["backend"] == "sglang-dflash" and spec["dflash"]["options"]["adaptive"] is False
    assert spec["dflash"]["stats"]["accepted_drafts"] > 0
    plain = servers.get(tiny_plain(tiny_target))
    want = plain.generate(ENGINE_PROMPTS, {"temperature": 0.0, "max_new_tokens": 40})
    assert spec["ids"] == [o["output_ids"] for o in want] and all(len(ids) == 40 for ids in spec["ids"])


def launch_fails(options: dict, env: dict | None = None) -> str:
    """Run launch_server with bad options; it must exit quickly, naming the problem."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--port", "1", *cli_args({**CPU_ARGS, **options})]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **CPU_ENV, **(env or {})})
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


def resolution_fails(options: dict) -> str:
    """SGLang's own argument parsing and resolution -- everything launch_server does
    before it starts a process -- in this process with the plugins loaded."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    load_plugins()
    saved = dict(os.environ)  # our CLI flags are exported to the environment: keep them out of later tests
    try:
        with pytest.raises(Exception) as info:
            prepare_server_args(cli_args({**CPU_ARGS, **options})).resolve_once()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return str(info.value)


def write_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def bad_drafter(tmp_path, tiny_drafter, make_bad):
    import shutil

    drafter = tmp_path / "drafter"
    shutil.copytree(tiny_drafter, drafter)
    make_bad(drafter)
    return drafter


def test_launch_server_refuses_a_dflash2_drafter_without_selector(tmp_path, tiny_target, tiny_drafter):
    """The real entry point exits non-zero with our one-line reason."""
    drafter = bad_drafter(tmp_path, tiny_drafter, lambda d: write_config(d, architectures=["DFlash2DraftModel"]))
    out = launch_fails(dflash_options(tiny_target, drafter))
    assert "DFlash2DraftModel drafters need dflash_config.selector_rank and selector_top_k" in out


def test_tree_verification_refused_for_dflash2(tiny_target, tiny_dflash2_drafter):
    out = resolution_fails(dflash_options(tiny_target, tiny_dflash2_drafter, **{"speculative-dflash-tree-topk": 2}))
    assert "tree verification (--speculative-dflash-tree-topk > 1) is not supported with DFlash2 drafters" in out


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda d: write_config(d, architectures=["EagleForCausalLM"]), "unknown drafter architecture 'EagleForCausalLM'"),
        (lambda d: write_config(d, hidden_size=96), "does not match the target's hidden_size=64"),
        (lambda d: write_config(d, vocab_size=1000), "vocab_size=1000 does not match the target's vocab_size=512"),
        (lambda d: (d / "config.json").unlink(), "has no config.json"),
    ],
)
def test_bad_drafter_refused_at_launch(tmp_path, tiny_target, tiny_drafter, make_bad, message):
    drafter = bad_drafter(tmp_path, tiny_drafter, make_bad)
    assert message in resolution_fails(dflash_options(tiny_target, drafter))


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"pp-size": 2}, "supports DFLASH with --pp-size 1 only"),
        ({"speculative-draft-attention-backend": "fa3"}, "is not a sglang-dflash drafter backend"),
        ({"speculative-num-draft-tokens": 8, "speculative-dflash-block-size": 4}, "differ; for DFLASH they name the same block size"),
        ({"speculative-dflash-verify-len": 9}, "exceeds the block size 8"),
        ({"speculative-dflash-tree-topk": 2, "speculative-num-draft-tokens": 4}, "node budget 4) >= the block size 8"),
    ],
)
def test_bad_flags_refused_at_launch(tiny_target, tiny_drafter, extra, message):
    assert message in resolution_fails(dflash_options(tiny_target, tiny_drafter, **extra))


def test_missing_drafter_path(tiny_target):
    out = resolution_fails({"model-path": tiny_target, "speculative-algorithm": "DFLASH"})
    assert "DFLASH needs --speculative-draft-model-path" in out


def test_missing_drafter_folder(tiny_target):
    out = resolution_fails(dflash_options(tiny_target, "/no/such/drafter"))
    assert "'/no/such/drafter' does not exist" in out


def test_bad_option_from_environment(monkeypatch, tiny_target, tiny_drafter):
    monkeypatch.setenv("SGLANG_DFLASH_SAMPLING", "eagle")
    assert "--speculative-dflash-sampling must be one of ['pq', 'target-only']" in resolution_fails(
        dflash_options(tiny_target, tiny_drafter)
    )
