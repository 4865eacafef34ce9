"""The disk tier of the KV-cache hierarchy: KV blocks that fall out of RAM, kept as files.

Reading a block back from local disk costs far less than recomputing its prefill, and it
survives a restart. Each block is one file named by its content key (the sha256 chain hash
from ``cadenza.core.hashing``), so a lookup is one ``open`` plus one vectored read, and a
restarted server finds its blocks again by listing the directory.

Layout: ``<path>/<ab>/<64 hex digits of key>.kv``, where ``ab`` is the first two hex digits
(256 shards keep each directory small).

File format, little-endian (``n`` = number of tokens)::

    offset   size         field
    0        6            magic b"CDZKV\\x00"
    6        2            u16 format version (1)
    8        32           key
    40       32           parent key
    72       4            u32 n
    76       4n           n x i32 token ids
    76+4n    8            u64 payload_len
    84+4n    4            u32 zlib.crc32 of the payload
    88+4n    4            u32 zlib.crc32 of every header byte before this field
    92+4n    payload_len  payload

Every read checks all of it: the magic, version, key, header checksum, payload length and
payload checksum (a failure is *corrupt*), and the stored parent and token ids against the
caller's (a failure is a *mismatch*: the key alone should imply them, so a disagreement means
a bug or a stale file, and the tier never hands back KV for a different prefix). Either way the
file is deleted and the lookup is a miss. crc32 runs at several GB/s, well above disk speed.

Writes go to a unique ``*.tmp`` file in the shard directory and are renamed into place, so a
crash leaves either a complete file or a temp file that the next start-up deletes. Eviction is
LRU over an in-memory index; every access also sets the file's mtime (from a clock made strictly
increasing), so the order survives a restart.

Concurrency: ``put``, ``get``, ``read_into``, ``discard`` and ``in`` may run on several threads
(e.g. a background copy thread and the engine thread). One lock guards the index, and also the
rename into place and the unlinks, so the index and the directory agree whenever the lock is
free; payload IO runs outside it. A reader racing an eviction either already has the file open
(POSIX keeps an unlinked file readable, with the right content) or fails to open it: a clean
miss. One process owns a directory: start-up deletes every ``*.tmp`` in it.

Change journal: after ``track_changes()``, every change of membership (a write committed, a
file discarded, evicted by the capacity LRU, or dropped as corrupt or missing) is appended,
under the lock and so in the order it happened, to a list that ``drain_changes()`` hands over.
The tier changes on whichever thread copies blocks, so this is how the engine thread learns
exactly which keys the tier holds (for the KV events a cluster router indexes).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger("cadenza.kv.disk")

KEY_BYTES = 32
MAGIC = b"CDZKV\x00"
VERSION = 1
SUFFIX = ".kv"

_PREFIX = struct.Struct("<6sH32s32sI")  # magic, version, key, parent, num_tokens
_TAIL = struct.Struct("<QI")  # payload_len, payload crc32
_CRC = struct.Struct("<I")  # header crc32
_NUM_TOKENS_AT = 72
_FIXED = _PREFIX.size + _TAIL.size + _CRC.size  # 92 bytes besides the token ids
_MAX_TOKENS = 1 << 24  # bound on a stored token count before trusting it for a read size
_HEX = frozenset("0123456789abcdef")
_VECTOR_IO = hasattr(os, "readv") and hasattr(os, "writev")
_UTIME_FD = os.utime in os.supports_fd
_O_BINARY = getattr(os, "O_BINARY", 0)

# Outcomes of checking a file against a lookup.
_OK, _CORRUPT, _MISMATCH, _WRONG_SIZE = range(4)

Buffer = bytes | bytearray | memoryview


def header_size(num_tokens: int) -> int:
    """Bytes of header in front of the payload of a block with ``num_tokens`` tokens."""
    return _FIXED + 4 * num_tokens


@dataclass
class DiskTierStats:
    bytes_written: int = 0  # payload bytes of committed writes
    bytes_read: int = 0  # payload bytes of successful reads
    write_seconds: float = 0.0
    read_seconds: float = 0.0
    num_writes: int = 0
    num_reads: int = 0  # hits
    num_evictions: int = 0
    num_corrupt: int = 0
    num_mismatch: int = 0
    num_write_errors: int = 0  # puts that failed with an OSError (e.g. disk full)


class DiskTier:
    def __init__(
        self, path: str | os.PathLike[str], capacity_bytes: int, *, fsync: bool = False
    ) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"DiskTier capacity_bytes must be > 0, got {capacity_bytes}")
        self.path = Path(path)
        self.capacity_bytes = int(capacity_bytes)
        self.fsync = fsync
        self._dir = os.fspath(self.path)
        self._lock = threading.Lock()
        # key -> (file size, last access in ns); least recently used first.
        self._index: OrderedDict[bytes, tuple[int, int]] = OrderedDict()
        self._index_bytes = 0
        self._pending: dict[bytes, int] = {}  # keys being written -> reserved bytes
        self._pending_bytes = 0
        self._last_ns = 0
        self._stats = DiskTierStats()
        self._tmp_ids = itertools.count()
        self._shards: set[str] = set()
        # (key, now present) for each change of membership, while tracking; see the module doc.
        self._changes: list[tuple[bytes, bool]] | None = None
        self.path.mkdir(parents=True, exist_ok=True)
        self._scan()

    # ------------------------------------------------------------------ queries

    @property
    def used_bytes(self) -> int:
        """Bytes of committed files plus space reserved by writes in progress."""
        with self._lock:
            return self._index_bytes + self._pending_bytes

    @property
    def stats(self) -> DiskTierStats:
        """A snapshot of the counters."""
        with self._lock:
            return replace(self._stats)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, bytes):
            return False
        with self._lock:
            return key in self._index

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def keys(self) -> list[bytes]:
        """Stored keys, least recently used first."""
        with self._lock:
            return list(self._index)

    def track_changes(self) -> None:
        """Start journaling changes of membership (idempotent); see ``drain_changes``."""
        with self._lock:
            if self._changes is None:
                self._changes = []

    def drain_changes(self) -> list[tuple[bytes, bool]]:
        """``(key, present)`` for every key stored (True) or gone (False) since the last call,
        in the order the changes happened; empty unless ``track_changes`` was called. The
        files present before tracking started are ``keys()`` at that time."""
        with self._lock:
            if not self._changes:
                return []
            out, self._changes = self._changes, []
            return out

    # ------------------------------------------------------------------ writes

    def put(self, key: bytes, parent: bytes, token_ids: Sequence[int], payload: Buffer) -> bool:
        """Store a block; False if it cannot fit (larger than the tier, or an IO error).

        A key already stored is only marked as recently used: the key names the content.
        """
        prefix = _header_prefix(key, parent, token_ids)
        data = _bytes_view(payload)
        size = len(prefix) + _TAIL.size + _CRC.size + data.nbytes
        path = self._file(key)
        with self._lock:
            entry = self._index.get(key)
            if entry is not None:
                now = self._touch_locked(key, entry[0])
            elif key in self._pending:
                return True  # another thread is writing the same content right now
            elif size > self.capacity_bytes or not self._evict_locked(size):
                return False
            else:
                self._pending[key] = size
                self._pending_bytes += size
        if entry is not None:
            _set_mtime(path, now)
            return True

        start = time.perf_counter()
        head = prefix + _TAIL.pack(data.nbytes, zlib.crc32(data))
        head += _CRC.pack(zlib.crc32(head))
        shard = os.path.dirname(path)
        tmp = f"{path[: -len(SUFFIX)]}.{os.getpid()}-{next(self._tmp_ids)}.tmp"
        committed = False
        try:
            if shard not in self._shards:
                os.makedirs(shard, exist_ok=True)
                self._shards.add(shard)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o644)
            try:
                _write_fully(fd, [memoryview(head), data])
                if self.fsync:
                    os.fsync(fd)
                with self._lock:
                    now = self._tick_locked()
                _set_mtime(fd if _UTIME_FD else tmp, now)
            finally:
                os.close(fd)
            with self._lock:
                os.replace(tmp, path)
                committed = True
                del self._pending[key]
                self._pending_bytes -= size
                self._index[key] = (size, now)
                self._index_bytes += size
                self._record_locked(key, True)
                self._stats.num_writes += 1
                self._stats.bytes_written += data.nbytes
                self._stats.write_seconds += time.perf_counter() - start
            if self.fsync:
                _fsync_dir(shard)
            return True
        except OSError:
            with self._lock:
                self._stats.num_write_errors += 1
            return False
        finally:
            if not committed:
                _unlink_quiet(tmp)
                with self._lock:
                    if self._pending.pop(key, None) is not None:
                        self._pending_bytes -= size

    def discard(self, key: bytes) -> bool:
        """Delete a stored block; True if it was there."""
        with self._lock:
            entry = self._index.pop(key, None)
            if entry is None:
                return False
            self._index_bytes -= entry[0]
            self._record_locked(key, False)
            _unlink_quiet(self._file(key))
            return True

    # ------------------------------------------------------------------ reads

    def get(self, key: bytes, parent: bytes, token_ids: Sequence[int]) -> bytearray | None:
        """The payload stored under ``key``, or None on a miss (absent, corrupt, mismatched)."""
        prefix = _header_prefix(key, parent, token_ids)
        with self._lock:
            entry = self._index.get(key)
        if entry is None:
            return None
        payload_len = max(entry[0] - len(prefix) - _TAIL.size - _CRC.size, 0)
        out = bytearray(payload_len)
        ok = self._read(key, prefix, memoryview(out), exact_buffer=False)
        return out if ok else None

    def read_into(
        self, key: bytes, parent: bytes, token_ids: Sequence[int], out: memoryview | bytearray
    ) -> bool:
        """Read the payload straight into ``out`` (any writable C-contiguous buffer).

        ``out`` must be exactly as long as the stored payload; if not, the lookup counts as a
        mismatch and misses, but the file is kept (the caller's buffer, not the file, may be
        wrong). On False the contents of ``out`` are undefined.
        """
        prefix = _header_prefix(key, parent, token_ids)
        view = memoryview(out)
        if view.readonly:
            raise ValueError("read_into needs a writable buffer")
        view = _bytes_view(view)
        with self._lock:
            if key not in self._index:
                return False
        return self._read(key, prefix, view, exact_buffer=True)

    # ------------------------------------------------------------------ internals

    def _file(self, key: bytes) -> str:
        name = key.hex()
        return os.path.join(self._dir, name[:2], name + SUFFIX)

    def _read(self, key: bytes, prefix: bytes, out: memoryview, *, exact_buffer: bool) -> bool:
        path = self._file(key)
        start = time.perf_counter()
        try:
            fd = os.open(path, os.O_RDONLY | _O_BINARY)
        except FileNotFoundError:
            self._forget_if_missing(key, path)
            return False
        except OSError:
            return False
        try:
            header = bytearray(len(prefix) + _TAIL.size + _CRC.size)
            try:
                got = _read_fully(fd, [memoryview(header), out])
                verdict = _check(fd, header, got, prefix, out, exact_buffer)
            except OSError:
                verdict = _CORRUPT
            if verdict == _OK:
                with self._lock:
                    now = self._tick_locked()
                    entry = self._index.get(key)
                    if entry is not None:  # it may have been evicted while we read it
                        self._index[key] = (entry[0], now)
                        self._index.move_to_end(key)
                    self._stats.num_reads += 1
                    self._stats.bytes_read += out.nbytes
                    self._stats.read_seconds += time.perf_counter() - start
                _set_mtime(fd if _UTIME_FD else path, now)
                return True
            if verdict == _WRONG_SIZE:
                with self._lock:
                    self._stats.num_mismatch += 1
                return False
            try:
                identity = _identity(os.fstat(fd))
            except OSError:
                identity = None
        finally:
            os.close(fd)
        log.warning(
            "disk KV block %s failed verification (%s); deleted, it will be recomputed",
            key.hex()[:16],
            "corrupt" if verdict == _CORRUPT else "header does not match its key",
        )
        with self._lock:
            if verdict == _CORRUPT:
                self._stats.num_corrupt += 1
            else:
                self._stats.num_mismatch += 1
            try:
                current = _identity(os.stat(path))
            except OSError:
                current = None
            # Delete only the file we read: a fresh put may have replaced it meanwhile.
            if current is None or current == identity:
                if current is not None:
                    _unlink_quiet(path)
                self._drop_locked(key)
        return False

    def _forget_if_missing(self, key: bytes, path: str) -> None:
        with self._lock:
            if key in self._index and not os.path.exists(path):
                self._drop_locked(key)

    def _drop_locked(self, key: bytes) -> None:
        entry = self._index.pop(key, None)
        if entry is not None:
            self._index_bytes -= entry[0]
            self._record_locked(key, False)

    def _record_locked(self, key: bytes, present: bool) -> None:
        if self._changes is not None:
            self._changes.append((key, present))

    def _tick_locked(self) -> int:
        """Now in ns, strictly after every earlier tick, so mtimes order the accesses."""
        now = max(time.time_ns(), self._last_ns + 1)
        self._last_ns = now
        return now

    def _touch_locked(self, key: bytes, size: int) -> int:
        now = self._tick_locked()
        self._index[key] = (size, now)
        self._index.move_to_end(key)
        return now

    def _evict_locked(self, size: int) -> bool:
        """Evict LRU files until ``size`` more bytes fit; False (evicting nothing) if they
        cannot fit because writes in progress hold the space."""
        if self._pending_bytes + size > self.capacity_bytes:
            return False
        while self._index_bytes + self._pending_bytes + size > self.capacity_bytes:
            victim, (victim_size, _) = self._index.popitem(last=False)
            self._index_bytes -= victim_size
            self._record_locked(victim, False)
            _unlink_quiet(self._file(victim))
            self._stats.num_evictions += 1
        return True

    def _scan(self) -> None:
        found: list[tuple[int, str, int]] = []
        with os.scandir(self._dir) as top:
            for shard in top:
                if shard.name.endswith(".tmp"):
                    _unlink_quiet(shard.path)
                    continue
                if len(shard.name) != 2 or not _is_hex(shard.name):
                    continue
                if not shard.is_dir(follow_symlinks=False):
                    continue
                self._shards.add(shard.path)
                with os.scandir(shard.path) as files:
                    for f in files:
                        name = f.name
                        if name.endswith(".tmp"):
                            _unlink_quiet(f.path)
                            continue
                        stem = name[: -len(SUFFIX)]
                        if (
                            not name.endswith(SUFFIX)
                            or len(stem) != 2 * KEY_BYTES
                            or not _is_hex(stem)
                            or stem[:2] != shard.name
                            or not f.is_file(follow_symlinks=False)
                        ):
                            continue
                        try:
                            st = f.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        found.append((st.st_mtime_ns, stem, st.st_size))
        found.sort()
        with self._lock:
            for mtime_ns, stem, size in found:
                self._index[bytes.fromhex(stem)] = (size, mtime_ns)
                self._index_bytes += size
                self._last_ns = max(self._last_ns, mtime_ns)
            self._evict_locked(0)


def _header_prefix(key: bytes, parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The header bytes up to the token ids, which a stored file must reproduce exactly."""
    for name, value in (("key", key), ("parent", parent)):
        if not isinstance(value, bytes) or len(value) != KEY_BYTES:
            raise ValueError(f"{name} must be {KEY_BYTES} bytes, got {value!r:.80}")
    n = len(token_ids)
    try:
        return _PREFIX.pack(MAGIC, VERSION, key, parent, n) + struct.pack(f"<{n}i", *token_ids)
    except struct.error as e:
        raise ValueError(f"token ids must be int32: {e}") from None


def _check(
    fd: int, header: bytearray, got: int, prefix: bytes, out: memoryview, exact_buffer: bool
) -> int:
    """Classify a file read as header into ``header`` and payload into ``out``."""
    hlen = len(header)
    if got < _PREFIX.size or header[: len(MAGIC)] != MAGIC:
        return _CORRUPT
    if header[_NUM_TOKENS_AT : _PREFIX.size] != prefix[_NUM_TOKENS_AT : _PREFIX.size]:
        return _check_other_length(fd, header, prefix)
    if got < hlen:
        return _CORRUPT
    (header_crc,) = _CRC.unpack_from(header, hlen - _CRC.size)
    if zlib.crc32(memoryview(header)[: hlen - _CRC.size]) != header_crc:
        return _CORRUPT
    if header[: _NUM_TOKENS_AT - KEY_BYTES] != prefix[: _NUM_TOKENS_AT - KEY_BYTES]:
        return _CORRUPT  # version or key
    if header[: len(prefix)] != prefix:
        return _MISMATCH  # parent or token ids
    payload_len, payload_crc = _TAIL.unpack_from(header, len(prefix))
    if payload_len != out.nbytes:
        # For get the buffer was sized from the file, so the file disagrees with itself.
        return _WRONG_SIZE if exact_buffer else _CORRUPT
    if got < hlen + payload_len or zlib.crc32(out) != payload_crc:
        return _CORRUPT
    return _OK


def _check_other_length(fd: int, header: bytearray, prefix: bytes) -> int:
    """The stored token count differs from the lookup's: a mismatch if the stored header is
    itself intact and names the same key, else corruption."""
    (num_tokens,) = struct.unpack_from("<I", header, _NUM_TOKENS_AT)
    if num_tokens > _MAX_TOKENS:
        return _CORRUPT
    size = header_size(num_tokens)
    os.lseek(fd, 0, os.SEEK_SET)
    stored = os.read(fd, size)
    if len(stored) < size:
        return _CORRUPT
    (header_crc,) = _CRC.unpack_from(stored, size - _CRC.size)
    if zlib.crc32(stored[: size - _CRC.size]) != header_crc:
        return _CORRUPT
    if stored[: _NUM_TOKENS_AT - KEY_BYTES] != prefix[: _NUM_TOKENS_AT - KEY_BYTES]:
        return _CORRUPT
    return _MISMATCH


def _bytes_view(buf: Buffer) -> memoryview:
    view = memoryview(buf)
    if not view.c_contiguous:
        raise ValueError("KV payload buffers must be C-contiguous")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _read_fully(fd: int, views: list[memoryview]) -> int:
    """Fill ``views`` in order from ``fd``; the bytes read (fewer only at end of file)."""
    views = [v for v in views if v.nbytes]
    total = 0
    if not _VECTOR_IO:
        f = io.FileIO(fd, closefd=False)
        for v in views:
            while v.nbytes:
                n = f.readinto(v)
                if not n:
                    return total
                total += n
                v = v[n:]
        return total
    while views:
        n = os.readv(fd, views)
        if n == 0:
            break
        total += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if n:
            views[0] = views[0][n:]
    return total


def _write_fully(fd: int, views: list[memoryview]) -> None:
    views = [v for v in views if v.nbytes]
    while views:
        n = os.writev(fd, views) if _VECTOR_IO else os.write(fd, views[0])
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def _set_mtime(target: int | str, ns: int) -> None:
    with contextlib.suppress(OSError):  # evicted meanwhile; the on-disk order is only a hint
        os.utime(target, ns=(ns, ns))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows cannot open directories
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(OSError):  # already gone; nothing else is fixable from here
        os.unlink(path)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _is_hex(s: str) -> bool:
    return all(c in _HEX for c in s)
