"""The swap engine on real tensors: grouped copies land, background work waits out forward
passes on a CPU, and a fetch that a turn waits for never waits behind background work."""

from __future__ import annotations

import time

import torch

from cadenza.core.hashing import BlockHash
from cadenza.core.transfer import JobKind, Tier, TransferItem, TransferJob
from cadenza.kvstore.swap_engine import SwapEngine

SHAPE = (2, 2, 16, 4, 1, 8)  # layers, k/v, blocks, block size, kv heads, head dim


def _device_kv() -> torch.Tensor:
    return torch.arange(torch.Size(SHAPE).numel(), dtype=torch.float32).view(SHAPE)


def _item(i: int, src: Tier, src_slot: int, dst: Tier, dst_slot: int) -> TransferItem:
    key = BlockHash(bytes([i]) * 32)
    return TransferItem(key, BlockHash(b"\0" * 32), (i,), 0, src, src_slot, dst, dst_slot)


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
        with swap.computing():
            offload = TransferJob(
                JobKind.OFFLOAD, [_item(i, Tier.DEVICE, i, Tier.HOST, i) for i in range(3)]
            )
            hinted = TransferJob(
                JobKind.FETCH, [_item(9, Tier.HOST, 7, Tier.DEVICE, 12)], owner="hint:s"
            )
            swap.submit(offload)
            swap.submit(hinted)
            time.sleep(0.2)
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
