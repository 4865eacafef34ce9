"""Learned tool-call TTLs on an injected clock: a tool whose calls take about 3 s gets pins of
about that length; a tool that takes minutes gets none (its session's KV goes down a tier)."""

from __future__ import annotations

import random

import pytest

from cadenza.session.tool_ttl import ToolTTLLearner


def drive(learner: ToolTTLLearner, tool: str, durations: list[float], tenant: str = "t"):
    now = 0.0
    ttls = []
    for i, duration in enumerate(durations):
        session = f"{tool}-{i}"
        ttls.append(learner.tool_called(session, tenant, [tool], now))
        now += duration
        assert learner.turn_arrived(session, now) == pytest.approx(duration)
        now += 1.0
    return ttls


def test_a_three_second_tool_gets_pins_of_about_three_seconds():
    rng = random.Random(0)
    learner = ToolTTLLearner()
    drive(learner, "grep", [rng.uniform(2.5, 3.5) for _ in range(40)])
    ttl = learner.ttl("t", "grep")
    assert 3.0 <= ttl <= 3.5 * learner.margin
    assert learner.tool_called("next", "t", ["grep"], 1000.0) == ttl


def test_a_tool_that_takes_minutes_gets_no_pin():
    learner = ToolTTLLearner()
    first = drive(learner, "build", [180.0, 240.0, 200.0, 210.0])
    assert first[0] == learner.default_ttl_s  # before it has been seen enough
    assert learner.ttl("t", "build") == 0.0
    # A turn calling it along with a quick tool is not pinned either: the slow one decides.
    drive(learner, "ls", [0.5, 0.6, 0.4])
    assert learner.tool_called("both", "t", ["ls", "build"], 0.0) == 0.0
    assert learner.turn_arrived("both", 200.0) == 200.0
    assert learner.observed("t", "build")[-1] == 200.0  # attributed to the slow tool


def test_durations_are_learned_per_tenant_and_unknown_tools_get_the_default():
    learner = ToolTTLLearner(default_ttl_s=5.0, min_samples=2)
    drive(learner, "search", [1.0, 1.0, 1.0], tenant="a")
    assert learner.ttl("a", "search") == pytest.approx(1.1)
    assert learner.ttl("b", "search") == 5.0
    assert learner.tool_called("s", "a", [], 0.0) == 0.0
    assert learner.turn_arrived("never-called", 1.0) is None


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError):
        ToolTTLLearner(quantile=0)
