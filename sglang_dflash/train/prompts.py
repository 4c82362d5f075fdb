"""Instruction prompts for drafter distillation, authored here so they can ship.

The target writes the responses (see :mod:`.data`); the prompts only have to
cover the kinds of requests a chat model answers: explanations, lists, stories,
letters, code, arithmetic, comparisons, rewrites. They are built from task templates,
topics and a few parametric generators (numbers, names), then shuffled with a fixed
seed, so the same ``(count, seed)`` always gives the same list. :func:`split_prompts`
cuts a held-out set for evaluation that shares no prompt with the training set.
"""

from __future__ import annotations

import random

TOPICS = [
    "photosynthesis", "black holes", "the water cycle", "volcanoes", "the human heart",
    "electricity", "magnets", "climate change", "the moon", "honey bees", "rainbows",
    "earthquakes", "vaccines", "DNA", "gravity", "the Roman Empire", "the printing press",
    "the Industrial Revolution", "ancient Egypt", "the Silk Road", "the internet",
    "recycling", "healthy sleep", "learning a new language", "saving money", "public speaking",
    "time management", "gardening", "baking bread", "making tea", "riding a bicycle",
    "the game of chess", "playing the guitar", "painting with watercolors", "running a marathon",
    "keeping a journal", "the ocean", "rain forests", "deserts", "penguins", "elephants",
    "octopuses", "dinosaurs", "the solar system", "computers", "smartphones", "robots",
    "artificial intelligence", "databases", "sorting algorithms", "prime numbers", "fractions",
    "the Pythagorean theorem", "probability", "the French Revolution", "renewable energy",
    "wind turbines", "coffee", "friendship", "libraries", "museums", "trains", "airplanes",
    "bridges", "the city of Paris", "mountains", "rivers", "snow", "the color blue", "music",
]

TASKS = [
    "Explain {t} in simple terms.",
    "Explain {t} to a ten-year-old.",
    "Write a short paragraph about {t}.",
    "List five interesting facts about {t}.",
    "Give me three tips related to {t}.",
    "Write a short poem about {t}.",
    "Write a short story that involves {t}.",
    "What are the main advantages and disadvantages of {t}?",
    "Summarize what people should know about {t}.",
    "Write a haiku about {t}.",
    "Describe {t} in three sentences.",
    "Why is {t} important?",
    "Write a short blog post introduction about {t}.",
    "Create a quiz with three questions about {t}.",
    "What is a common misconception about {t}?",
    "Write a tweet about {t}.",
    "How would you teach a beginner about {t}?",
    "Write a dialogue between two friends talking about {t}.",
    "Give a step-by-step guide related to {t}.",
    "What is the history of {t}?",
]

CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "computes the factorial of n",
    "returns the n-th Fibonacci number", "counts the vowels in a string",
    "finds the largest element of a list", "removes duplicates from a list",
    "checks whether a word is a palindrome", "sorts a list of numbers with bubble sort",
    "merges two sorted lists", "converts Celsius to Fahrenheit", "sums the digits of an integer",
    "returns the greatest common divisor of two numbers", "flattens a nested list",
    "counts how often each word appears in a text", "checks whether two strings are anagrams",
    "computes the average of a list of numbers", "finds the second smallest number in a list",
    "capitalizes the first letter of every word", "returns all even numbers from a list",
]
LANGUAGES = ["Python", "JavaScript", "C", "Java", "Rust", "Go"]

STANDALONE = [
    "What is the capital of Australia?", "How do I make a cup of green tea?",
    "Write a thank-you note to a teacher.", "Write an email asking my manager for a day off.",
    "Suggest a name for a small bakery.", "What should I pack for a weekend camping trip?",
    "Give me a simple recipe for pancakes.", "How can I improve my handwriting?",
    "Write a limerick about a cat.", "What is the difference between weather and climate?",
    "Translate 'good morning, how are you?' into French.", "What are the primary colors?",
    "Write a motivational message for a student before an exam.",
    "How many continents are there? Name them.", "What does a software engineer do?",
    "Describe a sunset over the sea.", "Write a short product description for a water bottle.",
    "Plan a one-day trip to the beach.", "What is the boiling point of water?",
    "Give me a list of ten common fruits.", "What is the difference between a virus and a bacterium?",
    "How do airplanes stay in the air?", "Write a short speech for a friend's birthday.",
    "What are some good habits for staying healthy?", "Explain what a noun and a verb are.",
    "Write a riddle and give its answer.", "Describe your ideal weekend.",
    "What is the tallest mountain in the world?", "How does a refrigerator keep food cold?",
    "Write a four-line poem about autumn leaves.", "Give me five ideas for a rainy day.",
    "Explain the rules of tic-tac-toe.", "What is a list in Python?",
    "What is the difference between a list and a tuple in Python?",
    "Explain what a for loop does.", "What is an API?", "What is HTML used for?",
    "Write a SQL query that selects all rows from a table named users.",
    "Explain recursion with an example.", "What is the meaning of the word 'ephemeral'?",
    "Rewrite this sentence more formally: 'gonna grab some food, brb'.",
    "Correct the grammar: 'She don't like apples.'", "Write a short fable with a moral.",
    "What are the planets of the solar system in order?", "How do I change a flat tire?",
    "Write a job advertisement for a librarian.", "Describe the taste of chocolate.",
]

NAMES = ["Alice", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas"]
ITEMS = ["apples", "pencils", "books", "marbles", "cookies", "stickers", "coins", "cards"]


def _math_prompt(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 9)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        return f"What is {a} + {b}?"
    if kind == 1:
        return f"What is {a} times {c}? Show your work."
    if kind == 2:
        return f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
    if kind == 3:
        return f"{name} shares {a * c} {item} equally among {c} friends. How many does each friend get?"
    return f"Solve for x: {c}x + {b} = {c * a + b}."


def _code_prompt(rng: random.Random) -> str:
    return f"Write a {rng.choice(LANGUAGES)} function that {rng.choice(CODE_TASKS)}."


def _compare_prompt(rng: random.Random) -> str:
    first, second = rng.sample(TOPICS, 2)
    return f"Compare {first} and {second}."


def build_prompts(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct instructions, deterministic in ``(count, seed)``."""
    rng = random.Random(seed)
    pool = [task.format(t=topic) for task in TASKS for topic in TOPICS] + list(STANDALONE)
    rng.shuffle(pool)
    generators = (_math_prompt, _code_prompt, _compare_prompt)
    prompts: list[str] = []
    seen: set[str] = set()
    while len(prompts) < count:
        # About one prompt in four comes from a parametric generator.
        if rng.random() < 0.25 or not pool:
            prompt = rng.choice(generators)(rng)
        else:
            prompt = pool.pop()
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def split_prompts(prompts: list[str], num_heldout: int) -> tuple[list[str], list[str]]:
    """(train, heldout): the held-out prompts are the last ``num_heldout`` of the list."""
    if not 0 <= num_heldout < len(prompts):
        raise ValueError(f"cannot hold out {num_heldout} of {len(prompts)} prompts")
    cut = len(prompts) - num_heldout
    return prompts[:cut], prompts[cut:]
