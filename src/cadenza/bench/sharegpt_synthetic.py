"""Made-up multi-turn conversations in the ShareGPT schema, for when no real data is present.

The tests need conversation *shapes* (turn counts, message lengths) and prompts a real model
answers sensibly: some compare greedy output of the engine and of ``transformers`` token for
token, and word salad drives a model into near-ties between tokens that batching noise then
flips. So the text here is plain English built from templates: chat-style requests about
everyday topics, follow-ups, and replies of explanatory sentences. It is not a benchmark
workload; the benchmarks want the real conversations (:mod:`cadenza.bench.sharegpt_source`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any, Final

from cadenza.bench.sharegpt_source import Record, estimate_tokens

TOPICS: Final = (
    "photosynthesis",
    "the water cycle",
    "compound interest",
    "binary search",
    "hash tables",
    "the French Revolution",
    "black holes",
    "the immune system",
    "climate change",
    "machine learning",
    "a REST API",
    "baking sourdough bread",
    "training for a marathon",
    "learning a new language",
    "the stock market",
    "renewable energy",
    "the Roman Empire",
    "version control with git",
    "healthy sleep habits",
    "writing a cover letter",
    "plate tectonics",
    "electric cars",
    "the human heart",
    "public speaking",
)

# Requests that ask for long answers: a model that may stop after a sentence or two makes
# tests that decode a fixed number of tokens compare text past its end-of-sequence.
REQUESTS: Final = (
    "Can you explain in detail how {t} works, step by step?",
    "Write a detailed guide to {t} for complete beginners.",
    "What are the main differences between {t} and {u}? Please explain each one.",
    "Give me ten practical tips for getting started with {t}, with an explanation for each.",
    "Write a long essay about the history of {t}.",
    "I am preparing a presentation on {t}. Write a full outline with notes for every slide.",
    "Explain {t} to a ten year old, using several examples and comparisons.",
    "Describe the most common mistakes people make with {t} and how to avoid each of them.",
    "Write a complete blog post about {t}, with an introduction, several sections and a summary.",
    "List the pros and cons of {t} and discuss each point in detail.",
)

CONTEXT: Final = (
    "I am a student and I find this topic a little confusing.",
    "Please be thorough and cover everything that matters.",
    "My manager asked me to look into this for a project at work.",
    "Use simple language and give concrete examples.",
    "I have read a few articles already, but they were too technical for me.",
    "It would help if you organised the answer with headings.",
    "I would also like to know where I can learn more.",
    "Please include some background so that the answer makes sense on its own.",
)

FOLLOW_UPS: Final = (
    "Thanks! Can you give me a concrete example?",
    "Can you make that shorter?",
    "How does this compare to {u}?",
    "Now rewrite it in a more formal tone.",
    "What would be a good next step for me?",
    "Can you explain the second point in more detail?",
    "Great. Could you turn that into a short quiz with three questions?",
    "Is there anything people often get wrong about this?",
)

REPLY_OPENERS: Final = (
    "Sure! Here is a short overview of {t}.",
    "Good question. {T} is easier to understand with an example.",
    "Of course. Let me break {t} down into a few simple parts.",
    "Here is a clear explanation of {t}.",
)

REPLY_SENTENCES: Final = (
    "At its core, {t} is about how a few simple parts work together.",
    "A helpful way to think about it is to start with the basic idea and add details later.",
    "Many people find it useful to look at a real example before reading the theory.",
    "The most important point is to understand why it matters, not only how it works.",
    "In practice, small and regular steps usually work better than one big effort.",
    "It is also worth comparing {t} with {u}, because the differences are instructive.",
    "A common mistake is to skip the fundamentals and jump straight to advanced topics.",
    "If you want to go further, a good introductory book or course is a great next step.",
    "To sum up, {t} rewards patience, curiosity and a bit of practice.",
    "Experts often disagree on the details, but the main ideas are well established.",
)


def _sentences(rng: random.Random, pool: tuple[str, ...], min_chars: int, **names: str) -> str:
    """Sentences from ``pool`` in a random order, none twice in a row, until ``min_chars``."""
    parts: list[str] = []
    order: list[str] = []
    while sum(len(p) + 1 for p in parts) < min_chars:
        if not order:
            order = rng.sample(pool, len(pool))
            if parts and order[-1] == parts[-1]:
                order.reverse()
        parts.append(order.pop())
    return " ".join(p.format(**names) for p in parts)


def synthetic_sharegpt_records(count: int = 500, seed: int = 0) -> Iterator[Record]:
    """``count`` conversations in the ShareGPT multi-turn schema, deterministic for a seed.

    3 to 16 turns each (most short, a few long, as in the real sample). First messages run from
    one sentence to a paragraph (about 30 to 700 characters), follow-ups are short, replies
    about 100 to 1,500 characters.
    """
    rng = random.Random(seed)

    def message(role: str, content: str) -> dict[str, Any]:
        return {"role": role, "content": content, "n_tokens": estimate_tokens(content)}

    for i in range(count):
        topic, other = rng.sample(TOPICS, 2)
        names = {"t": topic, "u": other, "T": topic[0].upper() + topic[1:]}
        num_turns = min(16, 3 + int(rng.expovariate(1 / 3)))
        context_chars = int(600 * rng.random() ** 2)  # mostly short, some long
        messages: list[dict[str, Any]] = []
        for turn in range(num_turns):
            if turn == 0:
                request = rng.choice(REQUESTS).format(**names)
                context = _sentences(rng, CONTEXT, context_chars) if context_chars else ""
                user = f"{request} {context}".strip()
            else:
                user = rng.choice(FOLLOW_UPS).format(**names)
            reply_chars = int(100 * 15 ** rng.random())  # log-uniform, 100 to 1,500
            reply = rng.choice(REPLY_OPENERS).format(**names)
            reply += " " + _sentences(rng, REPLY_SENTENCES, reply_chars - len(reply), **names)
            messages += [message("user", user), message("assistant", reply.strip())]
        yield {"id": f"synthetic-{seed}-{i:04d}", "num_turns": num_turns, "messages": messages}
