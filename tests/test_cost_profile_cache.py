"""The eviction cost-profile cache: measured once per model and machine, then read back."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import TINY_LLAMA

from cadenza.config import CacheConfig, EngineConfig
from cadenza.core.eviction import CostModel
from cadenza.model.source import random_model_source
from cadenza.runner import cost_profile_cache
from cadenza.runner.cost_profile_cache import (
    cache_path,
    load_or_profile_cost_model,
    machine_id,
    profile_key,
    profiled_starts,
)
from cadenza.runner.model_runner import ModelRunner

MAX_LEN = 512
FINGERPRINT = "tiny-llama:random:0"


def make_runner(num_blocks: int = 64) -> ModelRunner:
    config = EngineConfig(device="cpu", cache=CacheConfig(num_blocks=num_blocks))
    return ModelRunner(random_model_source(TINY_LLAMA, seed=0), config, MAX_LEN)


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return make_runner()


def _counting(
    monkeypatch: pytest.MonkeyPatch, profile: Callable[..., list[tuple[int, float]]]
) -> list[list[int]]:
    """Route profiling through ``profile`` and record the starts of every run."""
    calls: list[list[int]] = []

    def counted(runner: ModelRunner, starts: list[int], *args: Any, **kwargs: Any) -> Any:
        calls.append(list(starts))
        return profile(runner, starts, *args, **kwargs)

    monkeypatch.setattr(cost_profile_cache, "profile_chunk_costs", counted)
    return calls


@pytest.fixture
def real_profiles(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Counts runs of the real profiler (which still measures the model)."""
    return _counting(monkeypatch, cost_profile_cache.profile_chunk_costs)


@pytest.fixture
def profiles(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Counts profiling runs, answered by a stand-in that takes no time (the cache logic does
    not depend on what the points are)."""

    def instant(runner: ModelRunner, starts: list[int], *_: Any, **__: Any) -> Any:
        return [(s + 32, 1e-3 + 1e-6 * s) for s in starts]

    return _counting(monkeypatch, instant)


def _files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.iterdir())


def test_second_start_reads_the_file_instead_of_profiling(
    runner: ModelRunner, real_profiles: list[list[int]], tmp_path: Path
) -> None:
    profiles = real_profiles
    first = load_or_profile_cost_model(runner, MAX_LEN, FINGERPRINT, str(tmp_path))
    assert isinstance(first, CostModel)
    assert profiles == [[0, 32, 64, 128, 256]]
    (path,) = _files(tmp_path)  # one entry, no temp file left behind
    assert path.name.startswith("cost-profile-") and path.suffix == ".json"
    stored = json.loads(path.read_text())
    assert stored["key"]["fingerprint"] == FINGERPRINT
    assert [end for end, _ in stored["points"]] == [32, 64, 96, 160, 288]

    second = load_or_profile_cost_model(runner, MAX_LEN, FINGERPRINT, str(tmp_path))
    assert len(profiles) == 1  # read, not measured
    assert second == first


@pytest.mark.parametrize("change", ["fingerprint", "max_model_len", "threads", "pool"])
def test_a_changed_key_profiles_again(
    runner: ModelRunner,
    profiles: list[list[int]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: str,
) -> None:
    load_or_profile_cost_model(runner, MAX_LEN, FINGERPRINT, str(tmp_path))
    fingerprint, max_len, other = FINGERPRINT, MAX_LEN, runner
    if change == "fingerprint":
        fingerprint = "another-model"
    elif change == "max_model_len":
        max_len = MAX_LEN // 2
    elif change == "threads":
        threads = torch.get_num_threads()
        monkeypatch.setattr(cost_profile_cache.torch, "get_num_threads", lambda: threads + 1)
    else:  # a pool too small for the longest point measures fewer points
        other = make_runner(num_blocks=12)
    load_or_profile_cost_model(other, max_len, fingerprint, str(tmp_path))
    assert len(profiles) == 2
    assert len(_files(tmp_path)) == 2  # the first entry stays for the first configuration


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff not json",
        b'{"key": ',  # a torn write
        b"[]",
        b'{"key": {}, "points": [[32, 0.1], [64, 0.2]]}',  # another engine's key
        "POINTS:negative",
        "POINTS:missing",
    ],
)
def test_a_corrupt_file_is_reprofiled_and_overwritten(
    runner: ModelRunner, profiles: list[list[int]], tmp_path: Path, garbage: bytes | str
) -> None:
    key = profile_key(runner, MAX_LEN, FINGERPRINT)
    path = cache_path(tmp_path, key)
    if garbage == "POINTS:negative":
        garbage = json.dumps({"key": key, "points": [[32, -1.0], [64, 0.2]]}).encode()
    elif garbage == "POINTS:missing":
        garbage = json.dumps({"key": key}).encode()
    assert isinstance(garbage, bytes)
    path.write_bytes(garbage)
    model = load_or_profile_cost_model(runner, MAX_LEN, FINGERPRINT, str(tmp_path))
    assert isinstance(model, CostModel)
    assert len(profiles) == 1
    assert _files(tmp_path) == [path]
    assert json.loads(path.read_text())["key"] == key  # overwritten with a good entry
    load_or_profile_cost_model(runner, MAX_LEN, FINGERPRINT, str(tmp_path))
    assert len(profiles) == 1


def test_no_cache_dir_profiles_every_time(
    runner: ModelRunner, profiles: list[list[int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert isinstance(load_or_profile_cost_model(runner, MAX_LEN, FINGERPRINT, None), CostModel)
    assert len(profiles) == 2
    assert _files(tmp_path) == []


def test_an_unwritable_cache_dir_costs_only_the_cache(
    runner: ModelRunner, profiles: list[list[int]], tmp_path: Path
) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache directory should be")
    for _ in range(2):
        model = load_or_profile_cost_model(runner, MAX_LEN, FINGERPRINT, str(blocked))
        assert isinstance(model, CostModel)
    assert len(profiles) == 2
    assert _files(tmp_path) == [blocked]


def test_too_few_points_gives_none(real_profiles: list[list[int]], tmp_path: Path) -> None:
    profiles = real_profiles
    small = make_runner(num_blocks=3)  # 48 tokens: only the first chunk fits
    assert profiled_starts(small, MAX_LEN) == [0]
    assert load_or_profile_cost_model(small, MAX_LEN, FINGERPRINT, str(tmp_path)) is None
    assert load_or_profile_cost_model(small, MAX_LEN, FINGERPRINT, str(tmp_path)) is None
    assert len(profiles) == 1  # the one-point profile is cached too


def test_key_names_the_machine_and_backends(runner: ModelRunner) -> None:
    key = profile_key(runner, MAX_LEN, FINGERPRINT)
    assert key["device"] == "cpu" and key["dtype"] == "torch.float32"
    assert key["block_size"] == 16 and key["threads"] == torch.get_num_threads()
    assert key["linear_backend"] == "auto" and isinstance(key["onednn"], bool)
    assert key["machine"] == machine_id(torch.device("cpu")) and "cores" in key["machine"]
