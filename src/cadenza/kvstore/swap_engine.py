"""The swap engine: moves KV blocks between the device KV tensor, a host RAM tensor and disk.

FastSwitch's lessons: copy in large contiguous groups, not block by block, and keep copies off
the critical path. Jobs run on one background thread in priority order (host→device first);
within a job, runs of consecutive source and destination slots move as one strided slice copy per
group, so a 32-block swap is a handful of large copies. On CUDA the host tensor is pinned and
copies run on their own stream, ordered after the compute that wrote the blocks.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Iterator

import torch

from cadenza.core.transfer import Tier, TransferItem, TransferJob
from cadenza.kvstore.disk_tier import DiskTier


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


class SwapEngine:
    """A ``TransferExecutor`` over real tensors and files."""

    def __init__(
        self, device_kv: torch.Tensor, host_slots: int, disk: DiskTier | None = None
    ) -> None:
        self.device_kv = device_kv  # [layers, 2, blocks, block_size, kv_heads, head_dim]
        self.disk = disk
        self.on_cuda = device_kv.device.type == "cuda"
        shape = list(device_kv.shape)
        shape[2] = max(host_slots, 0)
        self.host_kv = (
            torch.empty(shape, dtype=device_kv.dtype, pin_memory=self.on_cuda)
            if host_slots > 0
            else None
        )
        block_shape = shape[:2] + shape[3:]
        self.block_bytes = device_kv[:, :, 0].numel() * device_kv.element_size()
        self._staging = torch.empty(block_shape, dtype=device_kv.dtype)
        self._stream = torch.cuda.Stream(device=device_kv.device) if self.on_cuda else None
        self._queue: queue.PriorityQueue[tuple[int, int, TransferJob | None]] = (
            queue.PriorityQueue()
        )
        self._seq = itertools.count()
        self._done: list[TransferJob] = []
        self._cond = threading.Condition()
        self._in_flight = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="cadenza-swap", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- executor interface
    def submit(self, job: TransferJob) -> None:
        self._record_ready(job)
        with self._cond:
            self._in_flight += 1
        self._queue.put((job.priority, next(self._seq), job))

    def run_now(self, job: TransferJob) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._in_flight == 0)
        self._record_ready(job)
        self._run(job)

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
            self._closed = True
            self._queue.put((-1, -1, None))
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------------- copies
    def _record_ready(self, job: TransferJob) -> None:
        if self.on_cuda:
            event = torch.cuda.Event()
            event.record()
            job.__dict__["_ready"] = event

    def _loop(self) -> None:
        while True:
            _, _, job = self._queue.get()
            if job is None:
                return
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._in_flight -= 1
                    self._done.append(job)
                    self._cond.notify_all()

    @torch.inference_mode()
    def _run(self, job: TransferJob) -> None:
        start = time.perf_counter()
        try:
            if self._stream is not None:
                ready = job.__dict__.get("_ready")
                if ready is not None:
                    self._stream.wait_event(ready)
                with torch.cuda.stream(self._stream):
                    self._run_items(job)
                self._stream.synchronize()
            else:
                self._run_items(job)
        except Exception as exc:  # a failed copy costs a recompute, never the engine
            job.error = f"{type(exc).__name__}: {exc}"
            for item in job.items:
                item.ok = False
        job.seconds = time.perf_counter() - start

    def _run_items(self, job: TransferJob) -> None:
        # Items run in order, grouped by (source, destination): spills of a host slot come
        # before the copy that overwrites it.
        for (src, dst), group in itertools.groupby(job.items, key=lambda i: (i.src, i.dst)):
            items = list(group)
            if dst == Tier.DISK:
                for item in items:
                    self._write_disk(job, item)
            elif src == Tier.DISK:
                for item in items:
                    self._read_disk(job, item)
            else:
                self._copy_tensor(job, src, dst, items)

    def _tensor(self, tier: Tier) -> torch.Tensor:
        if tier == Tier.DEVICE:
            return self.device_kv
        if self.host_kv is None:
            raise RuntimeError("no host tier configured")
        return self.host_kv

    def _copy_tensor(
        self, job: TransferJob, src: Tier, dst: Tier, items: list[TransferItem]
    ) -> None:
        src_t, dst_t = self._tensor(src), self._tensor(dst)
        pairs = [(i.src_slot, i.dst_slot) for i in items]
        for s, d, n in _runs(pairs):
            dst_t[:, :, d : d + n].copy_(src_t[:, :, s : s + n], non_blocking=self.on_cuda)
        for item in items:
            item.ok = True
        job.bytes_moved += len(items) * self.block_bytes

    def _write_disk(self, job: TransferJob, item: TransferItem) -> None:
        assert self.disk is not None
        block = self._tensor(item.src)[:, :, item.src_slot]
        data = block.to("cpu").contiguous() if self.on_cuda else block.contiguous()
        payload = memoryview(data.view(torch.uint8).numpy()).cast("B")
        item.ok = self.disk.put(item.key, item.parent, item.token_ids, payload)
        job.bytes_moved += self.block_bytes if item.ok else 0

    def _read_disk(self, job: TransferJob, item: TransferItem) -> None:
        assert self.disk is not None
        staging = self._staging
        buf = memoryview(staging.view(torch.uint8).numpy()).cast("B")
        if not self.disk.read_into(item.key, item.parent, item.token_ids, buf):
            return
        self._tensor(item.dst)[:, :, item.dst_slot].copy_(staging)
        item.ok = True
        job.bytes_moved += self.block_bytes
