"""The discrete-event simulator: simulated workers under the real router policies, driven by
a session trace on one virtual clock.

One event queue orders everything (turn arrivals, hints, migrations landing, workers waking to
step). A worker with requests steps back to back: each step is the real ``EngineCore.step``,
whose executor advances that worker's clock by the modelled step time, and the worker wakes
again at the step's end. An idle worker with copies in flight wakes when the next one lands; a
worker with nothing to do sleeps until an event hands it work. Routing decisions see each
worker's state as of its last step. The same trace, settings and seed give the same run.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

from cadenza.core.engine_core import EngineCore
from cadenza.sim.client import TraceClient
from cadenza.sim.clock import EventQueue
from cadenza.sim.metrics import build_metrics
from cadenza.sim.setup import SimConfig, resolve
from cadenza.sim.sim_router import SimRouter
from cadenza.sim.step_cost import recompute_cost_model
from cadenza.sim.trace import TraceTurn
from cadenza.sim.worker import SimWorker

# A worker with requests whose step did nothing and moved no time (every request waits and no
# copy is in flight) tries again this much later, so virtual time always moves.
IDLE_RETRY_S = 1e-3


class Simulation:
    def __init__(self, config: SimConfig, turns: Sequence[TraceTurn]) -> None:
        self.config = config
        self.turns = list(turns)
        resolved = resolve(config)
        self.details = resolved.details
        eviction_cost = recompute_cost_model(resolved.cost, resolved.spec.max_model_len)
        self.events = EventQueue()
        self.workers = [
            SimWorker(f"w{i}", resolved.spec, resolved.cost, eviction_cost)
            for i in range(config.workers)
        ]
        self.router = SimRouter(
            self.workers,
            config.routing,
            resolved.placement_costs,
            resolved.spec.links,
            self.events,
            on_worker_change=self.kick,
        )
        self.client = TraceClient(
            self.turns,
            self.events,
            self.router,
            seed=config.seed,
            vocab_size=resolved.spec.model.vocab_size,
            block_size=resolved.spec.block_size,
            fingerprint=resolved.spec.fingerprint,
            retention_ttl_s=config.retention_ttl_s,
            kick=self.kick,
        )

    @property
    def engine_core_class(self) -> type[EngineCore]:
        return type(self.workers[0].core)

    # ------------------------------------------------------------------ the event loop
    def run(self) -> dict[str, Any]:
        # A run builds millions of long-lived objects (blocks' keys, queued copies, index
        # entries) and next to no reference cycles, so the cyclic collector's passes over the
        # growing heap cost about a fifth of the run and free nothing: it is off during the
        # event loop (reference counting still frees everything else), then back as it was,
        # with what the run made moved to the oldest generation (``freeze`` then
        # ``unfreeze``) so that turning it back on does not start with a pass over all of it.
        enabled = gc.isenabled()
        gc.disable()
        try:
            self.client.start()
            self.events.run()
        finally:
            if enabled:
                if gc.get_freeze_count() == 0:
                    gc.freeze()
                    gc.unfreeze()
                gc.enable()
        return self.metrics()

    def kick(self, worker: SimWorker, *, retry: bool = False) -> None:
        """Make sure ``worker`` wakes when it next has something to do."""
        if worker.core.has_unfinished_requests():
            at = max(worker.clock.now, self.events.now) + (IDLE_RETRY_S if retry else 0.0)
        else:
            done = worker.transfers.next_done()
            if done is None:
                return
            at = max(done, self.events.now)
        if worker.wake_at is not None and worker.wake_at <= at:
            return
        worker.wake_token += 1
        worker.wake_at = at
        token = worker.wake_token
        self.events.at(at, lambda: self._wake(worker, token))

    def _wake(self, worker: SimWorker, token: int) -> None:
        if token != worker.wake_token:
            return  # superseded by an earlier wake-up
        worker.wake_at = None
        worker.clock.sync(self.events.now)
        before = worker.clock.now
        result = worker.core.step()
        now = worker.clock.now
        for request, _ in result.updated:
            self.client.on_token(request, now)
        self.kick(worker, retry=result.is_idle and now == before)

    # ------------------------------------------------------------------ results
    def metrics(self) -> dict[str, Any]:
        router = self.router
        completed = len(self.client.records)
        return build_metrics(
            self.client.records,
            source="simulator",
            config={**self.config.describe(), **self.details},
            migrations=router.migrations,
            placements={**router.placements, **{f"hint:{k}": v for k, v in router.hints.items()}},
            workers={w.worker_id: w.stats() for w in self.workers},
            rejected_turns=len(self.turns) - completed,
        )


def simulate(config: SimConfig, turns: Sequence[TraceTurn]) -> dict[str, Any]:
    return Simulation(config, turns).run()
