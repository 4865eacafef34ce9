"""Reference paged attention in plain PyTorch (the CPU path and the Triton kernel's oracle).

Pensieve's multi-token attention: one call per layer over a ragged batch in which every
sequence has its own query length, its own cached length and its own non-contiguous block
table. Decodes (query length 1) are gathered and run as one padded batch; prefill chunks run
one sequence at a time, with a plain causal kernel when nothing is cached before the chunk.
Everything that depends only on the batch layout (index tensors, masks) is built once per step
by :func:`prepare_torch_attention` and reused by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cadenza.runner.attention_metadata import AttentionMetadata


@dataclass
class PrefillChunk:
    seq: int
    start: int  # first query row in the flat batch
    query_len: int
    context_len: int
    # Additive causal mask (0 / -inf) offset by the cached length, float32; None when nothing
    # is cached before the chunk. Additive rather than boolean: SDPA's CPU kernel converts a
    # boolean mask to this form on every call, and it is the same for every layer.
    mask: torch.Tensor | None
    # First block id when the chunk's blocks are consecutive in the pool, so its history is a
    # plain slice of the cache rather than a gather; None otherwise.
    first_block: int | None = None


@dataclass
class DecodeBatch:
    rows: torch.Tensor  # query rows of the single-token sequences
    block_table: torch.Tensor  # their block tables
    max_len: int
    mask: torch.Tensor | None  # [B, 1, 1, max_len] additive key padding mask; None if all agree


@dataclass
class TorchAttentionPlan:
    prefills: list[PrefillChunk]
    decode: DecodeBatch | None


def prepare_torch_attention(meta: AttentionMetadata) -> TorchAttentionPlan:
    device = meta.block_table.device
    prefills: list[PrefillChunk] = []
    decode_rows: list[int] = []
    decode_seqs: list[int] = []
    start = 0
    for seq, (q_len, ctx_len) in enumerate(
        zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)
    ):
        if q_len == 1:
            decode_rows.append(start)
            decode_seqs.append(seq)
        else:
            mask = first_block = None
            if q_len != ctx_len:
                q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)
                visible = q_pos[:, None] >= torch.arange(ctx_len, device=device)[None, :]
                mask = _additive(visible)
                first_block = _first_of_consecutive(meta.block_table[seq], ctx_len, meta.block_size)
            prefills.append(PrefillChunk(seq, start, q_len, ctx_len, mask, first_block))
        start += q_len
    decode = None
    if decode_rows:
        lens_cpu = [meta.seq_lens_cpu[s] for s in decode_seqs]
        max_len = max(lens_cpu)
        mask = None
        if min(lens_cpu) != max_len:
            lens = torch.tensor(lens_cpu, device=device)
            positions = torch.arange(max_len, device=device)
            mask = _additive((positions[None, :] < lens[:, None])[:, None, None, :])
        decode = DecodeBatch(
            rows=torch.tensor(decode_rows, device=device),
            block_table=meta.block_table.index_select(0, torch.tensor(decode_seqs, device=device)),
            max_len=max_len,
            mask=mask,
        )
    return TorchAttentionPlan(prefills, decode)


def _additive(visible: torch.Tensor) -> torch.Tensor:
    return torch.zeros(visible.shape, device=visible.device).masked_fill_(~visible, float("-inf"))


def _first_of_consecutive(table_row: torch.Tensor, length: int, block_size: int) -> int | None:
    blocks = table_row[: -(-length // block_size)]
    first = int(blocks[0])
    expected = torch.arange(first, first + blocks.numel(), device=blocks.device)
    return first if bool((blocks == expected).all()) else None


def _history(cache: torch.Tensor, chunk: PrefillChunk, table: torch.Tensor) -> torch.Tensor:
    """``[1, kv_heads, context_len, head_dim]`` keys or values of one chunk's sequence."""
    if chunk.first_block is None:
        return gather_kv(cache, table, chunk.context_len)
    num_blocks = -(-chunk.context_len // cache.shape[1])
    rows = cache[chunk.first_block : chunk.first_block + num_blocks].flatten(0, 1)
    return rows[: chunk.context_len].transpose(0, 1).unsqueeze(0)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Contiguous ``[batch, kv_heads, length, head_dim]`` view of paged cache rows."""
    num_blocks_needed = -(-length // cache.shape[1])
    ids = block_table[:, :num_blocks_needed].reshape(-1)
    blocks = cache.index_select(0, ids)  # [B * nb, bs, kvh, d]
    flat = blocks.view(block_table.shape[0], -1, cache.shape[2], cache.shape[3])[:, :length]
    return flat.transpose(1, 2)


def paged_attention_torch(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    new_key: torch.Tensor | None = None,
    new_value: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention for ``query`` ``[T, heads, head_dim]`` against KV already written to the cache.

    ``new_key``/``new_value`` (the step's own K/V, ``[T, kv_heads, head_dim]``) let a chunk with
    no cached history skip the gather from the paged cache.
    """
    plan = meta.plan if isinstance(meta.plan, TorchAttentionPlan) else None
    plan = plan or prepare_torch_attention(meta)
    out = torch.empty_like(query)
    gqa = query.shape[1] != key_cache.shape[2]
    for chunk in plan.prefills:
        rows = slice(chunk.start, chunk.start + chunk.query_len)
        q = query[rows].transpose(0, 1).unsqueeze(0)  # [1, H, q, d]
        if chunk.mask is not None and chunk.mask.dtype != query.dtype:
            chunk.mask = chunk.mask.to(query.dtype)  # once per step: the plan is shared by layers
        if chunk.mask is None and new_key is not None and new_value is not None:
            k = new_key[rows].transpose(0, 1).unsqueeze(0)
            v = new_value[rows].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            table = meta.block_table[chunk.seq : chunk.seq + 1]
            k = _history(key_cache, chunk, table)
            v = _history(value_cache, chunk, table)
            o = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=chunk.mask,
                is_causal=chunk.mask is None,
                scale=scale,
                enable_gqa=gqa,
            )
        out[rows] = o[0].transpose(0, 1)
    if plan.decode is not None:
        _decode_batch(query, key_cache, value_cache, plan.decode, scale, out)
    return out


def _decode_batch(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    decode: DecodeBatch,
    scale: float,
    out: torch.Tensor,
) -> None:
    """All single-token queries of the step as one padded, length-masked attention call."""
    k = gather_kv(key_cache, decode.block_table, decode.max_len)  # [B, kvh, L, d]
    v = gather_kv(value_cache, decode.block_table, decode.max_len)
    batch, num_kv_heads = k.shape[0], k.shape[1]
    # One query token per sequence: the query heads sharing a kv head become that head's
    # "query rows", so grouped-query attention needs no K/V expansion.
    q = query.index_select(0, decode.rows).view(batch, num_kv_heads, -1, query.shape[-1])
    if decode.mask is not None and decode.mask.dtype != q.dtype:
        decode.mask = decode.mask.to(q.dtype)  # once per step: the plan is shared by layers
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=decode.mask, scale=scale)
    out.index_copy_(0, decode.rows, o.reshape(batch, -1, query.shape[-1]))
