"""The cluster benchmark's sessions: ShareGPT conversations, think time = reading + typing, and
a hint when the user starts typing (SYMPHONY's advisory request), some of them missing or false.

* Think time before each follow-up is an exponential *reading* time (mean ``read_mean_s``)
  plus a fixed *typing* time; the client posts the hint as typing starts, so the hint's lead
  is the typing time (default 11.3 s, SYMPHONY's mean for ShareGPT).
* A fraction ``missing`` of follow-up turns comes with no hint (the front end did not see the
  user start typing); a fraction ``false`` of sessions sends a hint after its last turn and
  never sends the turn (the user walked away).

Both draws come from their own seeded generator, separate from the arrival and reading-time
draws of :func:`cadenza.bench.workloads.plan_sessions`, so changing the hint fractions changes
no arrival, and the same seed gives the same hints for every policy.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from cadenza.bench.load_client import HintSchedule
from cadenza.bench.workloads import Conversation, SessionPlan, plan_sessions


def plan_cluster_sessions(
    conversations: Sequence[Conversation],
    *,
    session_rate: float,
    read_mean_s: float,
    typing_s: float,
    seed: int,
) -> list[SessionPlan]:
    """Poisson session starts; each think time is a reading time plus ``typing_s``."""
    if typing_s < 0:
        raise ValueError(f"typing_s must be >= 0, got {typing_s}")
    plans = plan_sessions(
        conversations, session_rate=session_rate, mean_think_s=read_mean_s, seed=seed
    )
    return [replace(p, think_s=tuple(t + typing_s for t in p.think_s)) for p in plans]


def hint_schedules(
    plans: Sequence[SessionPlan],
    *,
    missing: float,
    false: float,
    read_mean_s: float,
    seed: int,
) -> list[HintSchedule]:
    """Per session: follow-up turns sent unhinted (each with probability ``missing``) and,
    with probability ``false``, a false hint a reading time after its last reply.

    The draws per session are made in a fixed order (one per follow-up, then the false-hint
    coin, then its reading time, drawn whether used or not), so a session's schedule depends
    only on the seed and the sessions before it.
    """
    for name, frac in (("missing", missing), ("false", false)):
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{name} must be a fraction in [0, 1], got {frac}")
    rng = random.Random(f"cadenza-cluster-hints-{seed}")
    out: list[HintSchedule] = []
    for plan in plans:
        n = len(plan.conversation.turns)
        unhinted = frozenset(i for i in range(1, n) if rng.random() < missing)
        is_false = rng.random() < false
        reading = read_mean_s * rng.expovariate(1.0)
        out.append(HintSchedule(unhinted, reading if is_false else None))
    return out


def trial_conversations(
    conversations: Sequence[Conversation], offset: int, count: int
) -> list[Conversation]:
    """``count`` conversations from ``offset`` on, cycling: consecutive trials take disjoint
    slices (as long as the list lasts), so no trial replays what an earlier one sent."""
    if not conversations:
        raise ValueError("no conversations")
    n = len(conversations)
    return [conversations[(offset + i) % n] for i in range(count)]
