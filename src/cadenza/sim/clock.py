"""Virtual time: one event queue for the whole simulation, and a clock per simulated worker.

Each worker reads its own clock, which the event loop brings forward to the global time when it
wakes the worker, and which the worker's executor moves on by the modelled duration of a forward
pass (or a synchronous copy). So everything the engine core stamps after a step (finish times,
TTL pins, last-access times) sees the time the step ended, as on a real engine. Events at equal
times run in the order they were scheduled, which makes a run deterministic.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable


class WorkerClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sync(self, t: float) -> None:
        """Catch up with global time ``t`` (a worker's clock never goes back)."""
        if t > self.now:
            self.now = t

    def advance(self, seconds: float) -> None:
        self.now += seconds


class EventQueue:
    """Events in time order; at equal times, in the order they were scheduled: by the time
    they were scheduled at, then by the order of scheduling (the same order, since events are
    scheduled as time goes on, except for a stand-in that says when its original would have
    been scheduled: ``at(..., scheduled_at=)``).

    ``before_event``, if set, is called with an event's time and the time it was scheduled at
    before every event that is not a worker waking to step (``at(..., wake=True)``): the
    simulator brings workers stepping through a stretch of plain decodes up to that point
    there, so that the event sees them as if they had stepped one event at a time."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, float, int, Callable[[], None], bool]] = []
        self._seq = 0
        self.num_events = 0
        self.before_event: Callable[[float, float], None] | None = None

    def at(
        self,
        t: float,
        action: Callable[[], None],
        *,
        wake: bool = False,
        scheduled_at: float | None = None,
    ) -> None:
        """Run ``action`` at virtual time ``t`` (not before the current time)."""
        self._seq += 1
        when = self.now if scheduled_at is None else scheduled_at
        heapq.heappush(self._heap, (max(t, self.now), when, self._seq, action, wake))

    def run(self) -> None:
        heap, pop = self._heap, heapq.heappop
        while heap:
            t, scheduled_at, _, action, wake = pop(heap)
            self.now = t
            self.num_events += 1
            if not wake and self.before_event is not None:
                self.before_event(t, scheduled_at)
            action()

    def __len__(self) -> int:
        return len(self._heap)
