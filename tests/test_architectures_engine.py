"""Every target family SGLang 0.5.23's CPU engine runs here, end to end: greedy DFLASH
output is token-for-token the no-speculation output, with a distilled drafter that
really accepts, and every pool is back to its start after the run and after aborts.

One tiny random model per family (``testing/devmodels/targets.py``): Llama, Qwen3-MoE,
Gemma-3 (sliding windows, our own residual-stream capture), Gemma-4 and gpt-oss
(sliding windows, attention sinks, MoE, hybrid SWA KV pools under pressure), Qwen3-Next
and Qwen3.5 (gated-delta-net linear attention: recurrent state committed after every
verify). Per family and batch size (1 and 16): 30 prompts crossing the 8-token window,
shared prefixes (radix hits), a chunked-prefill size of 16, stop tokens landing
mid-block, then continuations of every stopped request through the radix cache (a
recurrent state left ahead of its radix key would show here), then aborted streams.
SGLang's own idle leak checks run in strict mode on both servers.
"""

from __future__ import annotations

from collections import Counter

import pytest
import requests

from sglang_dflash.testing.devmodels.targets import ARCHITECTURES, server_env, server_flags
from tests.support.equivalence import (
    accepted_drafts,
    assert_pools_drained,
    assert_same_tokens,
    pools_baseline,
    request_params,
    run,
)
from tests.support.prompts import token_prompts

N_PROMPTS = 30
STRICT = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}


def plain_options(target, arch: str) -> dict:
    return {"model-path": target, "page-size": 1, "chunked-prefill-size": 16, "max-running-requests": 16, **server_flags(arch)}


def spec_options(target, drafter, arch: str) -> dict:
    return {
        **plain_options(target, arch),
        "speculative-algorithm": "DFLASH",
        "speculative-draft-model-path": drafter,
        "speculative-num-draft-tokens": 8,
        # whole blocks: multi-token commits are what is compared, not the adaptive
        # policy turning speculation off on a busy CPU
        "no-speculative-dflash-adaptive": True,
    }


def abort_streams(server, prompts, *, chunks: int = 3) -> None:
    """Start streaming requests and hang up after a few chunks: SGLang aborts them."""
    for prompt in prompts:
        body = {"input_ids": prompt, "sampling_params": {"temperature": 0.0, "max_new_tokens": 64}, "stream": True}
        with requests.post(f"{server.url}/generate", json=body, stream=True, timeout=300) as resp:
            resp.raise_for_status()
            for n, _ in enumerate(resp.iter_lines()):
                if n >= chunks:
                    break


def stop_token_for(plain, prompts, *, rows, batch: int) -> list[int]:
    """The token plain decoding emits most often past the third output token of the
    requests in ``rows`` (with their own lengths): each of those requests that emits it
    stops there, so some request surely stops mid-output."""
    rows = list(rows)
    outs = run(plain, [prompts[i] for i in rows], [request_params(i) for i in rows], batch=batch)
    counts = Counter(t for o in outs for t in o["output_ids"][3:])
    return [counts.most_common(1)[0][0]]


def assert_serves_the_checkpoint(plain, target, prompts, *, tokens: int = 4) -> None:
    """The no-spec server is the model transformers runs: the same first greedy tokens
    on (all but one of) a few prompts. Comparing spec with no-spec proves nothing if
    both serve something else (an unloaded lm_head serves uniform logits to both)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    served = run(plain, prompts, [{"temperature": 0.0, "max_new_tokens": tokens, "ignore_eos": True}] * len(prompts), batch=1)
    same = 0
    with torch.no_grad():
        for prompt, out in zip(prompts, served):
            want = model.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False, eos_token_id=None)
            same += out["output_ids"] == want[0, len(prompt) :].tolist()
    assert same >= len(prompts) - 1, f"no-spec matches transformers on only {same} of {len(prompts)} prompts"


def check_family(servers, arch: str, target, drafter, *, batch: int, n_prompts: int = N_PROMPTS) -> dict:
    env = {**STRICT, **server_env(arch)}
    spec = servers.get(spec_options(target, drafter, arch), env=env)
    plain = servers.get(plain_options(target, arch), env=env)
    assert spec.dflash_state()["backend"] == "sglang-dflash"
    start = pools_baseline(spec)
    prompts = token_prompts(n_prompts, vocab_size=512, seed=sum(map(ord, arch)))
    assert_serves_the_checkpoint(plain, target, prompts[:4])
    stop = stop_token_for(plain, prompts, rows=range(0, len(prompts), 3), batch=batch)
    params = [request_params(i, stop_token_ids=stop if i % 3 == 0 else None) for i in range(len(prompts))]
    got, want = run(spec, prompts, params, batch=batch), run(plain, prompts, params, batch=batch)
    assert_same_tokens(got, want, prompts)
    assert accepted_drafts(got) > 0, "the drafter accepted nothing: speculation was not exercised"

    # Continue every request that stopped on the stop token: the radix cache now holds
    # its prompt + output, so these prefills start from cached KV (and cached
    # recurrent states, whose key length must match what they summarise).
    stopped = [p + o["output_ids"] + p[:3] for p, o in zip(prompts, want) if o["meta_info"]["finish_reason"]["type"] == "stop"]
    assert stopped, "no request stopped mid-output; pick another stop token"
    follow = [request_params(i) for i in range(len(stopped))]
    assert_same_tokens(run(spec, stopped, follow, batch=batch), run(plain, stopped, follow, batch=batch), stopped)

    abort_streams(spec, prompts[:3])
    assert_pools_drained(spec, start)
    return {"accepted_drafts": accepted_drafts(got), "completion_tokens": sum(o["meta_info"]["completion_tokens"] for o in got)}


# CI's slow run takes the families whose CPU-lane paths are their own (a hybrid SWA pool,
# attention sinks, recurrent state with and without Qwen3.5's fused ops) at batch 16; ``make test-matrix`` runs every cell.
IN_CI = {"gemma4", "gpt_oss", "qwen3_next", "qwen3_5"}


def family_cells() -> list:
    return [
        pytest.param(arch, batch, marks=pytest.mark.slow if arch in IN_CI and batch == 16 else pytest.mark.matrix,
                     id=f"{arch}-{batch}")
        for arch in ARCHITECTURES
        for batch in (16, 1)
    ]


@pytest.mark.parametrize("arch,batch", family_cells())
def test_family_greedy_lossless(servers, arch_target, arch_drafter, arch, batch):
    check_family(servers, arch, arch_target(arch), arch_drafter(arch), batch=batch)
