"""A per-machine cache of the eviction cost-model profile, so an engine measures it once.

Cost-aware eviction (Pensieve) ranks cached KV by what recomputing it would cost, and that cost
is measured at engine start by timing one 32-token chunk at a ladder of positions
(:func:`~cadenza.runner.model_runner.profile_chunk_costs`). The result depends only on the
model and on how and where it runs, so it is kept in ``<cache_dir>/cost-profile-<sha>.json``
keyed by everything that changes the timings (:func:`profile_key`): the model fingerprint,
``max_model_len``, block size, dtype, device, torch's thread count, the linear and attention
backends, the torch version and the machine (CPU model and core count, GPU name). A file that
is missing, unreadable, corrupt or written for another key is ignored; the profile is measured
again and the file replaced atomically (temp file + ``os.replace``), so a crash mid-write or two
engines starting at once never leave a torn file. A cache directory that cannot be written
costs the cache, not the start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Final

import torch

from cadenza.core.eviction import CHUNK_TOKENS, CostModel, cost_model_from, profile_points
from cadenza.model.packed_linear import use_onednn
from cadenza.runner.model_runner import ModelRunner, profile_chunk_costs

log = logging.getLogger("cadenza.runner.cost_profile_cache")

FORMAT: Final = 1  # bump when the file layout or the profiling method changes
REPEATS: Final = 2  # timed runs per point (after a warm-up); profile_chunk_costs's default


def cpu_model_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip() in ("model name", "Hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_id(device: torch.device) -> str:
    """What identifies the hardware a profile was measured on."""
    parts = [cpu_model_name(), f"{os.cpu_count() or 0} cores"]
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    return " | ".join(parts)


def profiled_starts(runner: ModelRunner, max_model_len: int) -> list[int]:
    """The chunk starts the profile measures: Pensieve's ladder, cut where a chunk would not fit
    in the context or the KV pool (the cut :func:`profile_chunk_costs` makes too). Part of the
    key, so a profile cut short by a small pool is not reused by an engine with a larger one."""
    starts: list[int] = []
    for start in profile_points(max_model_len):
        end = start + CHUNK_TOKENS
        if end >= max_model_len or -(-end // runner.block_size) > runner.num_blocks:
            break
        starts.append(start)
    return starts


def profile_key(runner: ModelRunner, max_model_len: int, fingerprint: str) -> dict[str, Any]:
    """Everything the measured chunk costs depend on (JSON-serialisable)."""
    config = runner.config
    return {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "max_model_len": max_model_len,
        "block_size": runner.block_size,
        "starts": profiled_starts(runner, max_model_len),
        "repeats": REPEATS,
        "dtype": str(runner.dtype),
        "device": str(runner.device),
        "threads": torch.get_num_threads(),
        "linear_backend": config.linear_backend,
        "onednn": use_onednn(config.linear_backend, runner.device, runner.dtype),
        "attention": type(runner.attention).__name__,
        "torch": torch.__version__,
        "machine": machine_id(runner.device),
    }


def cache_path(cache_dir: str | os.PathLike[str], key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"cost-profile-{digest}.json"


def _valid_points(raw: Any) -> list[tuple[int, float]] | None:
    if not isinstance(raw, list):
        return None
    points: list[tuple[int, float]] = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2):
            return None
        end, seconds = item
        if isinstance(end, bool) or not isinstance(end, int) or end < 0:
            return None
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            return None
        if not (math.isfinite(seconds) and seconds >= 0):
            return None
        points.append((end, float(seconds)))
    return points


def read_points(path: Path, key: dict[str, Any]) -> list[tuple[int, float]] | None:
    """The cached points for ``key``, or None if the file is missing or not a valid entry for
    it (unreadable, not JSON, wrong shape, or a different key under a colliding name)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable cost profile %s: %s", path, e)
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        log.warning("ignoring cost profile %s: not an entry for this engine", path)
        return None
    points = _valid_points(data.get("points"))
    if points is None:
        log.warning("ignoring cost profile %s: malformed points", path)
    return points


def write_points(path: Path, key: dict[str, Any], points: list[tuple[int, float]]) -> None:
    """Write the entry atomically; a failure is logged, not raised (the cache is optional)."""
    body = json.dumps({"key": key, "points": [list(p) for p in points]}, indent=1) + "\n"
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        log.warning("could not cache the cost profile at %s: %s", path, e)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def load_or_profile_cost_model(
    runner: ModelRunner, max_model_len: int, fingerprint: str, cache_dir: str | None
) -> CostModel | None:
    """The recompute-cost model of this engine: read from ``cache_dir`` if an entry for this
    model and machine is there, else measured (and stored, if ``cache_dir`` is set).

    None when fewer than two points fit (tiny contexts or pools): the caller then falls back to
    :meth:`CostModel.linear`, as it does without a profile.
    """
    starts = profiled_starts(runner, max_model_len)
    if cache_dir is None:
        points = profile_chunk_costs(runner, starts, max_model_len, repeats=REPEATS)
    else:
        key = profile_key(runner, max_model_len, fingerprint)
        path = cache_path(cache_dir, key)
        cached = read_points(path, key)
        if cached is not None:
            points = cached
        else:
            points = profile_chunk_costs(runner, starts, max_model_len, repeats=REPEATS)
            write_points(path, key, points)
    return cost_model_from(points) if len(points) >= 2 else None
