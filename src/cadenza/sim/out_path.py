"""Checking a result file's path before a run, not after it.

A simulation or a replay can take minutes; a ``--out`` that names a directory, or sits under a
file, or in a directory nobody may write, should fail before any of it runs, with the flag.
"""

from __future__ import annotations

import os
from pathlib import Path


def out_file_problem(path: str | os.PathLike[str], flag: str = "--out") -> str | None:
    """Why a file cannot be written at ``path`` (the missing directories above it are made
    when it is written), or None."""
    target = Path(path)
    if target.is_dir():
        return f"{flag} {target} is a directory; name a file"
    if target.exists() and not os.access(target, os.W_OK):
        return f"{flag} {target}: not writable"
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{flag} {target}: {parent} is a file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{flag} {target}: cannot write in {parent}"
    return None
