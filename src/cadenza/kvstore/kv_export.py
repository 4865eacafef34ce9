"""A session's KV as a self-describing, checksummed blob that another engine can import.

Layout-independent of any pool: blocks are listed in sequence order with their content key,
parent key, token ids and position; the K and V bytes are cut into *chunks* of one layer and up
to ``GROUP_BLOCKS`` consecutive blocks, raw in the model's dtype (no upcast), each with its own
checksum. An importer verifies every chunk and the key chain; a mismatching chunk is rejected
and counted, never installed, and only the blocks before the first rejected one are used (a
prefix cache cannot use a block whose predecessor is missing), so the turn recomputes the rest.

``to_bytes`` / ``from_bytes`` give a plain binary form (a file, a pipe, Ray's object store):
magic, a JSON header, then the chunk payloads. No pickle: an import may come from elsewhere.
This module is torch-free; ``runner/kv_io.py`` reads and writes the tensors.

Checksums are XXH3-128 (as the host tier's): they catch corruption in transit or at rest, not
tampering, and at tens of GB/s they cost a move next to nothing (BLAKE2b, the first format,
hashed at ~1 GB/s on the engine threads of both workers).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import xxhash

GROUP_BLOCKS = 16
_MAGIC = b"CADENZA-KV2\n"


def chunk_checksum(layer: int, group: int, k: bytes, v: bytes) -> bytes:
    h = xxhash.xxh3_128()
    h.update(struct.pack("<II", layer, group))
    h.update(k)
    h.update(v)
    return h.digest()


@dataclass(frozen=True)
class ExportedBlock:
    key: bytes
    parent: bytes
    token_ids: tuple[int, ...]
    position: int


@dataclass(frozen=True)
class LayerChunk:
    """K and V of blocks ``[group * GROUP_BLOCKS, ...)`` in one layer, raw dtype bytes."""

    layer: int
    group: int
    k: bytes
    v: bytes
    checksum: bytes

    def verify(self) -> bool:
        return chunk_checksum(self.layer, self.group, self.k, self.v) == self.checksum


@dataclass(frozen=True)
class KVLayout:
    """What an importer must match: the model, the cache salt and the tensor geometry."""

    fingerprint: str
    cache_salt: str | None
    block_size: int
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def block_layer_bytes(self) -> int:
        """Bytes of K (or V) of one block in one layer."""
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]
        return self.block_size * self.num_kv_heads * self.head_dim * itemsize


@dataclass(frozen=True)
class KVExport:
    session_id: str
    layout: KVLayout
    blocks: tuple[ExportedBlock, ...]
    chunks: tuple[LayerChunk, ...]

    @property
    def num_groups(self) -> int:
        return -(-len(self.blocks) // GROUP_BLOCKS)

    @property
    def num_tokens(self) -> int:
        return sum(len(b.token_ids) for b in self.blocks)

    @property
    def nbytes(self) -> int:
        return sum(len(c.k) + len(c.v) for c in self.chunks)

    def layer_chunks(self, layer: int) -> list[LayerChunk]:
        return [c for c in self.chunks if c.layer == layer]

    # ------------------------------------------------------------------ binary form
    def to_bytes(self) -> bytes:
        header = {
            "session_id": self.session_id,
            "layout": self.layout.__dict__,
            "blocks": [
                [b.key.hex(), b.parent.hex(), list(b.token_ids), b.position] for b in self.blocks
            ],
            "chunks": [
                [c.layer, c.group, len(c.k), len(c.v), c.checksum.hex()] for c in self.chunks
            ],
        }
        head = json.dumps(header, separators=(",", ":")).encode()
        parts = [_MAGIC, struct.pack("<Q", len(head)), head]
        for c in self.chunks:
            parts += [c.k, c.v]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> KVExport:
        view = memoryview(data)
        magic = bytes(view[: len(_MAGIC)])
        if magic != _MAGIC:
            if magic.startswith(b"CADENZA-KV"):
                found = magic.strip().decode(errors="replace")
                raise ValueError(
                    f"a Cadenza KV export of another format ({found}, this engine reads"
                    f" {_MAGIC.strip().decode()}): export it again here"
                )
            raise ValueError("not a Cadenza KV export (bad magic)")
        at = len(_MAGIC)
        (head_len,) = struct.unpack_from("<Q", view, at)
        at += 8
        try:
            header = json.loads(bytes(view[at : at + head_len]))
            at += head_len
            layout = KVLayout(**header["layout"])
            blocks = tuple(
                ExportedBlock(bytes.fromhex(k), bytes.fromhex(p), tuple(int(t) for t in toks), pos)
                for k, p, toks, pos in header["blocks"]
            )
            chunks = []
            for layer, group, nk, nv, checksum in header["chunks"]:
                k = bytes(view[at : at + nk])
                v = bytes(view[at + nk : at + nk + nv])
                if len(k) != nk or len(v) != nv:
                    raise ValueError("truncated")
                at += nk + nv
                chunks.append(LayerChunk(layer, group, k, v, bytes.fromhex(checksum)))
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed KV export: {exc}") from None
        return cls(header["session_id"], layout, blocks, tuple(chunks))
