"""Reading blocks out of, and writing them into, the KV tensors as raw dtype bytes.

The engine's KV tensor is ``[layers, 2, blocks, block_size, kv_heads, head_dim]``; the host tier
has the same layout with host slots for blocks, and a disk block file holds one block as
``[layers, 2, block_size, kv_heads, head_dim]``. An export gathers a session's blocks from
wherever they live into one CPU tensor and cuts it into per-layer chunks
(``kvstore/kv_export.py``); an import writes each verified chunk into its device blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from cadenza.kvstore.kv_export import GROUP_BLOCKS, LayerChunk, chunk_checksum

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def gather_blocks(
    device_kv: torch.Tensor,
    sources: Sequence[tuple[str, int]],
    host_kv: torch.Tensor | None,
    read_disk: Callable[[int], torch.Tensor | None],
) -> torch.Tensor:
    """A CPU tensor ``[layers, 2, n, block_size, kv_heads, head_dim]`` of the blocks named by
    ``(tier, slot)`` pairs (``"device"`` block id, ``"host"`` slot, or ``"disk"`` with the
    block's index, read by ``read_disk``)."""
    shape = list(device_kv.shape)
    shape[2] = len(sources)
    out = torch.empty(shape, dtype=device_kv.dtype)
    # One index_select per tier rather than a copy per block: a block's bytes are spread over
    # every layer and side, so per-block copies run at a fraction of memory bandwidth.
    for tier, cache in (("device", device_kv), ("host", host_kv)):
        picked = [(i, slot) for i, (t, slot) in enumerate(sources) if t == tier]
        if not picked:
            continue
        assert cache is not None
        rows = torch.tensor([i for i, _ in picked], dtype=torch.long)
        slots = torch.tensor([s for _, s in picked], dtype=torch.long, device=cache.device)
        values = cache.index_select(2, slots).to("cpu")
        if len(picked) == len(sources):
            return values
        out.index_copy_(2, rows, values)
    for i, (tier, slot) in enumerate(sources):
        if tier in ("device", "host"):
            continue
        block = read_disk(slot)
        if block is None:
            raise LookupError(f"block {i} vanished from the disk tier during the export")
        out[:, :, i].copy_(block)
    return out


def cut_chunks(blocks: torch.Tensor) -> list[LayerChunk]:
    """Per layer, per group of up to ``GROUP_BLOCKS`` blocks: K and V bytes with a checksum."""
    chunks = []
    num_blocks = blocks.shape[2]
    for layer in range(blocks.shape[0]):
        for group, start in enumerate(range(0, num_blocks, GROUP_BLOCKS)):
            k = _raw(blocks[layer, 0, start : start + GROUP_BLOCKS])
            v = _raw(blocks[layer, 1, start : start + GROUP_BLOCKS])
            chunks.append(LayerChunk(layer, group, k, v, chunk_checksum(layer, group, k, v)))
    return chunks


def write_chunk(
    device_kv: torch.Tensor, chunk: LayerChunk, targets: Sequence[tuple[int, int]]
) -> None:
    """Write a verified chunk's blocks into device blocks: ``(index in chunk, block id)``."""
    if not targets:
        return
    row = device_kv[0, 0, 0]
    per_block = row.numel() * row.element_size()
    rows = torch.tensor([i for i, _ in targets], dtype=torch.long)
    index = torch.tensor([b for _, b in targets], dtype=torch.long, device=device_kv.device)
    for side, data in ((0, chunk.k), (1, chunk.v)):
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        values = raw.view(device_kv.dtype).view(len(data) // per_block, *row.shape)
        picked = values.index_select(0, rows).to(device_kv.device)
        device_kv[chunk.layer, side].index_copy_(0, index, picked)
