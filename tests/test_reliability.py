"""Issue [8 of 8]: reliability under load, faults and bad input (real server, CPU lane).

The speculative server verifies whole blocks with a drafter distilled from the tiny
target, so drafts are accepted and rejected throughout, and every step speculates.
"""

from __future__ import annotations

import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.support.equivalence import accepted_drafts, activity_since, assert_pool_drained, pool_baseline, worker_stats
from tests.support.prompts import text_prompts

from tests.support.configs import CLIENTS, tiny_full_blocks, tiny_plain


def stop_string(text: str):
    """Three ASCII letters, digits or spaces from the plain model's own greedy text past
    its first 8 characters, so the string really fires mid-output. ASCII because SGLang
    0.5.23 matches stop strings in the decoded last few tokens plus those a step
    accepted: a string that starts inside a multi-byte character can escape one-token
    decoding yet match in a speculative step's wider window, for any speculative
    algorithm; ASCII decodes the same in every window."""
    found = re.search(r"[A-Za-z0-9 ]{3}", text[8:])
    return found.group(0) if found else None


def plan_requests(plain, prompts):
    """Each request's kind and parameters."""
    rng = random.Random(0)
    base = plain.generate(prompts, {"temperature": 0.0, "max_new_tokens": 48})
    plan = []
    for i, (prompt, out) in enumerate(zip(prompts, base)):
        params = {"temperature": 0.0, "max_new_tokens": rng.randint(4, 48)}
        kind = "greedy"
        stop = stop_string(out["text"])
        if i % 4 == 1:
            kind, params = "sampled", {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": rng.randint(4, 48)}
        elif i % 5 == 2 and stop is not None:
            kind, params = "stop", {**params, "max_new_tokens": 48, "stop": [stop]}
        elif i % 10 == 3:
            kind = "abort"
        plan.append((kind, prompt, params))
    return plan


def send(server, kind, prompt, params):
    if kind != "abort":
        return server.generate_one(prompt, params)
    # Read two streamed chunks, then hang up: SGLang must abort and free the request.
    body = {"text": prompt, "sampling_params": {**params, "max_new_tokens": 64}, "stream": True}
    with requests.post(f"{server.url}/generate", json=body, stream=True, timeout=300) as resp:
        resp.raise_for_status()
        for n, _ in enumerate(resp.iter_lines()):
            if n >= 2:
                break
    return None


def test_load_mixed_quick(servers, tiny_target, trained_tiny_drafter):
    load_mixed(servers, tiny_target, trained_tiny_drafter, requests_total=64, clients=16)


@pytest.mark.slow
def test_load_mixed(servers, tiny_target, trained_tiny_drafter):
    """200 requests from 32 concurrent clients."""
    load_mixed(servers, tiny_target, trained_tiny_drafter, requests_total=200, clients=CLIENTS)


def load_mixed(servers, tiny_target, trained_tiny_drafter, *, requests_total, clients):
    """Greedy, sampled, stop-string and aborted-mid-stream requests at once: zero errors,
    greedy output equal to no speculation, pools back to full, server healthy."""
    prompts = text_prompts(requests_total, seed=11)
    plain = servers.get(tiny_plain(tiny_target))
    spec = servers.get(tiny_full_blocks(tiny_target, trained_tiny_drafter))
    plan = plan_requests(plain, prompts)
    start = pool_baseline(spec)
    errors, lock = [], threading.Lock()

    def one(item):
        try:
            return send(spec, *item)
        except Exception as exc:  # every failure counts; none is expected
            with lock:
                errors.append(repr(exc))
            return None

    with ThreadPoolExecutor(clients) as pool:
        outs = list(pool.map(one, plan))
    assert errors == []
    greedy = [(i, item) for i, item in enumerate(plan) if item[0] in ("greedy", "stop")]
    want = [plain.generate_one(item[1], item[2]) for _, item in greedy]
    for (i, item), expected in zip(greedy, want):
        assert outs[i]["output_ids"] == expected["output_ids"], (i, item)
        assert outs[i]["meta_info"]["finish_reason"] == expected["meta_info"]["finish_reason"]
    assert accepted_drafts([outs[i] for i, _ in greedy]) > 0  # the greedy rows matched multi-token commits
    stopped = [outs[i]["meta_info"]["finish_reason"] for i, item in enumerate(plan) if item[0] == "stop"]
    assert sum(reason.get("matched") is not None for reason in stopped) >= len(stopped) // 2, stopped
    sampled = [outs[i] for i, item in enumerate(plan) if item[0] == "sampled"]
    assert all(1 <= o["meta_info"]["completion_tokens"] <= 48 for o in sampled)
    assert_pool_drained(spec, start)
    assert requests.get(f"{spec.url}/health", timeout=30).status_code == 200
    metrics = requests.get(f"{spec.url}/metrics", timeout=30).text
    for name in ("sglang:dflash_accept_length", "sglang:dflash_draft_step_seconds", "sglang:dflash_verify_step_seconds"):
        assert name in metrics, name


def test_per_request_stats(servers, tiny_target, trained_tiny_drafter):
    """meta_info carries accepted drafts per verify step and per block position, and
    they agree with SGLang's own counters and with the streamed tokens."""
    spec = servers.get(tiny_full_blocks(tiny_target, trained_tiny_drafter))
    out = spec.generate_one("Tell me about the history of tea.", {"temperature": 0.0, "max_new_tokens": 40})
    meta = out["meta_info"]
    per_step = meta["spec_dflash_accepted_per_step"]
    assert sum(per_step) > 0, per_step  # all-zero lists would agree with anything
    assert len(meta["spec_dflash_positions"]) == meta["completion_tokens"] == 40
    assert len(per_step) == meta["spec_verify_ct"] and sum(per_step) == meta["spec_num_correct_drafts"]
    by_position = meta["spec_dflash_accepted_by_position"]
    assert all(by_position[k] == sum(a > k for a in per_step) for k in range(len(by_position)))
    chunks = list(spec.stream("Tell me about the history of tea.", {"temperature": 0.0, "max_new_tokens": 40}))
    assert chunks[-1]["meta_info"]["spec_dflash_accepted_per_step"] == per_step


def test_max_new_tokens_one(servers, tiny_target, trained_tiny_drafter):
    spec = servers.get(tiny_full_blocks(tiny_target, trained_tiny_drafter))
    plain = servers.get(tiny_plain(tiny_target))
    out = spec.generate_one("Hello", {"temperature": 0.0, "max_new_tokens": 1})
    assert out["meta_info"]["completion_tokens"] == 1
    assert out["output_ids"] == plain.generate_one("Hello", {"temperature": 0.0, "max_new_tokens": 1})["output_ids"]


def test_prompt_at_the_context_limit(servers, tiny_target, trained_tiny_drafter):
    """Requests that decode up to the context limit (SGLang stops them short of it and
    refuses inputs near it): the last verify blocks run past the last usable position,
    and the answer is still plain decoding's; what plain SGLang refuses is refused with
    the same error."""
    spec = servers.get(tiny_full_blocks(tiny_target, trained_tiny_drafter, **{"context-length": 96}))
    plain = servers.get(tiny_plain(tiny_target, **{"context-length": 96}))
    start = pool_baseline(spec)
    before = worker_stats(spec)
    served = 0
    for length, new_tokens in ((72, 24), (84, 12), (88, 8), (94, 2), (88, 9)):
        ids = [10 + (i * 7) % 400 for i in range(length)]
        body = {"input_ids": ids, "sampling_params": {"temperature": 0.0, "max_new_tokens": new_tokens, "ignore_eos": True}}
        got = requests.post(f"{spec.url}/generate", json=body, timeout=300)
        want = requests.post(f"{plain.url}/generate", json=body, timeout=300)
        assert got.status_code == want.status_code, (length, got.text, want.text)
        if got.status_code == 200:
            assert got.json()["output_ids"] == want.json()["output_ids"]
            assert length + got.json()["meta_info"]["completion_tokens"] <= 96
            served += 1
        else:
            assert got.json() == want.json(), (got.text, want.text)
    assert served >= 2  # (72, 24) and (84, 12) decode to the limit
    assert activity_since(spec, before).steps_by_verify_len.get(8, 0) > 0  # whole blocks verified up to the limit
    assert_pool_drained(spec, start)


def test_empty_prompt(servers, tiny_target, trained_tiny_drafter):
    """Plain SGLang 0.5.23 crashes its scheduler on an empty prompt; ours answers 400."""
    spec = servers.get(tiny_full_blocks(tiny_target, trained_tiny_drafter))
    for body in ({"text": ""}, {"input_ids": []}):
        body = {**body, "sampling_params": {"temperature": 0.0, "max_new_tokens": 8}}
        resp = requests.post(f"{spec.url}/generate", json=body, timeout=120)
        # SGLang's tokenizer manager refuses an empty input_ids list itself; an empty
        # text reaches the scheduler, where ours refuses it.
        assert resp.status_code == 400, resp.text
        assert "the prompt is empty" in resp.text or "input_ids cannot be empty" in resp.text, resp.text
    assert requests.get(f"{spec.url}/health", timeout=30).status_code == 200
    assert spec.generate_one("Hello", {"temperature": 0.0, "max_new_tokens": 4})["meta_info"]["completion_tokens"] == 4


def test_request_refusals():
    """Only what the worker cannot serve exactly is refused, in one line: the request
    features served per verify position pass (SGLang itself answers return_hidden_states
    with 400 unless the server enables it, so this is checked on the request object)."""
    from types import SimpleNamespace

    from sglang_dflash.host.requests import unsupported_reason

    params = SimpleNamespace(frequency_penalty=0.5, presence_penalty=0.5, repetition_penalty=1.2, min_new_tokens=3,
                             logit_bias={"5": 1.0}, regex="[a-z]+", json_schema=None, ebnf=None, structural_tag=None)
    served = SimpleNamespace(origin_input_ids=[1, 2], sampling_params=params, return_logprob=True,
                             custom_logit_processor="...", return_hidden_states=False)
    assert unsupported_reason(served) is None
    hidden = SimpleNamespace(**{**vars(served), "return_hidden_states": True})
    assert "does not support return_hidden_states" in unsupported_reason(hidden)
