"""The cluster's own endpoints: list the workers, drain one, take it back, move a request.

With one in-process engine the list has one worker (``w0``, this process) and draining it is
refused: there would be nowhere to move its requests.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request

from cadenza.engine_api import GetLoad
from cadenza.server.errors import APIError
from cadenza.server.state import get_state

router = APIRouter()


def _cluster(request: Request) -> Any:
    engine = get_state(request).engine
    return engine if hasattr(engine, "describe_workers") else None


def _worker_or_404(cluster: Any, worker_id: str) -> None:
    if cluster is None or worker_id not in cluster.slots:
        raise APIError(404, f"worker {worker_id!r} does not exist", param="worker_id")


@router.get("/v1/cluster/workers")
async def list_workers(request: Request) -> dict[str, Any]:
    cluster = _cluster(request)
    if cluster is not None:
        return {"object": "list", "routing": cluster.routing, "data": cluster.describe_workers()}
    engine = get_state(request).engine
    load = await engine.call(GetLoad())
    worker = {
        "id": engine.worker_id,
        "object": "cluster.worker",
        "pid": os.getpid(),
        "state": "alive",
        "failures": 0,
        "load": {
            "running": load.num_running,
            "waiting": load.num_waiting,
            "waiting_tokens": load.num_waiting_tokens,
            "in_flight": engine.num_streams,
        },
        "tiers": {
            "device": {
                "blocks_total": load.device_blocks_total,
                "blocks_used": load.device_blocks_used,
                "blocks_pinned": load.device_blocks_pinned,
            },
            "host": {"blocks_total": load.host_blocks_total, "blocks_used": load.host_blocks_used},
            "disk": {"blocks_used": load.disk_blocks_used},
        },
    }
    return {"object": "list", "routing": "in-process", "data": [worker]}


@router.post("/v1/cluster/workers/{worker_id}/drain")
async def drain_worker(worker_id: str, request: Request) -> dict[str, Any]:
    """Stop placing work on the worker and live-migrate its running requests elsewhere; the
    worker is then ``drained`` (releasable) until activated again."""
    cluster = _cluster(request)
    if cluster is None:
        raise APIError(
            409, "this server runs one in-process worker; there is nowhere to drain it to"
        )
    _worker_or_404(cluster, worker_id)
    try:
        return await cluster.drain(worker_id)
    except ValueError as exc:
        raise APIError(409, str(exc), param="worker_id") from None


@router.post("/v1/cluster/workers/{worker_id}/activate")
async def activate_worker(worker_id: str, request: Request) -> dict[str, Any]:
    """Let a drained worker take work again."""
    cluster = _cluster(request)
    _worker_or_404(cluster, worker_id)
    return cluster.activate(worker_id)


@router.post("/v1/cluster/requests/{request_id}/migrate")
async def migrate_request(
    request_id: str, request: Request, to: str | None = None
) -> dict[str, Any]:
    """Live-migrate a running request (to the given worker, or the least loaded other one)."""
    cluster = _cluster(request)
    if cluster is None:
        raise APIError(409, "this server runs one in-process worker")
    if to is not None:
        _worker_or_404(cluster, to)
    result = await cluster.migrate_request(request_id, to)
    if not result.get("migrated") and result.get("error") == "not running":
        raise APIError(404, f"request {request_id!r} is not running", param="request_id")
    if result.get("refused"):
        raise APIError(409, f"cannot migrate: {result['error']}", param="to")
    return result
