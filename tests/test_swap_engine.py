"""The swap engine on real tensors: grouped copies land, background work waits out forward
passes on a CPU, and a fetch that a turn waits for never waits behind background work."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cadenza.core.hashing import BlockHash
from cadenza.core.transfer import JobKind, Tier, TransferItem, TransferJob
from cadenza.kvstore.disk_tier import DiskTier
from cadenza.kvstore.swap_engine import SwapEngine

SHAPE = (2, 2, 16, 4, 1, 8)  # layers, k/v, blocks, block size, kv heads, head dim


def _device_kv() -> torch.Tensor:
    return torch.arange(torch.Size(SHAPE).numel(), dtype=torch.float32).view(SHAPE)


def _key(i: int) -> BlockHash:
    return BlockHash(bytes([i]) * 32)


def _item(i: int, src: Tier, src_slot: int, dst: Tier, dst_slot: int) -> TransferItem:
    return TransferItem(_key(i), BlockHash(b"\0" * 32), (i,), 0, src, src_slot, dst, dst_slot)


def _wait_done(swap: SwapEngine, job: TransferJob, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    done: list[TransferJob] = []
    while time.monotonic() < deadline:
        done += swap.wait(0.05)
        if job in done:
            return True
    return False


def test_offload_copies_blocks_in_groups() -> None:
    kv = _device_kv()
    swap = SwapEngine(kv, host_slots=8)
    try:
        items = [_item(i, Tier.DEVICE, 3 + i, Tier.HOST, i) for i in range(4)]
        job = TransferJob(JobKind.OFFLOAD, items)
        swap.submit(job)
        assert _wait_done(swap, job)
        assert all(item.ok for item in items)
        assert swap.host_kv is not None
        assert torch.equal(swap.host_kv[:, :, 0:4], kv[:, :, 3:7])
        assert job.bytes_moved == 4 * swap.block_bytes
    finally:
        swap.close()


def test_background_copies_wait_out_a_forward_pass_but_urgent_fetches_do_not() -> None:
    kv = _device_kv()
    swap = SwapEngine(kv, host_slots=8, slice_bytes=1)  # one block per background slice
    try:
        assert swap.host_kv is not None
        swap.host_kv.fill_(-1.0)
        # Host slots 6 and 7 hold blocks (with their checksums) for the fetches below.
        swap.run_now(
            TransferJob(
                JobKind.OFFLOAD,
                [_item(8, Tier.DEVICE, 14, Tier.HOST, 6), _item(9, Tier.DEVICE, 15, Tier.HOST, 7)],
            )
        )
        with swap.computing():
            offload = TransferJob(
                JobKind.OFFLOAD, [_item(i, Tier.DEVICE, i, Tier.HOST, i) for i in range(3)]
            )
            hinted = TransferJob(
                JobKind.FETCH, [_item(9, Tier.HOST, 7, Tier.DEVICE, 12)], owner="hint:s"
            )
            swap.submit(offload)
            swap.submit(hinted)
            assert _until(swap, lambda: swap.deferred_slices >= 1)  # parked behind the pass
            assert not any(item.ok for item in offload.items)  # nothing started mid-pass
            assert not hinted.items[0].ok
            urgent = TransferJob(
                JobKind.FETCH, [_item(8, Tier.HOST, 6, Tier.DEVICE, 10)], owner="req-1"
            )
            swap.submit(urgent)
            assert _wait_done(swap, urgent)  # runs during the pass
            assert torch.equal(kv[:, :, 10], swap.host_kv[:, :, 6])
            assert swap.pending() == 2
        # The pass is over: the background work drains.
        deadline = time.monotonic() + 5
        while swap.pending() and time.monotonic() < deadline:
            swap.wait(0.05)
        assert swap.pending() == 0
        assert all(item.ok for item in offload.items + hinted.items)
        assert torch.equal(swap.host_kv[:, :, 0:3], kv[:, :, 0:3])
    finally:
        swap.close()


def _until(swap: SwapEngine, condition, timeout_s: float = 10.0) -> bool:
    """Wait on the swap engine's condition (notified when it parks) until ``condition``."""
    with swap._cond:
        return swap._cond.wait_for(condition, timeout_s)


def test_close_finishes_queued_work() -> None:
    kv = _device_kv()
    swap = SwapEngine(kv, host_slots=8)
    job = TransferJob(JobKind.OFFLOAD, [_item(1, Tier.DEVICE, 5, Tier.HOST, 2)])
    swap.submit(job)
    swap.close()
    assert job.items[0].ok
    assert swap.host_kv is not None
    assert torch.equal(swap.host_kv[:, :, 2], kv[:, :, 5])


def test_copies_run_on_one_thread_and_later_threads_keep_the_default() -> None:
    import threading

    def in_new_thread() -> int:
        seen: list[int] = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        return seen[0]

    main_threads = torch.get_num_threads()
    new_thread_default = in_new_thread()  # other tests may have changed torch's default
    swap = SwapEngine(_device_kv(), host_slots=8)
    try:
        job = TransferJob(JobKind.OFFLOAD, [_item(0, Tier.DEVICE, 0, Tier.HOST, 0)])
        swap.submit(job)
        assert _wait_done(swap, job)
        # 1 where the OpenMP runtime was found, else whatever new threads start with
        assert swap.copy_threads in (1, new_thread_default)
        assert in_new_thread() == new_thread_default
        assert torch.get_num_threads() == main_threads
    finally:
        swap.close()


# ------------------------------------------------------------- run_now and the copy queue


class _SlowDisk:
    """A disk tier whose writes wait for ``release``, so a persist job can be held mid-way."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.keys: set[bytes] = set()

    def put(self, key: bytes, parent: bytes, token_ids: object, payload: object) -> bool:
        self.entered.set()
        self.release.wait(30)
        self.keys.add(key)
        return True

    def read_into(self, key: bytes, parent: bytes, token_ids: object, out: object) -> bool:
        return False


def _run_now_in_thread(swap: SwapEngine, job: TransferJob) -> threading.Event:
    done = threading.Event()

    def target() -> None:
        swap.run_now(job)
        done.set()

    threading.Thread(target=target, daemon=True).start()
    return done


def test_run_now_does_not_wait_for_a_slow_persist_of_other_blocks() -> None:
    kv = _device_kv()
    disk = _SlowDisk()
    swap = SwapEngine(kv, host_slots=8, disk=disk)  # type: ignore[arg-type]
    try:
        persist = TransferJob(JobKind.PERSIST, [_item(1, Tier.DEVICE, 0, Tier.DISK, -1)])
        swap.submit(persist)
        assert disk.entered.wait(5)  # the swap thread is inside the persist job's write
        offload = TransferJob(JobKind.OFFLOAD, [_item(2, Tier.DEVICE, 5, Tier.HOST, 2)])
        done = _run_now_in_thread(swap, offload)
        assert done.wait(10), "run_now waited for a persist job on unrelated blocks"
        assert not disk.release.is_set() and swap.pending() == 1
        assert offload.items[0].ok
        assert swap.host_kv is not None and torch.equal(swap.host_kv[:, :, 2], kv[:, :, 5])
    finally:
        disk.release.set()
    assert _wait_done(swap, persist)
    assert persist.items[0].ok and disk.keys == {persist.items[0].key}
    swap.close()


def test_run_now_waits_for_a_queued_job_writing_a_slot_it_reads() -> None:
    kv = _device_kv()
    swap = SwapEngine(kv, host_slots=8, slice_bytes=1)
    try:
        with swap.computing():  # holds background work: the offload stays queued
            offload = TransferJob(JobKind.OFFLOAD, [_item(3, Tier.DEVICE, 9, Tier.HOST, 4)])
            swap.submit(offload)
            fetch = TransferJob(JobKind.FETCH, [_item(3, Tier.HOST, 4, Tier.DEVICE, 1)])
            fetch.owner = "preempt"
            done = _run_now_in_thread(swap, fetch)
            assert _until(swap, lambda: swap.run_now_waits == 1)  # it waits for the copy
            assert not done.is_set() and not fetch.items[0].ok  # that fills slot 4
        assert done.wait(10)
        assert offload.items[0].ok and fetch.items[0].ok
        assert torch.equal(kv[:, :, 1], kv[:, :, 9])
    finally:
        swap.close()


# ---------------------------------------------------------------- host-tier checksums


def test_host_round_trip_is_verified_and_passes() -> None:
    kv = _device_kv()
    swap = SwapEngine(kv, host_slots=8)
    try:
        offload = TransferJob(
            JobKind.OFFLOAD, [_item(i, Tier.DEVICE, i, Tier.HOST, i) for i in range(3)]
        )
        swap.run_now(offload)
        fetch = TransferJob(
            JobKind.FETCH,
            [_item(i, Tier.HOST, i, Tier.DEVICE, 10 + i) for i in range(3)],
            owner="r",
        )
        swap.submit(fetch)
        assert _wait_done(swap, fetch)
        assert all(item.ok for item in fetch.items)
        assert torch.equal(kv[:, :, 10:13], kv[:, :, 0:3])
        assert swap.checksum_failures == 0
    finally:
        swap.close()


def test_corrupted_host_slot_fails_its_fetch_and_is_counted() -> None:
    kv = _device_kv()
    swap = SwapEngine(kv, host_slots=8)
    try:
        assert swap.host_kv is not None
        offload = TransferJob(
            JobKind.OFFLOAD, [_item(i, Tier.DEVICE, 4 + i, Tier.HOST, i) for i in range(3)]
        )
        swap.run_now(offload)
        swap.host_kv[1, 0, 1, 2, 0, 3] += 1.0  # one value of slot 1 flips in host RAM
        before = kv[:, :, 10:13].clone()
        fetch = TransferJob(
            JobKind.FETCH,
            [_item(i, Tier.HOST, i, Tier.DEVICE, 10 + i) for i in range(3)],
            owner="r",
        )
        swap.submit(fetch)
        assert _wait_done(swap, fetch)
        assert [item.ok for item in fetch.items] == [True, False, True]
        assert swap.checksum_failures == 1
        assert torch.equal(kv[:, :, 10], kv[:, :, 4]) and torch.equal(kv[:, :, 12], kv[:, :, 6])
        assert torch.equal(kv[:, :, 11], before[:, :, 1])  # the bad copy was not installed
    finally:
        swap.close()


def test_corrupted_host_slot_is_not_spilled_to_disk(tmp_path) -> None:
    kv = _device_kv()
    disk = DiskTier(tmp_path / "kv", 1 << 20)
    swap = SwapEngine(kv, host_slots=2, disk=disk)
    try:
        assert swap.host_kv is not None
        swap.run_now(
            TransferJob(JobKind.OFFLOAD, [_item(i, Tier.DEVICE, i, Tier.HOST, i) for i in range(2)])
        )
        swap.host_kv[0, 1, 0, 0, 0, 0] = -5.0
        # Host full: evicting both entries spills them first, then overwrites the slots.
        job = TransferJob(
            JobKind.OFFLOAD,
            [_item(i, Tier.HOST, i, Tier.DISK, -1) for i in range(2)]
            + [_item(5 + i, Tier.DEVICE, 5 + i, Tier.HOST, i) for i in range(2)],
        )
        swap.run_now(job)
        assert [item.ok for item in job.items] == [False, True, True, True]
        assert swap.checksum_failures == 1
        assert _key(0) not in disk and _key(1) in disk
        fetch = TransferJob(JobKind.FETCH, [_item(5, Tier.HOST, 0, Tier.DEVICE, 12)], owner="r")
        swap.run_now(fetch)  # the slot's new content carries its own checksum
        assert fetch.items[0].ok and torch.equal(kv[:, :, 12], kv[:, :, 5])
    finally:
        swap.close()


def test_unwritten_host_slot_never_reaches_the_device() -> None:
    swap = SwapEngine(_device_kv(), host_slots=4)
    try:
        fetch = TransferJob(JobKind.FETCH, [_item(1, Tier.HOST, 3, Tier.DEVICE, 0)], owner="r")
        swap.run_now(fetch)
        assert not fetch.items[0].ok and swap.checksum_failures == 1
    finally:
        swap.close()


def test_a_host_tier_too_big_for_memory_is_an_error_naming_the_setting():
    with pytest.raises(ValueError, match="cannot allocate the host KV tier.*lower the host tier"):
        SwapEngine(torch.zeros(1, 2, 4, 16, 1, 8), host_slots=10**12)
