"""Probes of this machine's memory-copy and disk bandwidth.

Tiering decisions (keep a block in RAM, spill it to disk, or recompute it) depend on how fast
bytes move here, which varies by orders of magnitude between machines; these probes measure it
rather than assume it. GB/s means 1e9 bytes per second.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

_MIB = 1 << 20


def measure_memcpy_gbps(size_mib: int = 256, repeats: int = 5) -> float:
    """Host memory copy bandwidth: best of ``repeats`` ``np.copyto`` of ``size_mib`` MiB.

    Counts the bytes copied once (not read plus write). The destination is touched by a warm-up
    copy first, so page faults are not timed.
    """
    if size_mib <= 0 or repeats <= 0:
        raise ValueError("size_mib and repeats must be > 0")
    n = size_mib * _MIB // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return src.nbytes / 1e9 / max(best, 1e-9)


def measure_disk_gbps(
    directory: str | os.PathLike[str], size_mib: int = 256, block_mib: int = 1
) -> tuple[float, float]:
    """Sequential (write, read) bandwidth of a temp file in ``directory``.

    The write is timed up to and including ``fsync``. Before the read the file's pages are
    dropped with ``posix_fadvise(POSIX_FADV_DONTNEED)`` where available; that is only advice:
    some filesystems (tmpfs, some overlay or network mounts) ignore it, and without root the
    system-wide cache cannot be dropped otherwise, so the read figure may still be served from
    the page cache and overstate the device. The file is deleted afterwards.
    """
    if size_mib <= 0 or block_mib <= 0:
        raise ValueError("size_mib and block_mib must be > 0")
    block = memoryview(bytearray(os.urandom(block_mib * _MIB)))
    total = size_mib * _MIB
    fd, path = tempfile.mkstemp(prefix="cadenza-bw-", suffix=".tmp", dir=os.fspath(directory))
    try:
        start = time.perf_counter()
        written = 0
        while written < total:
            chunk = block[: min(block.nbytes, total - written)]
            while chunk.nbytes:
                n = os.write(fd, chunk)
                chunk = chunk[n:]
                written += n
        os.fsync(fd)
        write_s = time.perf_counter() - start
        os.close(fd)
        fd = -1

        with open(path, "rb", buffering=0) as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            read = 0
            while n := f.readinto(block):
                read += n
            read_s = time.perf_counter() - start
        if read != total:
            raise OSError(f"read back {read} of {total} bytes from {path}")
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(path)
    return total / 1e9 / max(write_s, 1e-9), total / 1e9 / max(read_s, 1e-9)
