"""Per-position logits steps, unit by unit, against SGLang 0.5.23's own machinery.

Each verify node must be processed exactly as plain decoding processes the next token
after the node's path: penalties as SGLang's penalizers after cumulating that path,
grammar masks as the request's matcher after accepting it, custom processors as called
with that output. The oracles here replay each node's path through SGLang's objects one
token at a time, the way plain decoding would.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sglang_dflash.spec.history import OutputHistory
from sglang_dflash.spec.penalties import apply_penalties
from sglang_dflash.spec.verify_tree import VerifyTree, build_chain

V = 64
EOS = 2


# ---------------------------------------------------------------- trees
def small_tree() -> VerifyTree:
    """Two requests, 6 nodes each: a branching tree with repeated tokens on paths."""
    tokens = torch.tensor([[5, 7, 5, 9, 7, 7], [3, 3, 3, 4, 3, 8]])
    parents = torch.tensor([[-1, 0, 1, 0, 2, 3], [-1, 0, 1, 1, 2, 0]])
    depths = torch.tensor([[0, 1, 2, 1, 3, 2], [0, 1, 2, 2, 3, 1]])
    return VerifyTree(tokens=tokens, depths=depths, parents=parents, is_chain=False)


def node_path(tree: VerifyTree, b: int, node: int) -> list[int]:
    """Tokens from the root (excluded) to ``node`` (included)."""
    path = []
    while node > 0:
        path.append(int(tree.tokens[b, node]))
        node = int(tree.parents[b, node])
    return path[::-1]


# ---------------------------------------------------------------- penalties
class FakeBatch:
    """What SGLang's penalizers read from a ScheduleBatch (held weakly, so not a namespace)."""

    def __init__(self, reqs) -> None:
        self.reqs = reqs
        self.device = "cpu"


def sglang_orchestrator(params: list[dict]):
    """SGLang's penalizer orchestrator for requests with these sampling params."""
    from sglang.srt.sampling.penaltylib import (
        BatchedFrequencyPenalizer,
        BatchedMinNewTokensPenalizer,
        BatchedPenalizerOrchestrator,
        BatchedPresencePenalizer,
        BatchedRepetitionPenalizer,
    )

    tokenizer = SimpleNamespace(eos_token_id=EOS, additional_stop_token_ids=None)
    reqs = [
        SimpleNamespace(
            sampling_params=SimpleNamespace(
                frequency_penalty=p.get("frequency_penalty", 0.0),
                presence_penalty=p.get("presence_penalty", 0.0),
                repetition_penalty=p.get("repetition_penalty", 1.0),
                min_new_tokens=p.get("min_new_tokens", 0),
                stop_token_ids=set(p.get("stop_token_ids", ())),
            ),
            eos_token_ids={EOS},
            tokenizer=tokenizer,
        )
        for p in params
    ]
    batch = FakeBatch(reqs)
    penalizers = {BatchedFrequencyPenalizer, BatchedPresencePenalizer, BatchedRepetitionPenalizer, BatchedMinNewTokensPenalizer}
    orchestrator = BatchedPenalizerOrchestrator(vocab_size=V, batch=batch, penalizers=penalizers)
    orchestrator._keep = batch  # the orchestrator holds its batch weakly
    return orchestrator, reqs


def sglang_penalized(params: dict, history: list[int], logits: torch.Tensor) -> torch.Tensor:
    """Plain decoding's penalised logits [V] after output ``history`` (SGLang's
    forward order: additive penalties accumulated, then the scaling one)."""
    from sglang.srt.sampling.penaltylib.repetition_penalty import apply_scaling_penalties

    orchestrator, _ = sglang_orchestrator([params])
    for token in history:
        orchestrator.cumulate_output_tokens(torch.tensor([token]))
    x = logits.clone()[None]
    acc = torch.zeros(1, V)
    orchestrator.accumulate_additive_penalties(acc)
    x += acc
    scaling = orchestrator.accumulate_scaling_penalties()
    if scaling is not None:
        apply_scaling_penalties(x, scaling)
    return x[0]


PARAMS = [
    {"frequency_penalty": 0.7},
    {"presence_penalty": 1.3},
    {"repetition_penalty": 1.6},
    {"min_new_tokens": 9, "stop_token_ids": {9, 4}},
    {"frequency_penalty": 0.4, "presence_penalty": 0.9, "min_new_tokens": 7},
]


def our_penalized(params_list, committed, tree, logits):
    from sglang_dflash.host.penalties import penalty_rows

    _, reqs = sglang_orchestrator(params_list)
    rows = penalty_rows(reqs, list(range(len(reqs))), V, "cpu")
    counts = torch.zeros(len(reqs), V, dtype=torch.int32)
    for b, history in enumerate(committed):
        for t in history:
            counts[b, t] += 1
    return apply_penalties(logits.clone(), counts, tree.tokens, tree.ancestor_mask(), tree.depths, rows)


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: "+".join(sorted(p)))
@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_penalties_per_node_match_sglang_penalizers(params, shape):
    """Every node of a chain and of a branching tree is penalised exactly as SGLang's
    penalizers penalise the next token after the committed output plus the node's path
    (repeated tokens, ancestors only, the min_new_tokens boundary inside the block)."""
    torch.manual_seed(0)
    tree = small_tree() if shape == "tree" else build_chain(torch.tensor([[5, 7, 5, 9, 7, 7], [3, 3, 3, 4, 3, 8]]))
    committed = [[11, 5, 7, 12, 5], [3, 9, 20, 21, 22, 23, 3]]  # both end with the bonus (node 0)
    logits = torch.randn(2, 6, V) * 3
    logits[..., 9] = 50.0  # a stop token that wins unless held back
    ours = our_penalized([params, params], committed, tree, logits)
    for b in range(2):
        for node in range(6):
            want = sglang_penalized(params, committed[b] + node_path(tree, b, node), logits[b, node])
            torch.testing.assert_close(ours[b, node], want, rtol=0, atol=1e-5, msg=f"request {b} node {node}")


def test_penalties_leave_other_rows_and_are_position_exact():
    """A mixed batch: only the penalised row changes, and a frequency penalty at node j
    counts the block's earlier tokens (a per-block penalty would not)."""
    from sglang_dflash.host.penalties import PenaltyStep, penalty_rows

    _, reqs = sglang_orchestrator([{}, {"frequency_penalty": 1.0}])
    rows = penalty_rows(reqs, [1], V, "cpu")
    tree = build_chain(torch.tensor([[1, 6, 6, 6], [1, 6, 6, 6]]))
    logits = torch.zeros(2, 4, V)
    counts = torch.zeros(1, V, dtype=torch.int32)
    counts[0, 1] = 1  # the bonus
    out = PenaltyStep(rows, counts)(logits.clone(), tree)
    assert torch.equal(out[0], logits[0])
    assert out[1, :, 6].tolist() == [0.0, -1.0, -2.0, -3.0]
    assert out[1, :, 1].tolist() == [-1.0] * 4


# ---------------------------------------------------------------- history
def test_output_history_counts_tokens_and_lifecycle():
    history = OutputHistory(vocab_size=V, device="cpu")
    bonus = torch.tensor([4, 7])
    counts = history.counts(["a", "b"], bonus)  # first step: the prefill's token is recorded
    assert counts[0, 4] == 1 and counts[1, 7] == 1 and int(counts.sum()) == 2
    assert history.tokens(["b"], bonus[1:]) == [[7]]
    out = torch.tensor([[5, 5, 9, 0], [8, 3, 3, 3]])
    history.commit(["a", "b"], out, torch.tensor([3, 1]))  # padding past commit_len is not counted
    counts = history.counts(["a", "b"], torch.tensor([9, 8]))  # bonus already counted: no change
    assert counts[0].nonzero().flatten().tolist() == [4, 5, 9] and counts[0, 5] == 2
    assert counts[1].nonzero().flatten().tolist() == [7, 8] and int(counts[1].sum()) == 2
    assert history.tokens(["b"], torch.tensor([8])) == [[7, 8]]
    history.note_prefill(["a"])  # re-prefilled: the next bonus is a new token
    assert int(history.counts(["a"], torch.tensor([11]))[0].sum()) == 5
    history.forget("a")
    assert "a" not in history and int(history.counts(["c"], torch.tensor([1]))[0].sum()) == 1  # reused row, zeroed


def test_output_history_grows_past_its_pool():
    history = OutputHistory(vocab_size=V, device="cpu")
    rids = [f"r{i}" for i in range(20)]
    counts = history.counts(rids, torch.arange(20))
    assert counts.shape == (20, V) and torch.equal(counts.argmax(dim=1), torch.arange(20))


# ---------------------------------------------------------------- grammar
@pytest.fixture(scope="module")
def regex_grammar(smollm2):
    """A real xgrammar matcher over SmolLM2's tokenizer, for the regex ``(yes|no)``."""
    from sglang.srt.constrained.xgrammar_backend import XGrammarGrammarBackend
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    backend = XGrammarGrammarBackend(tokenizer, vocab_size=len(tokenizer), model_eos_token_ids=[tokenizer.eos_token_id])
    def make():
        return backend.dispatch_regex("(yes|no) (cat|dog)")
    return tokenizer, make


def reference_mask(grammar, prefix: list[int], vocab: int) -> torch.Tensor:
    """The allowed tokens after ``prefix`` (a fresh matcher of the same grammar walked there)."""
    fresh = grammar.copy()
    for t in prefix:
        fresh.accept_token(t)
    mask = fresh.allocate_vocab_mask(vocab, 1, "cpu")
    fresh.fill_vocab_mask(mask, 0)
    logits = torch.zeros(1, vocab)
    fresh.apply_vocab_mask(logits, mask)
    return logits[0] == 0


def test_grammar_step_masks_each_node_by_its_path(regex_grammar):
    """Chain and tree: a node whose path the grammar allows is masked with the matcher's
    state after that path; the matcher ends where it started."""
    from sglang_dflash.host.grammar import GrammarStep

    tokenizer, make = regex_grammar
    vocab = len(tokenizer)
    yes, space_cat, no = (tokenizer.encode(s)[0] for s in ("yes", " cat", "no"))
    grammar = make()
    bonus = yes  # already accepted by the scheduler
    grammar.accept_token(bonus)
    reqs = [SimpleNamespace(grammar=grammar), SimpleNamespace(grammar=None)]
    chain = build_chain(torch.tensor([[bonus, space_cat, tokenizer.eos_token_id, no], [1, 2, 3, 4]]))
    tree = VerifyTree(
        tokens=torch.tensor([[bonus, no, space_cat, tokenizer.eos_token_id], [1, 2, 3, 4]]),
        depths=torch.tensor([[0, 1, 1, 2], [0, 1, 1, 2]]),
        parents=torch.tensor([[-1, 0, 0, 2], [-1, 0, 0, 2]]),
        is_chain=False,
    )
    for verify_tree, allowed_paths in ((chain, {0: [bonus], 1: [bonus, space_cat]}), (tree, {0: [bonus], 2: [bonus, space_cat]})):
        before = list(grammar.accepted_tokens)
        logits = torch.zeros(2, 4, vocab)
        step = GrammarStep(reqs, vocab, barrier=None)
        step.prepare(verify_tree)
        out = step(logits, verify_tree)
        assert grammar.accepted_tokens == before and not grammar.is_terminated()
        assert torch.equal(out[1], torch.zeros(4, vocab))  # the request without a grammar
        for node, path in allowed_paths.items():
            assert torch.equal(out[0, node] == 0, reference_mask(grammar, path, vocab)), node
    # The chain's node 1 allows only EOS: " cat" completed the grammar.
    assert (chain_out := GrammarStep(reqs, vocab, None)(torch.zeros(2, 4, vocab), chain))[0, 1].eq(0).sum() >= 1
    assert chain_out[0, 1, tokenizer.eos_token_id] == 0 and chain_out[0, 1, no] == float("-inf")


def test_grammar_step_calls_the_barrier_before_reading(regex_grammar):
    """Under overlap scheduling the scheduler's barrier advances the matcher over the
    previous step's tokens; the mask must be built after it ran."""
    from sglang_dflash.host.grammar import GrammarStep

    tokenizer, make = regex_grammar
    vocab = len(tokenizer)
    yes = tokenizer.encode("yes")[0]
    grammar = make()
    reqs = [SimpleNamespace(grammar=grammar)]
    chain = build_chain(torch.tensor([[yes, 5]]))
    out = GrammarStep(reqs, vocab, barrier=lambda: grammar.accept_token(yes))(torch.zeros(1, 2, vocab), chain)
    assert torch.equal(out[0, 0] == 0, reference_mask(grammar, [yes], vocab))  # the state after "yes"


# ---------------------------------------------------------------- custom processors
class LastTokenBan:
    """A history-reading processor: bans the request's last output token."""

    def __call__(self, logits, params):
        for i, p in enumerate(params):
            logits[i, p["__req__"].output_ids[-1]] = float("-inf")
        return logits


def test_custom_processor_sees_each_nodes_path():
    from sglang_dflash.host.custom_processors import CustomProcessorStep

    req = SimpleNamespace(output_ids=[9, 9], origin_input_ids=[1])
    entry = SimpleNamespace(processor=LastTokenBan(), rows=[1])
    info = SimpleNamespace(custom_logit_processor={0: entry}, custom_params=[None, {"__req__": req}])
    tree = small_tree()
    out = CustomProcessorStep(info, outputs={1: [8, 3]})(torch.zeros(2, 6, V), tree)
    assert torch.equal(out[0], torch.zeros(6, V))
    for node in range(6):
        last = ([8, 3] + node_path(tree, 1, node))[-1]
        assert out[1, node].isinf().nonzero().flatten().tolist() == [last], node


# ---------------------------------------------------------------- logprobs
def logprob_batch(temperatures, greedy, top, token_ids):
    return SimpleNamespace(
        seq_lens=torch.zeros(len(temperatures)),
        sampling_info=SimpleNamespace(is_all_greedy=greedy, temperatures=torch.tensor(temperatures)[:, None]),
        top_logprobs_nums=top,
        token_ids_logprobs=token_ids,
    )


@pytest.mark.parametrize("greedy", [True, False])
def test_logprobs_of_every_emitted_token(greedy):
    """Chain and tree: the emitted token j's logprob is log_softmax of the logits it was
    chosen from (node j, or the tree path's node), divided by T for sampled batches;
    top-k and requested ids come from the same distribution."""
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput

    from sglang_dflash.host.logprobs import write_logprobs
    from sglang_dflash.spec.accept import Acceptance, greedy_tree_acceptance

    torch.manual_seed(1)
    logits = torch.randn(2, 6, V)
    temps = [1.0, 1.0] if greedy else [0.7, 1.0]
    batch = logprob_batch(temps, greedy, [3, 0], [None, [5, 1]])
    scaled = logits / torch.tensor(temps)[:, None, None]
    expected = scaled.log_softmax(-1)
    chain_tokens = logits.argmax(-1)
    acceptance = Acceptance(num_accepted=torch.tensor([5, 2]), out_tokens=chain_tokens, bonus=chain_tokens[:, -1])
    out = LogitsProcessorOutput(next_token_logits=None)
    write_logprobs(batch, out, logits, acceptance)
    want = expected.gather(2, chain_tokens[..., None])[..., 0]
    torch.testing.assert_close(out.next_token_logprobs, want)
    assert out.next_token_top_logprobs_idx[2].tolist() == expected[0, 2].topk(3).indices.tolist()
    torch.testing.assert_close(out.next_token_token_ids_logprobs_val[6 + 4], expected[1, 4, [5, 1]])

    tree = small_tree()
    tree_acc = greedy_tree_acceptance(tree.tokens, tree.parents, logits.argmax(-1), 3)
    out = LogitsProcessorOutput(next_token_logits=None)
    write_logprobs(batch, out, logits, tree_acc)
    for b in range(2):
        for d, node in enumerate(tree_acc.path[b].tolist()):
            token = int(tree_acc.out_tokens[b, d])
            torch.testing.assert_close(out.next_token_logprobs[b, d], expected[b, node, token])
