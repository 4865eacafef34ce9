"""Deterministic synthetic token ids for trace replay.

A trace gives lengths, not text; the simulator still needs token ids, because block keys are
content hashes of them. Each (seed, session, turn) and each shared prefix id gets its own ids,
so sessions share KV exactly where the trace says they do (a ``shared_prefix_id``) and
nowhere else. Block keys chain through the parent key, so only a sequence's start must differ
for every later key to differ; the ids are a short pseudo-random pattern repeated, which keeps
generating a 100k-token prompt cheap.
"""

from __future__ import annotations

import random

PATTERN = 251  # a prime: consecutive blocks of a repeated pattern differ
FIRST_ID = 16


def synthetic_tokens(label: str, n: int, vocab_size: int) -> list[int]:
    rng = random.Random(label)
    pattern = [rng.randrange(FIRST_ID, vocab_size) for _ in range(min(n, PATTERN))]
    reps, rest = divmod(n, len(pattern)) if pattern else (0, 0)
    return pattern * reps + pattern[:rest]
