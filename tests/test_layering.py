"""Layering rules that keep the engine core drivable by a router and a simulator: the server,
the session layer and the engine API never import torch, and nothing in ``core/`` reads the
wall clock (every time-reading object gets an injected clock)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "cadenza"

TORCH_FREE = [
    "cadenza.engine_api",
    "cadenza.core.engine_core",
    "cadenza.core.kv_import",
    "cadenza.core.kv_events",
    "cadenza.session.layer",
    "cadenza.session.store",
    "cadenza.server.app",
    "cadenza.server.async_engine",
    "cadenza.server.engine_stream",
    "cadenza.server.metrics",
    "cadenza.server.routes_openai",
    "cadenza.server.routes_responses",
    "cadenza.server.routes_sessions",
    "cadenza.server.routes_conversations",
    "cadenza.server.serve",
    "cadenza.server.state",
    "cadenza.kvstore.kv_export",
    "cadenza.cluster.kv_index",
    "cadenza.cluster.placement",
    "cadenza.cluster.mell",
    "cadenza.cluster.router",
    "cadenza.cluster.migrations",
    "cadenza.cluster.worker_handle",
    "cadenza.cluster.worker_loop",
    "cadenza.server.routes_cluster",
    "cadenza.server.cluster_metrics",
    "cadenza.sim.trace",
    "cadenza.sim.converters.sharegpt",
    "cadenza.sim.converters.mooncake",
    "cadenza.sim.converters.azure",
    "cadenza.sim.converters.agents",
]


def test_server_session_api_and_cluster_policy_modules_do_not_import_torch_or_ray():
    code = (
        "import importlib, sys\n"
        f"for name in {TORCH_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "    assert 'torch' not in sys.modules, f'{name} imported torch'\n"
        "    assert 'ray' not in sys.modules, f'{name} imported ray'\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


WALL_CLOCK = re.compile(
    r"\btime\.(time|monotonic|perf_counter|process_time)(_ns)?\b|datetime\.now\(|\bimport time\b"
)


def test_no_wall_clock_in_the_core():
    offenders = []
    for path in sorted((SRC / "core").glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if WALL_CLOCK.search(line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


RAY_IMPORT = re.compile(r"^\s*(import ray\b|from ray\b)", re.MULTILINE)


def test_only_the_ray_backend_imports_ray():
    importers = sorted(
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if RAY_IMPORT.search(path.read_text())
    )
    assert importers == ["cluster/ray_backend.py"], importers
