"""KV copy jobs between tiers, as plain data.

The tier manager (torch-free) decides what moves where and reserves the destination slots; a
``TransferExecutor`` (the torch swap engine in the real system, a cost model in the simulator)
moves the bytes, usually on a background thread, and hands finished jobs back. Every source a
queued job reads is held (device blocks by a reference, host slots by a busy count) until the job
is applied, so nothing is overwritten under a copy.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Protocol

from cadenza.core.hashing import BlockHash


class Tier(enum.Enum):
    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


class JobKind(enum.Enum):
    FETCH = "fetch"  # host/disk -> device, ahead of a turn (a request or a hint)
    OFFLOAD = "offload"  # device -> host (ahead-of-time copy, swap preemption)
    PERSIST = "persist"  # device/host -> disk (write-through, spill)


# Host -> device first: a waiting turn is blocked on it; copies out are background work.
PRIORITY = {JobKind.FETCH: 0, JobKind.OFFLOAD: 1, JobKind.PERSIST: 2}


@dataclass(slots=True)
class TransferItem:
    key: BlockHash
    parent: BlockHash
    token_ids: tuple[int, ...]
    position: int
    src: Tier
    src_slot: int  # device block id or host slot (-1 for disk: the key names the file)
    dst: Tier
    dst_slot: int
    ok: bool = False


_job_ids = itertools.count()


@dataclass(eq=False)
class TransferJob:
    kind: JobKind
    items: list[TransferItem]
    # Who waits for it: a request id, or "hint:<session id>".
    owner: str | None = None
    pin_until: float = 0.0
    job_id: int = field(default_factory=lambda: next(_job_ids))
    bytes_moved: int = 0
    seconds: float = 0.0
    error: str | None = None

    @property
    def priority(self) -> int:
        return PRIORITY[self.kind]

    @property
    def is_urgent(self) -> bool:
        """A fetch an admitted turn waits for; everything else (hints included) is background."""
        return self.kind == JobKind.FETCH and not (self.owner or "").startswith("hint:")


class TransferExecutor(Protocol):
    """Moves the bytes of transfer jobs."""

    def submit(self, job: TransferJob) -> None: ...

    def run_now(self, job: TransferJob) -> None:
        """Run a job on the caller's thread, after every queued job that reads or writes the
        same slots (used by swap preemption, which must free blocks at once)."""
        ...

    def poll(self) -> list[TransferJob]:
        """Jobs finished since the last poll."""
        ...

    def wait(self, timeout: float) -> list[TransferJob]:
        """Block until a job finishes (or ``timeout``); returns finished jobs."""
        ...

    def pending(self) -> int: ...
