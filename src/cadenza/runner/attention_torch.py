"""Reference paged attention in plain PyTorch (the CPU path and the Triton kernel's oracle).

Pensieve's multi-token attention: one call per layer over a ragged batch in which every
sequence has its own query length, its own cached length and its own non-contiguous block
table. Decodes (query length 1) are gathered and run as one padded batch; prefill chunks run
one sequence at a time, with a plain causal kernel when nothing is cached before the chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cadenza.runner.attention_metadata import AttentionMetadata


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
    out = torch.empty_like(query)
    gqa = query.shape[1] != key_cache.shape[2]
    decode_rows: list[int] = []
    decode_seqs: list[int] = []
    start = 0
    for s, (q_len, ctx_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
        if q_len == 1:
            decode_rows.append(start)
            decode_seqs.append(s)
            start += q_len
            continue
        q = query[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, H, q, d]
        if q_len == ctx_len and new_key is not None and new_value is not None:
            k = new_key[start : start + q_len].transpose(0, 1).unsqueeze(0)
            v = new_value[start : start + q_len].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            k = gather_kv(key_cache, meta.block_table[s : s + 1], ctx_len)
            v = gather_kv(value_cache, meta.block_table[s : s + 1], ctx_len)
            q_pos = torch.arange(ctx_len - q_len, ctx_len, device=query.device)
            mask = q_pos[:, None] >= torch.arange(ctx_len, device=query.device)[None, :]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[start : start + q_len] = o[0].transpose(0, 1)
        start += q_len
    if decode_rows:
        _decode_batch(query, key_cache, value_cache, meta, scale, decode_rows, decode_seqs, out)
    return out


def _decode_batch(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    rows: list[int],
    seqs: list[int],
    out: torch.Tensor,
) -> None:
    """All single-token queries of the step as one padded, length-masked attention call."""
    device = query.device
    row_index = torch.tensor(rows, device=device)
    seq_index = torch.tensor(seqs, device=device)
    lens_cpu = [meta.seq_lens_cpu[s] for s in seqs]
    max_len = max(lens_cpu)
    table = meta.block_table.index_select(0, seq_index)
    k = gather_kv(key_cache, table, max_len)  # [B, kvh, L, d]
    v = gather_kv(value_cache, table, max_len)
    batch, num_kv_heads = k.shape[0], k.shape[1]
    # One query token per sequence: the query heads sharing a kv head become that head's
    # "query rows", so grouped-query attention needs no K/V expansion.
    q = query.index_select(0, row_index).view(batch, num_kv_heads, -1, query.shape[-1])
    mask = None
    if min(lens_cpu) != max_len:
        lens = torch.tensor(lens_cpu, device=device)
        mask = (torch.arange(max_len, device=device)[None, :] < lens[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    out.index_copy_(0, row_index, o.reshape(batch, -1, query.shape[-1]))
