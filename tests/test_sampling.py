"""``filtered_probs`` is the distribution SGLang 0.5.23's torch sampler draws from.

Three independent checks:

* against a plain-Python restatement of SGLang's filter (``support.reference_spec``);
* against SGLang's own ``top_k_top_p_min_p_sampling_from_probs_torch`` source, compiled
  from the installed file without importing SGLang (its ``return_filtered_probs`` output
  is the filtered, unnormalised distribution), on random and tie-heavy logits;
* empirically: a subprocess that imports the real SGLang sampler on the CPU lane and
  draws many samples per row; their counts are chi-square tested against ours.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_dflash.cpu_lane import CPU_ENV
from sglang_dflash.spec.sampling import RowSampling, filtered_probs
from tests.support.reference_spec import chi_square_gof, sglang_filter_reference

TOP_K_ALL = 1 << 30  # SGLang's "no top-k" value (sampling_params.TOP_K_ALL)
FUNC_NAME = "top_k_top_p_min_p_sampling_from_probs_torch"


def random_params(gen: torch.Generator, rows: int, vocab: int) -> RowSampling:
    """Per-row params mixing greedy (top_k=1), top-k, top-p, min-p and plain rows."""
    kind = torch.randint(0, 6, (rows,), generator=gen)
    temperature = 0.3 + 1.4 * torch.rand(rows, generator=gen)
    top_k = torch.full((rows,), TOP_K_ALL, dtype=torch.long)
    top_p = torch.ones(rows)
    min_p = torch.zeros(rows)
    ks = torch.randint(1, vocab + 1, (rows,), generator=gen)
    ps = 0.05 + 0.9 * torch.rand(rows, generator=gen)
    mins = 0.3 * torch.rand(rows, generator=gen)
    top_k = torch.where((kind == 1) | (kind == 4), ks, top_k)
    top_p = torch.where((kind == 2) | (kind == 4), ps, top_p)
    min_p = torch.where((kind == 3) | (kind == 4), mins, min_p)
    greedy = kind == 5  # SGLang: temperature 0 -> temperature 1, top_k 1
    top_k = torch.where(greedy, torch.ones_like(top_k), top_k)
    temperature = torch.where(greedy, torch.ones_like(temperature), temperature)
    return RowSampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)


# --------------------------------------------------------------------------- plain reference


@pytest.mark.parametrize("vocab", [2, 7, 64])
def test_filtered_probs_matches_plain_python_reference(vocab):
    gen = torch.Generator().manual_seed(1000 + vocab)
    rows = 200
    logits = torch.randn(rows, vocab, generator=gen) * 3
    params = random_params(gen, rows, vocab)
    ours = filtered_probs(logits, params)
    for r in range(rows):
        ref = sglang_filter_reference(
            logits[r].tolist(),
            float(params.temperature[r]),
            int(params.top_k[r]),
            float(params.top_p[r]),
            float(params.min_p[r]),
        )
        assert torch.allclose(ours[r].double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5), (r, ours[r], ref)
    assert torch.allclose(ours.sum(-1), torch.ones(rows), atol=1e-5)


def test_greedy_rows_are_one_hot_argmax():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(50, 33, generator=gen)
    params = RowSampling(
        temperature=torch.ones(50), top_k=torch.ones(50, dtype=torch.long), top_p=torch.ones(50), min_p=torch.zeros(50)
    )
    probs = filtered_probs(logits, params)
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 33).float())


def test_row_sampling_helpers():
    params = RowSampling(
        temperature=torch.tensor([0.5, 1.0]),
        top_k=torch.tensor([1, TOP_K_ALL]),
        top_p=torch.tensor([1.0, 0.9]),
        min_p=torch.tensor([0.0, 0.1]),
    )
    assert params.greedy.tolist() == [True, False]
    rep = params.repeat_interleave(3)
    assert rep.top_k.tolist() == [1, 1, 1, TOP_K_ALL, TOP_K_ALL, TOP_K_ALL]
    assert rep.select(torch.tensor([3])).top_p.tolist() == pytest.approx([0.9])


# --------------------------------------------------------------------------- SGLang's own source


def sglang_sampler_path() -> Path:
    spec = importlib.util.find_spec("sglang")  # locates the package without importing it
    assert spec is not None and spec.origin, "sglang is not installed"
    return Path(spec.origin).parent / "srt" / "layers" / "sampler.py"


def load_sglang_filter():
    """Compile SGLang's filter function from the installed source file (importing
    sglang itself costs ~20 s and needs the CPU lane; the function only needs torch)."""
    source = sglang_sampler_path().read_text()
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == FUNC_NAME)
    namespace = {"torch": torch, "Optional": Optional}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "sglang_sampler_excerpt", "exec"), namespace)
    return namespace[FUNC_NAME]


@pytest.fixture(scope="module")
def sglang_filter():
    return load_sglang_filter()


def sglang_distribution(sglang_filter, logits: torch.Tensor, params: RowSampling) -> torch.Tensor:
    """SGLang's sampler, as ``Sampler.forward`` drives it: divide by temperature, softmax,
    then the filter; its returned filtered weights are normalised and unsorted."""
    probs = torch.softmax(logits.float() / params.temperature[:, None], dim=-1)
    _, weights, order, _ = sglang_filter(
        probs,
        params.top_k,
        params.top_p,
        params.min_p,
        bool((params.min_p > 0).any()),
        None,
        None,
        return_filtered_probs=True,
    )
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order.long(), weights)


@pytest.mark.parametrize("vocab", [3, 32, 1000])
def test_filtered_probs_matches_sglang_source(sglang_filter, vocab):
    gen = torch.Generator().manual_seed(vocab)
    rows = 256
    logits = torch.randn(rows, vocab, generator=gen) * 4
    params = random_params(gen, rows, vocab)
    assert torch.allclose(filtered_probs(logits, params), sglang_distribution(sglang_filter, logits, params), atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_filtered_probs_matches_sglang_source_with_ties(sglang_filter, data):
    """Few distinct logit values, so many ties sit on the top-k / top-p / min-p cut."""
    rows = data.draw(st.integers(1, 6))
    vocab = data.draw(st.integers(1, 12))
    logits = torch.tensor(data.draw(st.lists(st.lists(st.sampled_from([-2.0, 0.0, 0.0, 1.0, 3.0]), min_size=vocab, max_size=vocab), min_size=rows, max_size=rows)))
    params = RowSampling(
        temperature=torch.tensor(data.draw(st.lists(st.sampled_from([0.5, 1.0, 1.7]), min_size=rows, max_size=rows))),
        top_k=torch.tensor(data.draw(st.lists(st.sampled_from([1, 2, 3, 5, TOP_K_ALL]), min_size=rows, max_size=rows))),
        top_p=torch.tensor(data.draw(st.lists(st.sampled_from([0.1, 0.5, 0.8, 0.95, 1.0]), min_size=rows, max_size=rows))),
        min_p=torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 0.0, 0.2, 0.5, 1.0]), min_size=rows, max_size=rows))),
    )
    ours = filtered_probs(logits, params)
    theirs = sglang_distribution(sglang_filter, logits, params)
    assert torch.allclose(ours, theirs, atol=1e-6), (logits, params, ours, theirs)


# --------------------------------------------------------------------------- real sampler, empirically

SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import sglang_dflash.cpu_lane as lane
    lane.activate()
    import torch
    from sglang.srt.layers.sampler import top_k_top_p_min_p_sampling_from_probs_torch as sample
    job = torch.load(sys.argv[1])
    torch.manual_seed(job["seed"])
    result = {}
    for name, batch in job["batches"].items():
        logits, temperature, top_k, top_p, min_p = (batch[k] for k in ("logits", "temperature", "top_k", "top_p", "min_p"))
        draws, vocab = job["draws"], logits.shape[-1]
        # Each row repeated `draws` times: one sampler call draws every sample at once.
        probs = torch.softmax(logits / temperature[:, None], dim=-1).repeat_interleave(draws, 0)
        finite_k = bool((top_k < (1 << 30)).all())
        tokens = sample(
            probs, top_k.repeat_interleave(draws), top_p.repeat_interleave(draws), min_p.repeat_interleave(draws),
            bool((min_p > 0).any()), None, None,
            max_top_k=int(top_k.max()) if finite_k else None,
        )
        counts = torch.zeros(logits.shape[0] * vocab, dtype=torch.long)
        rows = torch.arange(logits.shape[0]).repeat_interleave(draws)
        counts.index_add_(0, rows * vocab + tokens.long(), torch.ones_like(rows))
        result[name] = counts.view(logits.shape[0], vocab).tolist()
    print("COUNTS" + json.dumps(result))
    """
)


def test_filtered_probs_matches_real_sglang_sampler_empirically(tmp_path):
    gen = torch.Generator().manual_seed(2024)
    vocab, rows, draws = 24, 16, 20000
    batches = {}
    # "mixed": full sort path (some rows without top-k); "topk": SGLang's max_top_k path.
    for name in ("mixed", "topk"):
        logits = torch.randn(rows, vocab, generator=gen) * 2.5
        params = random_params(gen, rows, vocab)
        if name == "topk":
            params.top_k = torch.randint(1, 9, (rows,), generator=gen)
        batches[name] = {
            "logits": logits,
            "temperature": params.temperature,
            "top_k": params.top_k,
            "top_p": params.top_p,
            "min_p": params.min_p,
        }
    job = tmp_path / "job.pt"
    torch.save({"seed": 5, "draws": draws, "batches": batches}, job)
    env = {**os.environ, **CPU_ENV, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_SCRIPT, str(job)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("COUNTS"))
    counts = json.loads(line[len("COUNTS") :])

    tests = 2 * rows
    worst = 1.0
    for name, batch in batches.items():
        params = RowSampling(batch["temperature"], batch["top_k"], batch["top_p"], batch["min_p"])
        ours = filtered_probs(batch["logits"], params)
        for r in range(rows):
            row_counts = counts[name][r]
            support = ours[r] > 0
            # Never a token outside our support (SGLang's filter removed nothing we keep, and vice versa in mass).
            assert all(c == 0 for c, s in zip(row_counts, support.tolist()) if not s), (name, r, row_counts, ours[r])
            if params.top_k[r] == 1:
                assert row_counts[int(batch["logits"][r].argmax())] == draws
            _, _, p = chi_square_gof(row_counts, ours[r].tolist())
            worst = min(worst, p)
    print(f"SGLang sampler vs filtered_probs: smallest per-row chi-square p = {worst:.4g} over {tests} rows")
    assert worst > 0.01 / tests  # Bonferroni over all rows: family-wise false alarm <= 1%
