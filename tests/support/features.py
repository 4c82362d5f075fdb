"""Request features as test cases: per prompt, the request that asks for a feature, how
to send it, and how its answer is checked against no-spec SGLang's.

Features are request parameters, not server configurations, so one speculative server
(per verify mode) and one plain server serve them all, LoRA adapters included (a
request picks its adapter with ``lora_path``). The plain server runs with
``--disable-overlap-schedule``: plain decoding's penalties and custom processors then
see the output so far, not a step behind.
"""

from __future__ import annotations

import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import requests

from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor, DisallowedTokensLogitsProcessor

# float32 on the CPU lane: a verify batch's logits differ from a one-token decode's in
# the last bits; measured differences are ~1e-5, this bound leaves room.
LOGPROB_TOLERANCE = 1e-3


class NoImmediateRepeat(CustomLogitProcessor):
    """Bans the request's last output token: a processor that reads the output so far,
    so it is exact only if every verify node sees the tokens before it."""

    def __call__(self, logits, custom_param_list=None):
        for row, params in enumerate(custom_param_list or ()):
            req = (params or {}).get("__req__")
            if req is not None and len(req.output_ids):
                logits[row, req.output_ids[-1]] = float("-inf")
        return logits


# ---------------------------------------------------------------- the servers
ADAPTER = "tiny"


def plain_options(model, adapter) -> dict:
    return {
        "model-path": model,
        "max-running-requests": 16,
        "enable-custom-logit-processor": True,
        "disable-overlap-schedule": True,
        "enable-lora": True,
        "lora-paths": f"{ADAPTER}={adapter}",
        "lora-backend": "torch_native",
        "max-lora-rank": 8,
        "max-loras-per-batch": 2,
    }


def spec_options(model, drafter, adapter, *, adaptive: bool) -> dict:
    """Block 8; adaptive verify lengths or full blocks every step."""
    options = {
        **plain_options(model, adapter),
        "speculative-algorithm": "DFLASH",
        "speculative-draft-model-path": drafter,
        "speculative-num-draft-tokens": 8,
        "no-speculative-dflash-adaptive": not adaptive,
    }
    del options["disable-overlap-schedule"]  # DFLASH on the CPU lane never overlaps
    return options


# ---------------------------------------------------------------- the features
REGEXES = [
    r"(yes|no), because [a-z ]{4,40}\.",
    r"[1-9][0-9]? (apples|pears|cats) and [1-9][0-9]? (dogs|birds)",
    r"(Paris|London|Rome|Berlin) is (big|small|old|new)\.",
]
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                "minItems": 2, "maxItems": 3}}, "required": ["items"]},
    {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
                                      "score": {"type": "number"}}, "required": ["answer", "score"]},
]
# At most four free words: the grammar itself ends the answer well inside a short budget.
EBNF = 'root ::= "The answer is " ("yes" | "no" | "maybe") ", because " [a-z]+ (" " [a-z]+)? (" " [a-z]+)? (" " [a-z]+)? "."'
EBNF_REGEX = r"The answer is (yes|no|maybe), because [a-z]+( [a-z]+)?( [a-z]+)?( [a-z]+)?\."


@dataclass
class Case:
    """One request of a feature: native ``/generate`` params, or an OpenAI chat body."""

    feature: str
    prompt: str
    sampling: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    openai: Optional[dict] = None
    validate: Optional[Callable[[str], None]] = None


def _regex_validator(pattern: str) -> Callable[[str], None]:
    def check(text: str) -> None:
        assert re.fullmatch(pattern, text), f"{text!r} does not match {pattern!r}"

    return check


def _schema_validator(schema: dict) -> Callable[[str], None]:
    def check(text: str) -> None:
        import jsonschema

        jsonschema.validate(json.loads(text), schema)

    return check


def _json_validator(text: str) -> None:
    assert isinstance(json.loads(text), dict), text


def feature_cases(feature: str, i: int, prompt: str, chat: str, tokens: dict[str, int]) -> Case:
    """The ``i``-th request of ``feature``; ``prompt`` is the raw user text, ``chat`` the
    same turn through the model's chat template; ``tokens`` names a few token ids."""
    if feature == "regex":
        pattern = REGEXES[i % len(REGEXES)]
        return Case(feature, chat, {"regex": pattern}, validate=_regex_validator(pattern))
    if feature == "json_schema":
        schema = SCHEMAS[i % len(SCHEMAS)]
        return Case(feature, chat, {"json_schema": json.dumps(schema)}, validate=_schema_validator(schema))
    if feature == "ebnf":
        return Case(feature, chat, {"ebnf": EBNF}, validate=_regex_validator(EBNF_REGEX))
    if feature == "json_object":  # OpenAI route: response_format
        body = {"messages": [{"role": "user", "content": prompt + " Answer in JSON."}],
                "response_format": {"type": "json_object"}}
        return Case(feature, prompt, openai=body, validate=_json_validator)
    if feature == "frequency_penalty":
        return Case(feature, chat, {"frequency_penalty": (0.5, 1.0, 1.5)[i % 3]})
    if feature == "presence_penalty":
        return Case(feature, chat, {"presence_penalty": (0.5, 1.0, 1.5)[i % 3]})
    if feature == "repetition_penalty":
        return Case(feature, chat, {"repetition_penalty": (1.15, 1.3, 1.6)[i % 3]})
    if feature == "logit_bias":
        bias = {str(tokens["the"]): -4.0, str(tokens[","]): 2.5, str(tokens["and"]): 1.5}
        return Case(feature, chat, {"logit_bias": bias})
    if feature == "min_new_tokens":
        # EOS made likely, so the minimum decides where the answer stops.
        return Case(feature, chat, {"min_new_tokens": (5, 11, 17)[i % 3], "logit_bias": {str(tokens["eos"]): 6.0}})
    if feature == "custom_disallowed":
        banned = [tokens["the"], tokens["."]]
        return Case(feature, chat, {"custom_params": {"token_ids": banned}},
                    {"custom_logit_processor": DisallowedTokensLogitsProcessor.to_str()})
    if feature == "custom_history":
        return Case(feature, chat, {"custom_params": {}}, {"custom_logit_processor": NoImmediateRepeat.to_str()})
    if feature == "logprobs":
        ids = [tokens["the"], tokens["eos"], tokens[","]]
        return Case(feature, chat, {}, {"return_logprob": True, "top_logprobs_num": 3, "token_ids_logprob": ids,
                                         "logprob_start_len": max(0, i % 5 - 1)})
    if feature == "logprobs_openai":
        body = {"messages": [{"role": "user", "content": prompt}], "logprobs": True, "top_logprobs": 3}
        return Case(feature, prompt, openai=body)
    raise KeyError(feature)


FEATURES = [
    "regex", "json_schema", "ebnf", "json_object", "frequency_penalty", "presence_penalty", "repetition_penalty",
    "logit_bias", "min_new_tokens", "custom_disallowed", "custom_history", "logprobs", "logprobs_openai",
]
OPENAI = {"json_object", "logprobs_openai"}

# Requests asking for several features at once: every feature is in some group, and a
# group never pairs repetition_penalty with an additive penalty (plain SGLang applies
# its penalizers in a per-process order, so that pair has no single reference) nor
# two custom processors (a request has one).
GROUPS = {
    "regex+frequency+logprobs": ["regex", "frequency_penalty", "logprobs"],
    "json_schema+presence+bias": ["json_schema", "presence_penalty", "logit_bias"],
    "ebnf+repetition+history_processor": ["ebnf", "repetition_penalty", "custom_history"],
    "penalties+min_new+disallowed+logprobs": [
        "frequency_penalty", "presence_penalty", "logit_bias", "min_new_tokens", "custom_disallowed", "logprobs",
    ],
    "repetition+history_processor+logprobs": ["repetition_penalty", "custom_history", "logprobs"],
    "openai_json_object+logprobs": ["json_object", "logprobs_openai"],
}


def group_case(features: Sequence[str], i: int, prompt: str, chat: str, tokens: dict[str, int]) -> Case:
    """One request asking for every feature of ``features`` (their params merged)."""
    parts = [feature_cases(f, i, prompt, chat, tokens) for f in features]
    merged = Case("+".join(features), parts[0].prompt)
    for part in parts:
        bias = {**merged.sampling.get("logit_bias", {}), **part.sampling.get("logit_bias", {})}
        merged.sampling.update(part.sampling)
        if bias:
            merged.sampling["logit_bias"] = bias
        merged.extra.update(part.extra)
        if part.openai is not None:
            merged.openai = {**part.openai, **(merged.openai or {})}  # the first feature's messages
            merged.prompt = part.prompt
        merged.validate = merged.validate or part.validate
    return merged


def named_tokens(model_path) -> dict[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    named = {name: tok.encode(text, add_special_tokens=False)[0] for name, text in
             (("the", " the"), (",", ","), ("and", " and"), (".", "."))}
    named["eos"] = tok.eos_token_id
    return named


def chat_text(model_path, prompts: Sequence[str]) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts]


# ---------------------------------------------------------------- sending
@dataclass
class Answer:
    ids: list[int]
    text: str
    finish: Any
    logprobs: Optional[list] = None  # per output token: (logprob, token, top [(logprob, token)], ids [(logprob, token)])
    input_logprobs: Optional[list] = None
    accepted: Optional[int] = None  # drafts accepted for this request (native route only)


def send(server, case: Case, max_new_tokens: int) -> Answer:
    if case.openai is not None:
        body = {"model": "default", "temperature": 0.0, "max_tokens": max_new_tokens, **case.openai}
        resp = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=900)
        assert resp.status_code == 200, resp.text
        choice = resp.json()["choices"][0]
        logprobs = None
        if choice.get("logprobs"):
            logprobs = [(c["logprob"], c["token"], [(t["logprob"], t["token"]) for t in c["top_logprobs"]], None)
                        for c in choice["logprobs"]["content"]]
        return Answer(ids=[], text=choice["message"]["content"], finish=choice["finish_reason"], logprobs=logprobs)
    params = {"temperature": 0.0, "max_new_tokens": max_new_tokens, **case.sampling}
    body = {"text": case.prompt, "sampling_params": params, **case.extra}
    resp = requests.post(f"{server.url}/generate", json=body, timeout=900)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    meta = out["meta_info"]
    logprobs = input_logprobs = None
    if case.extra.get("return_logprob"):
        tops = meta.get("output_top_logprobs") or [None] * len(out["output_ids"])
        ids = meta.get("output_token_ids_logprobs") or [None] * len(out["output_ids"])
        logprobs = [(lp, tok, [(t[0], t[1]) for t in top or ()], [(t[0], t[1]) for t in idl or ()])
                    for (lp, tok, _), top, idl in zip(meta["output_token_logprobs"], tops, ids)]
        input_logprobs = [(lp, tok) for lp, tok, _ in meta["input_token_logprobs"]]
    accepted = sum(meta.get("spec_dflash_accepted_per_step", ()))
    return Answer(out["output_ids"], out["text"], meta["finish_reason"], logprobs, input_logprobs, accepted)


def run_cases(server, cases: Sequence[Case], *, batch: int, max_new_tokens: int) -> list[Answer]:
    if batch == 1:
        return [send(server, c, max_new_tokens) for c in cases]
    with ThreadPoolExecutor(max_workers=batch) as pool:
        return list(pool.map(lambda c: send(server, c, max_new_tokens), cases))


def accepted_drafts(server) -> int:
    return int(server.dflash_state()["stats"]["accepted_drafts"])


# ---------------------------------------------------------------- checking
def close(a: Optional[float], b: Optional[float]) -> bool:
    if a is None or b is None:
        return a is b
    if math.isinf(a) or math.isinf(b) or abs(a) > 1e30 or abs(b) > 1e30:
        return (a < -1e30) == (b < -1e30)  # both masked (SGLang clamps -inf to float32's min)
    return abs(a - b) <= LOGPROB_TOLERANCE


def assert_same_top(got: list, want: list, where: str) -> None:
    """The same top-k tokens with close values; a swap is allowed only among values tied
    within the tolerance at the top-k boundary."""
    got_tokens, want_tokens = {t for _, t in got}, {t for _, t in want}
    assert len(got) == len(want), where
    if got_tokens != want_tokens:
        edge = min(lp for lp, _ in want)
        odd = [lp for lp, t in got + want if t not in got_tokens & want_tokens]
        assert all(abs(lp - edge) <= LOGPROB_TOLERANCE for lp in odd), f"{where}: top-k {got} != {want}"
    want_by_token = dict((t, lp) for lp, t in want)
    for lp, t in got:
        if t in want_by_token:
            assert close(lp, want_by_token[t]), f"{where}: top-k {got} != {want}"


def stopped(finish) -> bool:
    """Whether an answer ended by itself (not at max_new_tokens); native or OpenAI form."""
    kind = finish.get("type") if isinstance(finish, dict) else finish
    return kind == "stop"


def assert_same_answer(case: Case, got: Answer, want: Answer, where: str) -> None:
    assert got.text == want.text and got.ids == want.ids, f"{where}: {case.feature}\n spec ={got.text!r}\n plain={want.text!r}"
    assert got.finish == want.finish, f"{where}: finish {got.finish} != {want.finish}"
    if case.validate is not None and stopped(got.finish):
        case.validate(got.text)  # a grammar-constrained answer that ended by itself is complete
    if want.logprobs is not None:
        assert got.logprobs is not None and len(got.logprobs) == len(want.logprobs), where
        for j, (g, w) in enumerate(zip(got.logprobs, want.logprobs)):
            at = f"{where} token {j}"
            assert g[1] == w[1] and close(g[0], w[0]), f"{at}: {g[:2]} != {w[:2]}"
            assert_same_top(g[2], w[2], at)
            if w[3] is not None:
                assert [t for _, t in g[3]] == [t for _, t in w[3]], at
                assert all(close(a, b) for (a, _), (b, _) in zip(g[3], w[3])), f"{at}: {g[3]} != {w[3]}"
    if want.input_logprobs is not None:
        assert [t for _, t in got.input_logprobs] == [t for _, t in want.input_logprobs], where
        assert all(close(a, b) for (a, _), (b, _) in zip(got.input_logprobs, want.input_logprobs)), where


def max_logprob_gap(got: Sequence[Answer], want: Sequence[Answer]) -> float:
    """The largest |spec - plain| over every compared output logprob (for the report)."""
    gap = 0.0
    for g, w in zip(got, want):
        for a, b in zip(g.logprobs or (), w.logprobs or ()):
            if a[0] is not None and b[0] is not None and abs(a[0]) < 1e30 and abs(b[0]) < 1e30:
                gap = max(gap, abs(a[0] - b[0]))
    return gap


def wait_idle(server, timeout: float = 60) -> None:
    """Requests of an earlier phase may still be finishing in the scheduler."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.server_info().get("internal_states", [{}])[0].get("num_running_reqs", 0) == 0:
            return
        time.sleep(0.5)
