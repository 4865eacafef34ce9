"""Tests for the multi-turn replay workload (ShareGPT loading, session timing) and its report."""

from __future__ import annotations

import gzip
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
from tests.conftest import SHAREGPT_SAMPLE

from cadenza.bench.replay_report import percentile, summarize_turns, write_replay_report
from cadenza.bench.workloads import (
    Conversation,
    Turn,
    load_sharegpt,
    plan_sessions,
    truncate_text,
)


def _real_sample() -> Path:
    """The shared sample, or the stand-in conftest writes when ../shared is absent."""
    return SHAREGPT_SAMPLE


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    text = "\n".join(lines) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _record(conv_id: str, contents: list[str]) -> str:
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": c, "n_tokens": len(c.split())}
        for i, c in enumerate(contents)
    ]
    return json.dumps({"id": conv_id, "num_turns": (len(contents) + 1) // 2, "messages": messages})


# ------------------------------------------------------------------------------- load_sharegpt


def test_load_real_sample_limit_and_roles() -> None:
    path = _real_sample()
    convs = load_sharegpt(path, limit=10)
    assert len(convs) == 10
    with gzip.open(path, "rt", encoding="utf-8") as f:
        first = json.loads(f.readline())
    conv = convs[0]
    assert conv.conversation_id == first["id"]
    assert len(conv.turns) == first["num_turns"]
    msgs = first["messages"]
    for j, turn in enumerate(conv.turns):
        assert turn.user == msgs[2 * j]["content"]
        assert turn.assistant == msgs[2 * j + 1]["content"]
    assert all(isinstance(t, Turn) for c in convs for t in c.turns)


def test_load_real_sample_filters() -> None:
    path = _real_sample()
    long = load_sharegpt(path, min_turns=10, limit=20)
    assert long and all(len(c.turns) >= 10 for c in long)
    short = load_sharegpt(path, max_turns=3, limit=50)
    assert len(short) == 50 and all(len(c.turns) <= 3 for c in short)
    assert max(len(c.turns) for c in short) == 3
    # max_turns truncates before min_turns filters: nothing survives min 4 with max 3.
    assert load_sharegpt(path, max_turns=3, min_turns=4, limit=5) == []
    # skip takes the next disjoint batch.
    a = load_sharegpt(path, limit=6)
    b = load_sharegpt(path, skip=3, limit=3)
    assert [c.conversation_id for c in b] == [c.conversation_id for c in a[3:]]


def test_trailing_user_turn(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "t.jsonl",
        [_record("a", ["hi", "hello", "bye"]), "", _record("b", ["only question"])],
    )
    convs = load_sharegpt(path)
    assert convs == [
        Conversation("a", (Turn("hi", "hello"), Turn("bye", ""))),
        Conversation("b", (Turn("only question", ""),)),
    ]
    assert [c.conversation_id for c in load_sharegpt(path, min_turns=2)] == ["a"]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"id": "x", "messages": []}), "messages"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "'id'"),
        (
            json.dumps({"id": "x", "messages": [{"role": "assistant", "content": "a"}]}),
            "expected 'user'",
        ),
        (
            json.dumps(
                {"id": "x", "messages": [{"role": "user", "content": "q"}, {"role": "user"}]}
            ),
            "expected 'assistant'",
        ),
        (json.dumps({"id": "x", "messages": [{"role": "user", "content": 3}]}), "content"),
    ],
)
def test_malformed_lines(tmp_path: Path, suffix: str, bad_line: str, message: str) -> None:
    path = _write_jsonl(tmp_path / f"bad{suffix}", [_record("ok", ["q", "a"]), bad_line])
    with pytest.raises(ValueError, match=message) as info:
        load_sharegpt(path)
    assert ":2:" in str(info.value)
    # Stopping at the limit never reads the bad line.
    assert len(load_sharegpt(path, limit=1)) == 1


def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.jsonl.gz"
    with pytest.raises(FileNotFoundError, match="CADENZA_DATA_DIR") as info:
        load_sharegpt(missing)
    assert str(missing) in str(info.value)
    monkeypatch.setenv("CADENZA_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_sharegpt()


def test_env_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sharegpt").mkdir()
    _write_jsonl(
        tmp_path / "sharegpt" / "sharegpt_multiturn_sample500.jsonl.gz", [_record("e", ["q", "a"])]
    )
    monkeypatch.setenv("CADENZA_DATA_DIR", str(tmp_path))
    assert [c.conversation_id for c in load_sharegpt()] == ["e"]


def test_truncate_text() -> None:
    assert truncate_text("abcdef", 3) == "abc"
    assert truncate_text("abc", 10) == "abc"
    assert truncate_text("abc", 0) == ""
    with pytest.raises(ValueError):
        truncate_text("abc", -1)


# ------------------------------------------------------------------------------- plan_sessions


def _convs(n: int, turns: int = 3) -> list[Conversation]:
    return [
        Conversation(str(i), tuple(Turn(f"u{j}", f"a{j}") for j in range(1 + (i + turns) % 4)))
        for i in range(n)
    ]


def test_plan_sessions_deterministic_and_shaped() -> None:
    convs = _convs(50)
    a = plan_sessions(convs, session_rate=2.0, mean_think_s=5.0, seed=7)
    b = plan_sessions(convs, session_rate=2.0, mean_think_s=5.0, seed=7)
    c = plan_sessions(convs, session_rate=2.0, mean_think_s=5.0, seed=8)
    assert a == b
    assert a != c
    assert a[0].start_s == 0.0
    starts = [p.start_s for p in a]
    assert all(s1 < s2 for s1, s2 in zip(starts, starts[1:], strict=False))
    for plan, conv in zip(a, convs, strict=True):
        assert plan.conversation is conv
        assert len(plan.think_s) == len(conv.turns) - 1
        assert all(t >= 0 for t in plan.think_s)
    zero = plan_sessions(convs, session_rate=2.0, mean_think_s=0.0, seed=7)
    assert all(t == 0.0 for p in zero for t in p.think_s)
    # Common random numbers: the think time does not move the start times.
    assert [p.start_s for p in zero] == starts


def test_plan_sessions_rates() -> None:
    convs = _convs(4000)
    rate, think = 4.0, 2.5
    plans = plan_sessions(convs, session_rate=rate, mean_think_s=think, seed=1)
    gaps = [b.start_s - a.start_s for a, b in zip(plans, plans[1:], strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.1)
    thinks = [t for p in plans for t in p.think_s]
    assert statistics.fmean(thinks) == pytest.approx(think, rel=0.1)


@pytest.mark.parametrize(
    ("rate", "think"), [(0.0, 1.0), (-1.0, 1.0), (math.inf, 1.0), (1.0, -0.1), (1.0, math.nan)]
)
def test_plan_sessions_rejects(rate: float, think: float) -> None:
    with pytest.raises(ValueError):
        plan_sessions(_convs(2), session_rate=rate, mean_think_s=think)


# ------------------------------------------------------------------------------------- report


def test_percentile() -> None:
    values = [15, 20, 35, 40, 50]
    assert percentile(values, 0) == 15
    assert percentile(values, 5) == 15
    assert percentile(values, 30) == 20
    assert percentile(values, 40) == 20
    assert percentile(values, 50) == 35
    assert percentile(values, 100) == 50
    assert percentile(range(1, 101), 90) == 90
    assert percentile([3.0], 99) == 3.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_summarize_turns() -> None:
    turns = [{"ttft_s": v / 100} for v in range(1, 101)] + [{"ttft_s": None}]
    s = summarize_turns(turns)
    assert s["ttft_p50_s"] == pytest.approx(0.50)
    assert s["ttft_p90_s"] == pytest.approx(0.90)
    assert s["ttft_p99_s"] == pytest.approx(0.99)
    assert all(math.isnan(v) for v in summarize_turns([]).values())


def _summary(scale: float) -> dict:
    return {
        "turns": 40,
        "history_tokens": 12000,
        "redundant_prefill_tokens": int(3000 * scale),
        "redundant_fraction": 0.25 * scale,
        "prompt_tokens": 15000,
        "hit_tokens": {"device": 8000, "host": 2000, "disk": int(1000 * scale)},
        "recomputed_tokens": 4000,
        "swap_in_bytes": 1_500_000_000,
        "swap_out_bytes": 20_000_000,
        "disk_write_bytes": 0,
        "disk_read_bytes": 0,
        "swap_in_gbps": 12.5,
        "swap_out_gbps": 9.75,
        "ttft_p50_s": 0.0123 * scale,
        "ttft_p90_s": 0.05 * scale,
        "step_time_median_s": 0.004,
        "wall_s": 12.0,
        "extra_metric": 3.25,
        "notes": "a|b",
    }


def _turns(n: int, slope: float) -> list[dict]:
    return [
        {
            "session": f"s{i % 5}",
            "turn": i // 5,
            "history_tokens": 50 * i,
            "prompt_tokens": 50 * i + 20,
            "ttft_s": 0.002 + slope * 50 * i,
            "cached_tokens": 0,
            "redundant_tokens": 50 * i,
        }
        for i in range(n)
    ]


def test_write_replay_report(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results = {
        "meta": {"model": "smollm2-135m", "threads": 8, "tiers": {"device": 64, "host": 256}},
        "runs": [
            {
                "name": "cost-aware",
                "config": {"policy": "cost"},
                "summary": _summary(0.2),
                "turns": _turns(40, 1e-6),
            },
            {
                "name": "lru",
                "config": {"policy": "lru"},
                "summary": _summary(1.0),
                "turns": _turns(40, 1e-4),
            },
            {
                "name": "empty-run",
                "config": {},
                "summary": {"turns": 0, "ttft_p50_s": math.nan},
                "turns": [],
            },
        ],
    }
    paths = write_replay_report(results, tmp_path / "out", name="r1")
    assert set(paths) == {"json", "md", "png"}
    for p in paths.values():
        assert p.is_file() and p.stat().st_size > 0
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    md = paths["md"].read_text()
    for run in results["runs"]:
        assert run["name"] in md
    assert "r1.png" in md
    assert "smollm2-135m" in md
    assert "8,000/2,000/200" in md  # hit tokens as dev/host/disk
    assert "5.0%" in md and "25.0%" in md  # fractions as percent
    assert "swap_in (GB)" in md and "1.50" in md  # bytes in GB
    assert "swap_out (MB)" in md and "20.00" in md  # ... or MB, per column
    assert "swap_in_bw (GB/s)" in md and "12.50" in md
    assert "wall (s)" in md and "12.00" in md  # a column of long durations in seconds
    assert "ttft_p50 (ms)" in md and "12.3" in md  # seconds in ms
    assert "extra_metric" in md and "a\\|b" in md  # extra scalars are rendered, pipes escaped

    loaded = json.loads(paths["json"].read_text())
    assert loaded["runs"][:2] == results["runs"][:2]
    assert loaded["meta"] == results["meta"]
    assert loaded["runs"][2]["summary"]["ttft_p50_s"] is None  # NaN -> null (strict JSON)


def test_write_replay_report_no_turns(tmp_path: Path) -> None:
    results = {"meta": {}, "runs": [{"name": "only", "summary": {}, "turns": []}]}
    paths = write_replay_report(results, tmp_path)
    assert all(p.is_file() for p in paths.values())
    assert "only" in paths["md"].read_text()
    paths = write_replay_report({"meta": {}, "runs": []}, tmp_path, name="none")
    assert all(p.is_file() for p in paths.values())


def test_write_replay_report_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    results = {"meta": {}, "runs": [{"name": "r", "summary": {}, "turns": _turns(5, 1e-5)}]}
    with pytest.warns(RuntimeWarning, match="matplotlib"):
        paths = write_replay_report(results, tmp_path)
    assert set(paths) == {"json", "md"}
    assert "matplotlib is not installed" in paths["md"].read_text()
    assert not (tmp_path / "replay.png").exists()
