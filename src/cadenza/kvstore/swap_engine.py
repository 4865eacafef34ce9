"""The swap engine: moves KV blocks between the device KV tensor, a host RAM tensor and disk.

FastSwitch's lessons: copy in large contiguous groups, not block by block, and keep copies off
the critical path. Jobs run on one background thread in priority order (host→device first);
within a job, runs of consecutive source and destination slots move as one strided slice copy per
group, so a 32-block swap is a handful of large copies. On CUDA the host tensor is pinned,
copies run on their own stream, ordered after the compute that wrote the blocks, and a run
moves as one contiguous copy per layer's K or V (a copy strided on both sides would be staged
through pageable memory).

On a CPU there is no copy engine: a copy running during a forward pass takes cores and memory
bandwidth from it. So background work (copies out, write-through, hint fetches) runs in slices of
a few MiB and starts a slice only while the engine is not inside a forward pass
(:meth:`SwapEngine.computing`): it fills the gaps between steps and the idle time between
turns, and overlaps a step by at most one slice. A fetch that an admitted turn waits for is
urgent and runs at once, between the slices of any background job.

``run_now`` (swap preemption, eviction that the ahead-of-time copy has not kept up with) runs a
job on the caller's thread, with its own staging buffer and CUDA stream. It waits only for
queued or running jobs that write a device block or host slot it touches, or read one it
writes; a slow write-through to disk of other blocks does not hold it up. Disk files are not
ordered this way: they are content-addressed, and the disk tier handles concurrent access.

Every block copied to host gets an XXH3-64 checksum of its bytes there, kept per host slot; a
fetch to the device or a spill to disk checks it first, and a block that fails (or a slot that
no copy filled) is not installed or written: its item fails, so the block is recomputed, and
``checksum_failures`` counts it. XXH3 runs at memory speed (about 8x zlib's crc32 here), so
checking every host copy costs a fraction of the copy itself.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch
import xxhash

from cadenza.core.transfer import Tier, TransferItem, TransferJob
from cadenza.kvstore.disk_tier import DiskTier
from cadenza.kvstore.openmp_threads import limit_this_thread


def _runs(pairs: list[tuple[int, int]]) -> Iterator[tuple[int, int, int]]:
    """Maximal runs ``(src_start, dst_start, length)`` where both sides advance by one."""
    start = 0
    for i in range(1, len(pairs) + 1):
        if (
            i == len(pairs)
            or pairs[i][0] != pairs[i - 1][0] + 1
            or pairs[i][1] != pairs[i - 1][1] + 1
        ):
            yield pairs[start][0], pairs[start][1], i - start
            start = i


def _places(job: TransferJob) -> tuple[set[tuple[Tier, int]], set[tuple[Tier, int]]]:
    """The device blocks and host slots a job reads and writes (disk files are left out)."""
    reads: set[tuple[Tier, int]] = set()
    writes: set[tuple[Tier, int]] = set()
    for item in job.items:
        if item.src != Tier.DISK:
            reads.add((item.src, item.src_slot))
        if item.dst != Tier.DISK:
            writes.add((item.dst, item.dst_slot))
    return reads, writes


def _conflict(
    a: tuple[set[tuple[Tier, int]], set[tuple[Tier, int]]],
    b: tuple[set[tuple[Tier, int]], set[tuple[Tier, int]]],
) -> bool:
    """Whether two jobs must run in order: one writes what the other reads or writes."""
    return bool(a[1] & (b[0] | b[1]) or b[1] & a[0])


class SwapEngine:
    """A ``TransferExecutor`` over real tensors and files."""

    def __init__(
        self,
        device_kv: torch.Tensor,
        host_slots: int,
        disk: DiskTier | None = None,
        *,
        slice_bytes: int = 8 << 20,
    ) -> None:
        self.device_kv = device_kv  # [layers, 2, blocks, block_size, kv_heads, head_dim]
        self.disk = disk
        self.on_cuda = device_kv.device.type == "cuda"
        shape = list(device_kv.shape)
        shape[2] = max(host_slots, 0)
        self.host_kv = self._host_tensor(shape, device_kv.dtype) if host_slots > 0 else None
        block_shape = shape[:2] + shape[3:]
        self.block_bytes = device_kv[:, :, 0].numel() * device_kv.element_size()
        # Disk reads land here first; ``run_now`` has its own, as it may run beside the thread.
        self._staging = torch.empty(block_shape, dtype=device_kv.dtype)
        self._staging_now = torch.empty(block_shape, dtype=device_kv.dtype)
        self._stream = torch.cuda.Stream(device=device_kv.device) if self.on_cuda else None
        self._stream_now = torch.cuda.Stream(device=device_kv.device) if self.on_cuda else None
        self._run_now_lock = threading.Lock()
        # The host tensor as bytes, [layers * 2, slots, bytes of one block's K or V]: a block's
        # bytes in a slot are layers * 2 contiguous rows, checksummed one after the other.
        self._host_rows: np.ndarray | None = None
        if self.host_kv is not None:
            rows = self.host_kv.view(torch.uint8).view(shape[0] * shape[1], shape[2], -1)
            self._host_rows = rows.numpy()
        # XXH3-64 of each host slot's bytes as an offload wrote them; -1: no valid copy there.
        self._host_crc = [-1] * max(host_slots, 0)
        self.checksum_failures = 0  # host copies that failed verification (never installed)
        # Blocks per background slice; copies on CUDA overlap compute for real and run whole.
        self.slice_blocks = max(1, slice_bytes // max(self.block_bytes, 1))
        self._yield_to_compute = not self.on_cuda
        self._urgent: deque[TransferJob] = deque()
        self._background: list[tuple[int, int, TransferJob]] = []  # heap by priority
        # Submitted jobs not yet finished, with the places they read and write (for run_now).
        self._active: dict[int, tuple[set[tuple[Tier, int]], set[tuple[Tier, int]]]] = {}
        self._seq = itertools.count()
        self._done: list[TransferJob] = []
        self._cond = threading.Condition()
        self._in_flight = 0
        self._computing = False
        self._closed = False
        # Observable waits (tests assert on them instead of sleeping): background slices that
        # found a forward pass running and waited it out; run_now calls that waited for a
        # conflicting job.
        self.deferred_slices = 0
        self.run_now_waits = 0
        self.copy_threads: int | None = None  # the copy thread's OpenMP threads, once started
        self._thread = threading.Thread(target=self._loop, name="cadenza-swap", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- executor interface
    def submit(self, job: TransferJob) -> None:
        self._record_ready(job)
        places = _places(job)
        with self._cond:
            self._in_flight += 1
            self._active[job.job_id] = places
            if job.is_urgent:
                self._urgent.append(job)
            else:
                heapq.heappush(self._background, (job.priority, next(self._seq), job))
            self._cond.notify_all()

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        """Marks a forward pass: background slices do not start inside it."""
        with self._cond:
            self._computing = True
        try:
            yield
        finally:
            with self._cond:
                self._computing = False
                self._cond.notify_all()

    def run_now(self, job: TransferJob) -> None:
        """Run ``job`` on the caller's thread, after the submitted jobs that write a device
        block or host slot it touches or read one it writes (not after unrelated ones)."""
        places = _places(job)

        def clear() -> bool:
            return not any(_conflict(places, other) for other in self._active.values())

        with self._cond:
            if not clear():
                self.run_now_waits += 1
                self._cond.notify_all()
                self._cond.wait_for(clear)
        self._record_ready(job)
        with self._run_now_lock:
            self._run(job, self._stream_now, self._staging_now, background=False)

    def poll(self) -> list[TransferJob]:
        with self._cond:
            done, self._done = self._done, []
        return done

    def wait(self, timeout: float) -> list[TransferJob]:
        with self._cond:
            self._cond.wait_for(lambda: bool(self._done) or self._in_flight == 0, timeout)
            done, self._done = self._done, []
        return done

    def pending(self) -> int:
        with self._cond:
            return self._in_flight

    def close(self) -> None:
        if not self._closed:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------------- copies
    def _record_ready(self, job: TransferJob) -> None:
        if self.on_cuda:
            event = torch.cuda.Event()
            event.record()
            job.__dict__["_ready"] = event

    def _loop(self) -> None:
        # One OpenMP thread for the copies: with torch's default this thread gets its own
        # OpenMP team, whose workers spin on the cores the model runs on. On a 2-core machine
        # that made a 35-token forward over 2,000 cached tokens ~1.5x slower with no copy in
        # flight.
        limit_this_thread(1)
        self.copy_threads = torch.get_num_threads()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._urgent or self._background or self._closed)
                if self._urgent:
                    job = self._urgent.popleft()
                elif self._background:
                    job = heapq.heappop(self._background)[2]
                else:
                    return  # closed and drained
            self._execute(job)

    def _execute(self, job: TransferJob) -> None:
        try:
            self._run(job, self._stream, self._staging, background=not job.is_urgent)
        finally:
            with self._cond:
                self._in_flight -= 1
                self._active.pop(job.job_id, None)
                self._done.append(job)
                self._cond.notify_all()

    def _await_slice(self) -> None:
        """Before a background slice: run urgent jobs first, and wait out a forward pass."""
        if not self._yield_to_compute:
            return
        while True:
            with self._cond:
                if self._computing and not self._urgent and not self._closed:
                    self.deferred_slices += 1
                    self._cond.notify_all()
                self._cond.wait_for(lambda: self._urgent or not self._computing or self._closed)
                urgent = self._urgent.popleft() if self._urgent else None
            if urgent is None:
                return
            self._execute(urgent)

    @torch.inference_mode()
    def _run(
        self,
        job: TransferJob,
        stream: torch.cuda.Stream | None,
        staging: torch.Tensor,
        *,
        background: bool,
    ) -> None:
        start = time.perf_counter()
        try:
            if stream is not None:
                ready = job.__dict__.get("_ready")
                if ready is not None:
                    stream.wait_event(ready)
                with torch.cuda.stream(stream):
                    self._run_items(job, stream, staging, background)
                stream.synchronize()
            else:
                self._run_items(job, None, staging, background)
        except Exception as exc:  # a failed copy costs a recompute, never the engine
            job.error = f"{type(exc).__name__}: {exc}"
            for item in job.items:
                item.ok = False
        job.seconds = time.perf_counter() - start

    def _run_items(
        self,
        job: TransferJob,
        stream: torch.cuda.Stream | None,
        staging: torch.Tensor,
        background: bool,
    ) -> None:
        # Items run in order, grouped by (source, destination): spills of a host slot come
        # before the copy that overwrites it. Background jobs go in slices (see the module doc).
        for (src, dst), group in itertools.groupby(job.items, key=lambda i: (i.src, i.dst)):
            items = list(group)
            for start in range(0, len(items), self.slice_blocks):
                if background:
                    self._await_slice()
                part = items[start : start + self.slice_blocks]
                if dst == Tier.DISK:
                    for item in part:
                        self._write_disk(job, item)
                elif src == Tier.DISK:
                    for item in part:
                        self._read_disk(job, item, staging)
                else:
                    self._copy_tensor(job, src, dst, part, stream)

    def _tensor(self, tier: Tier) -> torch.Tensor:
        if tier == Tier.DEVICE:
            return self.device_kv
        if self.host_kv is None:
            raise RuntimeError("no host tier configured")
        return self.host_kv

    # ------------------------------------------------------------------- host checksums
    def _slot_crc(self, slot: int) -> int:
        """XXH3-64 of the bytes of host slot ``slot``, in the block's (layer, K/V, ...) order."""
        assert self._host_rows is not None
        digest = xxhash.xxh3_64()
        for row in self._host_rows[:, slot]:
            digest.update(row)
        return digest.intdigest()

    def _verify_host(self, slot: int, crc: int | None = None) -> bool:
        """Whether host slot ``slot`` (or bytes read from it with checksum ``crc``) still holds
        what an offload wrote there; counts a failure."""
        expected = self._host_crc[slot]
        ok = expected >= 0 and (self._slot_crc(slot) if crc is None else crc) == expected
        if not ok:
            with self._cond:
                self.checksum_failures += 1
        return ok

    def seal_host_slot(self, slot: int) -> None:
        """Record the checksum of bytes written into an unused host slot outside a copy job
        (a KV import), before the slot is indexed."""
        self._host_crc[slot] = self._slot_crc(slot)

    def verify_host_slot(self, slot: int) -> bool:
        """Check a host slot against its checksum before reading it outside a copy job (e.g. a
        KV export); a failure is counted."""
        return self._verify_host(slot)

    def _host_tensor(self, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        """The host tier's slots, or a ValueError that says how big they were and what to
        lower (the allocator's own message names neither the tier nor the setting)."""
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=self.on_cuda)
        except RuntimeError as e:
            gib = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size() / 2**30
            raise ValueError(
                f"cannot allocate the host KV tier: {shape[2]} blocks, {gib:.1f} GiB, do not fit"
                " this machine's memory; lower the host tier (kv_host_gib, --kv-host-gib, or"
                f" --host-gib for a trace replay) ({str(e).splitlines()[0]})"
            ) from e

    def _copy_tensor(
        self,
        job: TransferJob,
        src: Tier,
        dst: Tier,
        items: list[TransferItem],
        stream: torch.cuda.Stream | None,
    ) -> None:
        src_t, dst_t = self._tensor(src), self._tensor(dst)
        if src == Tier.HOST:
            # A slot whose bytes changed since they were copied out is never installed.
            items = [i for i in items if self._verify_host(i.src_slot)]
        if dst == Tier.HOST:
            for item in items:
                self._host_crc[item.dst_slot] = -1  # until the new bytes are checksummed
        pairs = [(i.src_slot, i.dst_slot) for i in items]
        for s, d, n in _runs(pairs):
            if self.on_cuda:
                # A run is contiguous within each layer's K or V: copy those one by one, each a
                # direct copy into or out of pinned memory. One strided copy with both sides
                # strided is staged by torch through pageable memory.
                for layer in range(dst_t.shape[0]):
                    for kv in range(dst_t.shape[1]):
                        dst_t[layer, kv, d : d + n].copy_(
                            src_t[layer, kv, s : s + n], non_blocking=True
                        )
            else:
                dst_t[:, :, d : d + n].copy_(src_t[:, :, s : s + n])
        if dst == Tier.HOST:
            if stream is not None:
                stream.synchronize()  # the bytes must have landed before they are summed
            for item in items:
                self._host_crc[item.dst_slot] = self._slot_crc(item.dst_slot)
        for item in items:
            item.ok = True
        job.bytes_moved += len(items) * self.block_bytes

    def _write_disk(self, job: TransferJob, item: TransferItem) -> None:
        assert self.disk is not None
        block = self._tensor(item.src)[:, :, item.src_slot]
        data = block.to("cpu").contiguous() if self.on_cuda else block.contiguous()
        payload = memoryview(data.view(torch.uint8).numpy()).cast("B")
        digest = xxhash.xxh3_64_intdigest(payload) if item.src == Tier.HOST else 0
        if item.src == Tier.HOST and not self._verify_host(item.src_slot, digest):
            return  # a spill of bytes that changed in host memory: drop, never persist
        item.ok = self.disk.put(item.key, item.parent, item.token_ids, payload)
        job.bytes_moved += self.block_bytes if item.ok else 0

    def _read_disk(self, job: TransferJob, item: TransferItem, staging: torch.Tensor) -> None:
        assert self.disk is not None
        buf = memoryview(staging.view(torch.uint8).numpy()).cast("B")
        if not self.disk.read_into(item.key, item.parent, item.token_ids, buf):
            return
        self._tensor(item.dst)[:, :, item.dst_slot].copy_(staging)
        item.ok = True
        job.bytes_moved += self.block_bytes
