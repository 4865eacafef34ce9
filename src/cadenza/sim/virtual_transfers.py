"""A ``TransferExecutor`` that completes KV copies at virtual times over modelled links.

Every job goes over one link of its worker, first in first out: fetches over host->device (or
the disk's read bandwidth for blocks that come from disk), ahead-of-time offloads over
device->host, write-through to disk over the disk's write bandwidth. A job takes
``sum(block bytes / bandwidth of its item's path)`` and lands when its link is free and that
time has passed; the engine core applies it at its next poll. Synchronous copies (``run_now``:
swap preemption) hold the worker for their duration, as they hold the real engine's step
thread. No bytes move: only the disk's key set changes.
"""

from __future__ import annotations

import heapq

from cadenza.core.transfer import JobKind, Tier, TransferItem, TransferJob
from cadenza.sim.clock import WorkerClock
from cadenza.sim.hardware import Links
from cadenza.sim.sim_disk import SimDisk


class VirtualTransfers:
    def __init__(
        self, clock: WorkerClock, links: Links, block_bytes: int, disk: SimDisk | None
    ) -> None:
        self.clock = clock
        self.links = links
        self.block_bytes = block_bytes
        self.disk = disk
        self._queue: list[tuple[float, int, TransferJob]] = []
        self._link_free_at: dict[JobKind, float] = {}
        self._seq = 0
        self.bytes_by_kind: dict[str, int] = {kind.value: 0 for kind in JobKind}
        self.sync_copy_s = 0.0

    def duration(self, job: TransferJob) -> float:
        return sum(self.block_bytes / self._bandwidth(item) for item in job.items)

    def _bandwidth(self, item: TransferItem) -> float:
        links = self.links
        if item.dst == Tier.DISK:
            return links.disk_write
        if item.src == Tier.DISK:
            return links.disk_read
        if item.dst == Tier.DEVICE:
            return links.host_to_device
        return links.device_to_host

    def submit(self, job: TransferJob) -> None:
        start = max(self.clock.now, self._link_free_at.get(job.kind, 0.0))
        seconds = self.duration(job)
        done = start + seconds
        self._link_free_at[job.kind] = done
        job.seconds = seconds
        self._seq += 1
        heapq.heappush(self._queue, (done, self._seq, job))

    def run_now(self, job: TransferJob) -> None:
        seconds = self.duration(job)
        job.seconds = seconds
        self.sync_copy_s += seconds
        self.clock.advance(seconds)
        self._complete(job)

    def poll(self) -> list[TransferJob]:
        done = []
        while self._queue and self._queue[0][0] <= self.clock.now:
            job = heapq.heappop(self._queue)[2]
            self._complete(job)
            done.append(job)
        return done

    def wait(self, timeout: float) -> list[TransferJob]:
        """Sleep (virtually) until the next job lands, at most ``timeout``."""
        if self._queue:
            self.clock.sync(min(self._queue[0][0], self.clock.now + timeout))
        return self.poll()

    def pending(self) -> int:
        return len(self._queue)

    def next_done(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def _complete(self, job: TransferJob) -> None:
        for item in job.items:
            if item.dst == Tier.DISK:
                item.ok = self.disk is not None and self.disk.put(item.key)
            elif item.src == Tier.DISK:
                item.ok = self.disk is not None and self.disk.read(item.key)
            else:
                item.ok = True
        job.bytes_moved = self.block_bytes * sum(item.ok for item in job.items)
        self.bytes_by_kind[job.kind.value] += job.bytes_moved
