"""The disk tier: round trips, verification, LRU capacity, restart, and concurrent use."""

from __future__ import annotations

import hashlib
import random
import threading
from pathlib import Path

import numpy as np
import pytest

from cadenza.kvstore.bandwidth import measure_disk_gbps, measure_memcpy_gbps
from cadenza.kvstore.disk_tier import DiskTier, header_size

BLOCK = 4  # tokens per block
PAYLOAD = 1000  # bytes per block
FILE = header_size(BLOCK) + PAYLOAD
ROOT = b"\x00" * 32


def block(i: int) -> tuple[bytes, bytes, tuple[int, ...], bytes]:
    """(key, parent, token ids, payload) of a synthetic block; the payload depends on the key."""
    tokens = tuple(range(i * BLOCK, (i + 1) * BLOCK))
    parent = hashlib.sha256(b"parent%d" % i).digest()
    key = hashlib.sha256(parent + np.asarray(tokens, "<i4").tobytes()).digest()
    payload = (key * (PAYLOAD // 32 + 1))[:PAYLOAD]
    return key, parent, tokens, payload


def put(tier: DiskTier, i: int) -> bool:
    key, parent, tokens, payload = block(i)
    return tier.put(key, parent, tokens, payload)


def get(tier: DiskTier, i: int) -> bytearray | None:
    key, parent, tokens, _ = block(i)
    return tier.get(key, parent, tokens)


def file_of(tier: DiskTier, i: int) -> Path:
    h = block(i)[0].hex()
    return tier.path / h[:2] / f"{h}.kv"


def test_round_trip_and_accounting(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path / "kv", 1 << 20)
    assert len(tier) == 0 and tier.used_bytes == 0
    assert put(tier, 0) and put(tier, 1)
    assert get(tier, 0) == block(0)[3]
    assert isinstance(get(tier, 1), bytearray)
    assert block(0)[0] in tier and block(2)[0] not in tier and "x" not in tier
    assert len(tier) == 2 and tier.used_bytes == 2 * FILE
    assert file_of(tier, 0).stat().st_size == FILE
    assert get(tier, 2) is None
    s = tier.stats
    assert (s.num_writes, s.num_reads, s.bytes_written, s.bytes_read) == (2, 2, 2000, 2000)

    ino = file_of(tier, 0).stat().st_ino
    assert put(tier, 0)
    assert tier.stats.num_writes == 2 and file_of(tier, 0).stat().st_ino == ino

    assert tier.discard(block(0)[0]) and not tier.discard(block(0)[0])
    assert not file_of(tier, 0).exists() and len(tier) == 1 and tier.used_bytes == FILE


def test_payload_types_and_validation(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    key, parent, tokens, payload = block(0)
    arr = np.frombuffer(payload, dtype=np.uint8).view(np.float32).reshape(10, 25)
    assert tier.put(key, parent, list(tokens), memoryview(arr))
    assert tier.get(key, parent, np.asarray(tokens)) == payload
    with pytest.raises(ValueError, match="capacity_bytes"):
        DiskTier(tmp_path, 0)
    with pytest.raises(ValueError, match="key"):
        tier.put(b"short", parent, tokens, payload)
    with pytest.raises(ValueError, match="int32"):
        tier.put(key, parent, (1 << 40,), payload)


def test_wrong_parent_or_tokens_is_a_miss(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    key, parent, tokens, _ = block(0)
    put(tier, 0)
    assert tier.get(key, ROOT, tokens) is None
    assert tier.stats.num_mismatch == 1 and key not in tier and not file_of(tier, 0).exists()
    put(tier, 0)
    assert tier.get(key, parent, (9, 9, 9, 9)) is None
    put(tier, 0)
    assert tier.get(key, parent, tokens[:3]) is None  # a different token count
    s = tier.stats
    assert (s.num_mismatch, s.num_corrupt) == (3, 0)
    put(tier, 0)
    assert tier.get(key, parent, tokens) == block(0)[3]


def _damage(path: Path, offset: int, new: bytes | None = None) -> None:
    data = bytearray(path.read_bytes())
    if new is None:
        del data[offset:]
    else:
        data[offset] ^= new[0]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "offset,new",
    [
        (FILE - 10, b"\x01"),  # payload byte
        (FILE - 10, None),  # truncated payload
        (50, None),  # truncated header
        (0, b"\x01"),  # magic
        (50, b"\x01"),  # parent, caught by the header checksum
        (header_size(BLOCK) - 12, b"\x01"),  # payload length
    ],
)
def test_corruption_is_a_miss_and_deletes_the_file(
    tmp_path: Path, offset: int, new: bytes | None
) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    put(tier, 0)
    _damage(file_of(tier, 0), offset, new)
    assert get(tier, 0) is None
    assert tier.stats.num_corrupt == 1 and tier.stats.num_mismatch == 0
    assert not file_of(tier, 0).exists() and len(tier) == 0 and tier.used_bytes == 0
    # Also after a restart, when the index holds the damaged file's size.
    put(tier, 0)
    _damage(file_of(tier, 0), offset, new)
    tier = DiskTier(tmp_path, 1 << 20)
    assert get(tier, 0) is None and tier.stats.num_corrupt == 1


def test_missing_file_is_a_miss(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    put(tier, 0)
    file_of(tier, 0).unlink()
    assert get(tier, 0) is None and len(tier) == 0 and tier.used_bytes == 0


def test_capacity_evicts_least_recently_used(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 3 * FILE)
    for i in range(3):
        assert put(tier, i)
    assert get(tier, 0) is not None  # 1 is now the oldest
    assert put(tier, 3)
    assert get(tier, 1) is None and not file_of(tier, 1).exists()
    assert put(tier, 2)  # a duplicate put refreshes too: 0 is now the oldest
    assert put(tier, 4)
    assert sorted(tier.keys()) == sorted(block(i)[0] for i in (2, 3, 4))
    assert tier.stats.num_evictions == 2 and tier.used_bytes == 3 * FILE

    small = DiskTier(tmp_path / "small", FILE - 1)
    assert not put(small, 0) and len(small) == 0 and small.used_bytes == 0


def test_restart_keeps_blocks_and_lru_order(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    for i in range(4):
        put(tier, i)
    get(tier, 0)
    get(tier, 2)
    order = [block(i)[0] for i in (1, 3, 0, 2)]
    assert tier.keys() == order
    leftover = file_of(tier, 1).with_name("deadbeef.123-0.tmp")
    leftover.write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "ab").mkdir(exist_ok=True)
    (tmp_path / "ab" / "not-a-key.kv").write_bytes(b"ignored")

    again = DiskTier(tmp_path, 1 << 20)
    assert again.keys() == order and again.used_bytes == 4 * FILE
    assert not leftover.exists() and (tmp_path / "notes.txt").exists()
    assert all(get(again, i) == block(i)[3] for i in (1, 3, 0, 2))  # keeps the order

    # Capacity is enforced at the scan, oldest first (order after the gets: 1, 3, 0, 2).
    tight = DiskTier(tmp_path, 2 * FILE)
    assert tight.keys() == [block(i)[0] for i in (0, 2)]
    assert not file_of(tight, 1).exists() and not file_of(tight, 3).exists()
    assert tight.stats.num_evictions == 2


def test_read_into(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    key, parent, tokens, payload = block(0)
    put(tier, 0)
    out = bytearray(PAYLOAD)
    assert tier.read_into(key, parent, tokens, memoryview(out)) and out == payload
    arr = np.zeros(PAYLOAD // 4, dtype=np.float32)  # a typed, non-byte buffer
    assert tier.read_into(key, parent, tokens, memoryview(arr))
    assert arr.tobytes() == payload

    # A buffer of the wrong length misses but keeps the file.
    assert not tier.read_into(key, parent, tokens, memoryview(bytearray(PAYLOAD - 4)))
    assert tier.stats.num_mismatch == 1 and key in tier
    with pytest.raises(ValueError, match="writable"):
        tier.read_into(key, parent, tokens, memoryview(payload))

    _damage(file_of(tier, 0), FILE - 1, b"\x80")
    assert not tier.read_into(key, parent, tokens, memoryview(out))
    assert tier.stats.num_corrupt == 1 and key not in tier
    assert not tier.read_into(key, parent, tokens, memoryview(out))


def test_change_journal_records_membership_in_order(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 2 * FILE)
    put(tier, 0)
    assert tier.drain_changes() == []  # not tracking yet
    tier.track_changes()
    k = [block(i)[0] for i in range(4)]
    assert put(tier, 1)
    assert put(tier, 0)  # already stored: only refreshed, no change
    assert put(tier, 2)  # evicts 1, the least recently used
    assert tier.discard(k[0]) and not tier.discard(k[0])
    assert tier.drain_changes() == [(k[1], True), (k[1], False), (k[2], True), (k[0], False)]
    assert tier.drain_changes() == []
    assert put(tier, 3)
    _damage(file_of(tier, 3), FILE - 1, b"\x80")
    assert get(tier, 3) is None  # corrupt: dropped
    file_of(tier, 2).unlink()
    assert get(tier, 2) is None  # gone behind the tier's back: forgotten
    assert tier.drain_changes() == [(k[3], True), (k[3], False), (k[2], False)]
    assert len(tier) == 0


def test_concurrent_puts_and_reads_with_evictions(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 8 * FILE)
    tier.track_changes()
    n = 300
    errors: list[BaseException] = []
    done = threading.Event()

    def writer(seed: int) -> None:
        try:
            rng = random.Random(seed)
            for _ in range(n):
                put(tier, rng.randrange(n // 3))
        except Exception as e:  # reported by the main thread
            errors.append(e)

    hits = 0

    def reader() -> None:
        nonlocal hits
        rng = random.Random(99)
        out = bytearray(PAYLOAD)
        try:
            while not done.is_set():
                i = rng.randrange(n // 3)
                key, parent, tokens, payload = block(i)
                got = tier.get(key, parent, tokens)
                if got is not None:
                    assert got == payload
                    hits += 1
                if tier.read_into(key, parent, tokens, memoryview(out)):
                    assert out == payload
                    hits += 1
                if rng.random() < 0.05:
                    tier.discard(block(rng.randrange(n // 3))[0])
        except Exception as e:  # reported by the main thread
            errors.append(e)

    writers = [threading.Thread(target=writer, args=(s,)) for s in range(2)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    for t in readers:
        t.join()
    assert not errors, errors
    s = tier.stats
    assert s.num_corrupt == 0 and s.num_mismatch == 0 and s.num_evictions > 0 and hits > 0
    # The index and the directory agree, and nothing was left half-written.
    on_disk = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    stored = tier.keys()
    assert on_disk == sorted(f"{k.hex()}.kv" for k in stored)
    assert tier.used_bytes == len(tier) * FILE <= 8 * FILE
    # The journal, replayed in order, rebuilds exactly what the tier holds.
    rebuilt: set[bytes] = set()
    for key, present in tier.drain_changes():
        if present:
            rebuilt.add(key)
        else:
            rebuilt.discard(key)
    assert rebuilt == set(stored)


def test_bandwidth_probes(tmp_path: Path) -> None:
    assert measure_memcpy_gbps(size_mib=8, repeats=2) > 0
    write, read = measure_disk_gbps(tmp_path, size_mib=8)
    assert write > 0 and read > 0
    assert list(tmp_path.iterdir()) == []
