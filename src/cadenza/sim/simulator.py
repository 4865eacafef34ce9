"""The discrete-event simulator: simulated workers under the real router policies, driven by
a session trace on one virtual clock.

One event queue orders everything (turn arrivals, hints, migrations landing, workers waking to
step). A worker with requests steps back to back: each step is the real ``EngineCore.step``,
whose executor advances that worker's clock by the modelled step time, and the worker wakes
again at the step's end. An idle worker with copies in flight wakes when the next one lands; a
worker with nothing to do sleeps until an event hands it work. Routing decisions see each
worker's state as of its last step. The same trace, settings and seed give the same run.

Most steps of a long run are plain decodes (``Scheduler.plain_decode_steps``): the same
requests each compute one token in a slot they hold, and none can finish. A worker entering
such a stretch prices its steps ahead (they depend on nothing outside the worker), wakes once
at its end, and takes them then, each one a real ``EngineCore.step``. Any other event first
brings every worker through the planned steps that start before it (``_catch_up``), and one
that hands a worker work (``kick``) drops the rest of its plan: each event sees every worker
exactly as stepping one event at a time would leave it, and the run is the same, with far
fewer events (``batch_decodes=False`` steps one event at a time; a test compares the two).

When something outside a step (a migration's install or a hint's fetch that evicts with a
synchronous copy) moves a busy worker's clock past its pending wake-up, ``kick`` moves the
wake-up to when the worker is free, keeping its place among equal times, as dropping a planned
stretch does: the worker's next step then sees everything that landed by its start, as a real
worker's would, and both modes agree.
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
from cadenza.sim.step_cost import decode_shape, recompute_cost_model
from cadenza.sim.trace import TraceTurn
from cadenza.sim.worker import SimWorker

# A worker with requests whose step did nothing and moved no time (every request waits and no
# copy is in flight) tries again this much later, so virtual time always moves.
IDLE_RETRY_S = 1e-3

# A stretch of plain decodes shorter than this is stepped one event at a time.
MIN_PLANNED_STEPS = 2


class Simulation:
    def __init__(
        self, config: SimConfig, turns: Sequence[TraceTurn], *, batch_decodes: bool = True
    ) -> None:
        self.config = config
        self.turns = list(turns)
        resolved = resolve(config)
        self.details = resolved.details
        eviction_cost = recompute_cost_model(resolved.cost, resolved.spec.max_model_len)
        self.events = EventQueue()
        self.batch_decodes = batch_decodes
        if batch_decodes:
            self.events.before_event = self._catch_up
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
        scheduled_at = None
        if worker.planned:
            # Work arrived (or KV landed) in a planned stretch: its remaining steps may no
            # longer be plain decodes. It steps again from where ``_catch_up`` left it, woken
            # as one event at a time would have scheduled that step.
            worker.planned.clear()
            worker.wake_at = None
            scheduled_at = worker.planned_scheduled_at
        busy = worker.core.has_unfinished_requests()
        if busy:
            at = max(worker.clock.now, self.events.now) + (IDLE_RETRY_S if retry else 0.0)
        else:
            done = worker.transfers.next_done()
            if done is None:
                return
            at = max(done, self.events.now)
        if worker.wake_at is not None and worker.wake_at <= at:
            if worker.wake_at >= worker.clock.now or not busy:
                return
            # Something outside a step (an install or a hint's fetch that evicted with a
            # synchronous copy) moved the busy worker's clock past its pending wake-up. That
            # wake-up would start a step at the later clock and miss what landed in between;
            # wake it when it is free instead, in the wake-up's place among equal times.
            scheduled_at = worker.wake_scheduled_at
        self._wake_at(worker, at, scheduled_at if at == worker.clock.now else None)

    def _wake_at(self, worker: SimWorker, at: float, scheduled_at: float | None = None) -> None:
        worker.wake_token += 1
        worker.wake_at = at
        worker.wake_scheduled_at = self.events.now if scheduled_at is None else scheduled_at
        token = worker.wake_token
        self.events.at(at, lambda: self._wake(worker, token), wake=True, scheduled_at=scheduled_at)

    def _wake(self, worker: SimWorker, token: int) -> None:
        if token != worker.wake_token:
            return  # superseded by an earlier wake-up
        worker.wake_at = None
        if worker.planned:
            self._step_planned(worker, None)
        worker.clock.sync(self.events.now)
        before = worker.clock.now
        result = worker.core.step()
        now = worker.clock.now
        for request, _ in result.updated:
            self.client.on_token(request, now)
        if self.batch_decodes and self._plan(worker):
            return
        self.kick(worker, retry=result.is_idle and now == before)

    # ------------------------------------------------------------------ planned decodes
    def _plan(self, worker: SimWorker) -> bool:
        """If the worker's next steps are plain decodes, price them, remember when each
        starts, and wake it at the end of the last; returns whether it did.

        One event at a time, each step's wake-up would be scheduled at the start of the step
        before it (the first one's now). That decides its place among other events at the
        same time, so it is kept: ``_catch_up`` compares it, and the wake-up at the end
        stands in for the one the last planned step would have scheduled."""
        sched = worker.core.scheduler
        steps = sched.plain_decode_steps()
        if steps < MIN_PLANNED_STEPS:
            return False
        running = sched.running
        seqs = len(running)
        context = sum(len(r.all_token_ids) for r in running)
        price = worker.executor.cost.step_seconds
        t = worker.clock.now
        starts = worker.planned
        for _ in range(steps):
            starts.append(t)
            t += price(decode_shape(seqs, context))
            context += seqs
        last = starts[-1]
        starts.reverse()  # taken from the end
        worker.planned_scheduled_at = self.events.now
        self._wake_at(worker, t, scheduled_at=last)
        return True

    def _step_planned(
        self, worker: SimWorker, until: float | None, scheduled_at: float = 0.0
    ) -> None:
        """Take the worker's planned steps that would have run before an event at ``until``
        scheduled at ``scheduled_at`` (all of them: None)."""
        starts, clock, core = worker.planned, worker.clock, worker.core
        on_token = self.client.on_token
        while starts and (
            until is None or (starts[-1], worker.planned_scheduled_at) < (until, scheduled_at)
        ):
            start = starts.pop()
            if clock.now != start:
                raise RuntimeError(f"{worker.worker_id}: a planned decode step was mispriced")
            worker.planned_scheduled_at = start  # when the next one's wake-up would be
            result = core.step()
            now = clock.now
            for request, _ in result.updated:
                on_token(request, now)

    def _catch_up(self, t: float, scheduled_at: float) -> None:
        """Before an event at ``t`` (scheduled at ``scheduled_at``) that is not a worker's own
        step: every worker takes the planned steps that would have run before it one event at
        a time."""
        for worker in self.workers:
            if worker.planned and worker.planned[-1] <= t:
                self._step_planned(worker, t, scheduled_at)

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
