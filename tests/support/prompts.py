"""Deterministic prompt sets for equivalence tests."""

from __future__ import annotations

import random

_TOPICS = [
    "the history of tea", "how rainbows form", "a recipe for bread", "the rules of chess", "why the sky is blue",
    "writing a haiku about autumn", "the planets of the solar system", "how a bicycle works", "learning Python",
    "the water cycle", "a short story about a robot", "tips for a job interview", "how vaccines work",
    "the French revolution", "sorting algorithms", "the life of honey bees", "how to plant tomatoes",
    "the speed of light", "a letter to a friend", "the benefits of walking",
]
_FORMS = [
    "Explain {t} in simple words.", "Write three sentences about {t}.", "Give me a list of facts about {t}.",
    "Tell me about {t}.", "What is the most surprising thing about {t}?",
]


def text_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        prompt = rng.choice(_FORMS).format(t=rng.choice(_TOPICS))
        if i % 5 == 4:  # some long prompts, exercising chunked prefill
            prompt = " ".join(rng.choice(_TOPICS) for _ in range(12)) + ". " + prompt
        prompts.append(prompt)
    return prompts


def token_prompts(n: int, vocab_size: int, seed: int = 0, shared_prefix_every: int = 4) -> list[list[int]]:
    """Random token-id prompts of lengths 3..60; every few share a prefix (radix hits)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(10, vocab_size) for _ in range(24)]
    prompts = []
    for i in range(n):
        body = [rng.randrange(10, vocab_size) for _ in range(rng.randint(3, 36))]
        prompts.append(prefix + body if i % shared_prefix_every == 0 else body)
    return prompts
