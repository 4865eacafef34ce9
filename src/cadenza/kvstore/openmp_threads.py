"""Limit the OpenMP threads of the calling thread only.

A background thread that calls large torch ops (the swap engine's copies) gets its own OpenMP
team, whose workers spin on the cores the model's forward passes use. ``torch.set_num_threads``
cannot fix that from the background thread: besides the calling thread's setting it changes a
process-wide default that every thread created later starts from, so the server's engine thread
would come up with one thread. ``omp_set_num_threads`` called directly changes only the calling
thread's setting.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

_OPENMP_LIBRARIES = ("libgomp", "libiomp", "libomp")


def _loaded_openmp_library() -> str | None:
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    for line in maps.read_text().splitlines():
        path = line.split()[-1]
        if any(Path(path).name.startswith(name) for name in _OPENMP_LIBRARIES):
            return path
    return None


def limit_this_thread(num_threads: int) -> bool:
    """Run this thread's torch ops on at most ``num_threads`` OpenMP threads.

    Returns False (and changes nothing) where the OpenMP runtime torch uses cannot be found.
    """
    torch.get_num_threads()  # torch sets a new thread's OpenMP threads on first use; do it now
    path = _loaded_openmp_library()
    if path is None:
        return False
    try:
        ctypes.CDLL(path).omp_set_num_threads(ctypes.c_int(num_threads))
    except (OSError, AttributeError):
        return False
    return torch.get_num_threads() == num_threads
