"""Content addresses for KV blocks.

A full block's key is ``sha256(parent_key || token ids as little-endian int32)``, and the chain
starts from a seed derived from the model fingerprint and the request's cache salt. The key is
therefore identical across processes and machines (no Python ``hash()`` randomisation), differs
between models and tenants, and names the whole prefix, not just the block.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from hashlib import sha256

BlockHash = bytes

_DOMAIN = b"cadenza-kv-block/v1\x00"


def hash_seed(model_fingerprint: str, cache_salt: str | None) -> BlockHash:
    """The parent key of a sequence's first block."""
    salt = (cache_salt or "").encode()
    return hashlib.sha256(_DOMAIN + model_fingerprint.encode() + b"\x00" + salt).digest()


# Packers by token count (a block's count is almost always the block size): building the
# format string and finding its compiled form on every call cost more than packing.
_PACKERS: dict[int, Callable[..., bytes]] = {}


def _packer(n: int) -> Callable[..., bytes]:
    pack = _PACKERS[n] = struct.Struct(f"<{n}i").pack
    return pack


def hash_block(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    n = len(token_ids)
    pack = _PACKERS.get(n) or _packer(n)
    return sha256(parent + pack(*token_ids)).digest()


def extend_block_hashes(
    hashes: list[BlockHash], token_ids: Sequence[int], block_size: int, seed: BlockHash
) -> None:
    """Append the keys of every full block of ``token_ids`` not yet in ``hashes``."""
    parent = hashes[-1] if hashes else seed
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
