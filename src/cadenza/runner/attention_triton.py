"""Paged attention over a ragged batch as ONE Triton kernel launch per layer.

Same contract as :func:`cadenza.runner.attention_torch.paged_attention_torch`: every sequence of
the step has its own query length, cached length and non-contiguous block table, and prefill
chunks (with or without a cached prefix) and single-token decodes share one launch.

Launch layout: the grid is ``(query tiles, kv heads)``. A query tile is up to ``block_q``
consecutive query tokens of ONE sequence; the program owning it also owns every query head of
its kv head, so the ``block_m = block_q * group`` rows of its Q tile (row ``r`` = token
``r // group``, head ``r % group``) share each K/V tile it reads, which is how GQA costs one
KV read per kv head rather than one per query head. The program walks the sequence's keys
``BLOCK_N`` at a time, gathering each key's slot through the block table (so ``BLOCK_N`` is
independent of the cache block size), and keeps a flash-attention online softmax in fp32.
It stops at the tile's last query position: later keys are causally masked for every row.

Which tile belongs to which sequence is a per-step mapping (:class:`TritonTileMap`), built with
a few device-side torch ops and no host sync; build it once per step with
:func:`build_tile_map` and pass it to every layer's call to skip even that.

``triton`` is imported lazily: importing this module never imports it, so the module loads on
machines without triton; :func:`is_triton_available` says whether the kernel can be used.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

from cadenza.runner.attention_metadata import AttentionMetadata

# Bound on first use by ``_jitted_kernel``; the kernel body resolves ``tl`` through this
# module's globals at compile time (and in the interpreter at run time), so binding them
# later is enough and the module imports without triton.
triton: Any = None
tl: Any = None

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256


@functools.cache
def is_triton_available() -> bool:
    """Whether ``triton`` imports here (it may still need a GPU or ``TRITON_INTERPRET=1``)."""
    try:
        import triton as _triton  # noqa: F401
        import triton.language as _tl  # noqa: F401
    except Exception:  # ImportError, or a broken install failing while loading its libraries
        return False
    return True


def _interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _paged_attention_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    tile_seq_ptr,
    tile_start_ptr,
    scale_log2e,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    tile_start = tl.load(tile_start_ptr + tile)  # first query of the tile, within the sequence
    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    ctx_len = tl.load(seq_lens_ptr + seq)
    cached = ctx_len - q_len  # keys before this step's first query

    rows = tl.arange(0, BLOCK_M)
    tok = tile_start + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    # rows past BLOCK_Q * GROUP exist only because BLOCK_M is a power of two (GROUP may be 3)
    row_valid = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = cached + tok  # absolute position; sees keys 0 ..= q_pos
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM

    q_row = (q_begin + tok).to(tl.int64)
    q = tl.load(
        q_ptr
        + q_row[:, None] * stride_qt
        + head[:, None] * stride_qh
        + offs_d[None, :] * stride_qd,
        mask=row_valid[:, None] & d_valid[None, :],
        other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)

    # Keys after the tile's last query are masked for every row. The first KV tile holds key 0,
    # which every row sees, so m_i is finite from then on and no row ever divides by zero.
    kv_end = cached + tl.minimum(tile_start + BLOCK_Q, q_len)
    table_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_cache_ptr + kv_head.to(tl.int64) * stride_vh
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(0, kv_end, BLOCK_N):
        key_pos = start_n + offs_n
        k_valid = key_pos < kv_end
        block = tl.load(table_row + key_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        in_block = key_pos % BLOCK_SIZE
        k = tl.load(  # [HEAD_DIM_PAD, BLOCK_N]: already transposed for Q @ K^T
            k_head
            + block[None, :] * stride_kb
            + in_block[None, :] * stride_kt
            + offs_d[:, None] * stride_kd,
            mask=k_valid[None, :] & d_valid[:, None],
            other=0.0,
        )
        # DOT_FP32 is constexpr, so only one branch is compiled: full fp32 products (not tf32)
        s = tl.dot(q, k.to(tl.float32), input_precision="ieee") if DOT_FP32 else tl.dot(q, k)
        s = s * scale_log2e
        visible = (key_pos[None, :] <= q_pos[:, None]) & k_valid[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_head
            + block[:, None] * stride_vb
            + in_block[:, None] * stride_vt
            + offs_d[None, :] * stride_vd,
            mask=k_valid[:, None] & d_valid[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None]
        if DOT_FP32:
            acc += tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(
        out_ptr
        + q_row[:, None] * stride_ot
        + head[:, None] * stride_oh
        + offs_d[None, :] * stride_od,
        acc.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & d_valid[None, :],
    )


@functools.cache
def _jitted_kernel() -> Any:
    """Import triton, bind the module globals the kernel body uses, and JIT the kernel."""
    global triton, tl
    import triton as _triton
    import triton.language as _tl

    triton, tl = _triton, _tl
    return _triton.jit(_paged_attention_kernel)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class TritonTileMap:
    """Per-step assignment of query tiles to sequences; shared by every layer of the step.

    Program ``i`` along the grid's first axis handles queries
    ``tile_start[i] : tile_start[i] + block_q`` of sequence ``tile_seq[i]``.
    """

    tile_seq: torch.Tensor  # [num_tiles] int32, on the compute device
    tile_start: torch.Tensor  # [num_tiles] int32
    num_tiles: int
    block_m: int  # rows of a program's Q tile: block_q tokens x group heads, padded to 2^k
    block_q: int  # query tokens per tile
    group: int  # query heads per kv head


def _pick_block_m(max_query_len: int, group: int) -> int:
    """Small tiles when every query is one token (decode), larger ones when prefills are present.

    A decode tile has one live token, so rows beyond ``group`` are padding; a prefill tile
    reuses each K/V tile for more queries the larger it is.
    """
    base = 16 if max_query_len * group <= 16 else 64
    return max(base, _next_power_of_2(group))


def build_tile_map(
    meta: AttentionMetadata, group: int, block_m: int | None = None
) -> TritonTileMap:
    """Map each query tile to its sequence with device-side torch ops (no host sync).

    The tile count comes from ``meta.query_lens_cpu`` (one term per sequence); everything
    else is computed from ``meta.query_start_loc`` on its own device.
    """
    if block_m is None:
        block_m = _pick_block_m(meta.max_query_len, group)
    if block_m < group or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m} must be a power of two >= group={group}")
    block_q = block_m // group
    num_tiles = sum(-(-q // block_q) for q in meta.query_lens_cpu)
    device = meta.query_start_loc.device
    query_lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).to(torch.int64)
    tiles_per_seq = (query_lens + (block_q - 1)) // block_q
    seq_ids = torch.arange(meta.num_seqs, device=device, dtype=torch.int32)
    tile_seq = torch.repeat_interleave(seq_ids, tiles_per_seq, output_size=num_tiles)
    first_tile = torch.cumsum(tiles_per_seq, 0) - tiles_per_seq
    tile_index = torch.arange(num_tiles, device=device, dtype=torch.int64)
    tile_start = ((tile_index - first_tile[tile_seq]) * block_q).to(torch.int32)
    return TritonTileMap(tile_seq, tile_start, num_tiles, block_m, block_q, group)


def paged_attention_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    tile_map: TritonTileMap | None = None,
) -> torch.Tensor:
    """Attention for ``query`` ``[T, heads, head_dim]`` against KV already written to the cache.

    Semantics match :func:`paged_attention_torch`; the result has ``query``'s dtype (fp32,
    fp16 or bf16; accumulation is fp32) and is contiguous. ``tile_map`` (from
    :func:`build_tile_map` with this call's ``heads // kv_heads``) may be reused across
    the layers of a step. Needs CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if not is_triton_available():
        raise RuntimeError("paged_attention_triton needs the `triton` package")
    if query.dim() != 3 or key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError(
            "expected query [T, heads, d] and K/V caches [blocks, block_size, kv_heads, d], got "
            f"{tuple(query.shape)}, {tuple(key_cache.shape)}, {tuple(value_cache.shape)}"
        )
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    if key_cache.shape[3] != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"heads={num_heads} / kv_heads={num_kv_heads} / head_dim mismatch")
    if head_dim > _MAX_HEAD_DIM:
        raise ValueError(f"head_dim={head_dim} > {_MAX_HEAD_DIM} is not supported")
    if block_size != meta.block_size:
        raise ValueError(f"cache block size {block_size} != meta.block_size {meta.block_size}")
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {query.dtype}")
    if key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
        raise ValueError("query and K/V caches must share a dtype")
    if query.device.type == "cpu" and not _interpret_mode():
        raise ValueError("CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)")
    if num_tokens != meta.num_tokens:
        raise ValueError(f"query has {num_tokens} tokens, meta describes {meta.num_tokens}")

    group = num_heads // num_kv_heads
    if tile_map is None:
        tile_map = build_tile_map(meta, group)
    elif tile_map.group != group:
        raise ValueError(f"tile_map was built for group {tile_map.group}, not {group}")
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if tile_map.num_tiles == 0:
        return out

    head_dim_pad = max(16, _next_power_of_2(head_dim))  # tl.dot needs every dim >= 16
    # fp32 inputs take full-precision fp32 dots. So does bf16 under the interpreter, whose
    # tl.dot multiplies bf16 bit patterns as integers (triton-lang/triton#11584, unsupported
    # upstream); compiled bf16 keeps its tensor-core dots.
    dot_fp32 = query.dtype == torch.float32 or (query.dtype == torch.bfloat16 and _interpret_mode())
    # fp32 K/V tiles are twice the bytes: halve them at large head_dim to bound shared memory.
    block_n = 32 if query.dtype == torch.float32 and head_dim_pad >= 128 else 64
    block_table = meta.block_table
    if block_table.stride(1) != 1:  # the kernel indexes a row as ptr + j
        block_table = block_table.contiguous()
    kernel = _jitted_kernel()
    grid = (tile_map.num_tiles, num_kv_heads)
    kernel[grid](
        out,
        query,
        key_cache,
        value_cache,
        block_table,
        meta.query_start_loc.contiguous(),
        meta.seq_lens.contiguous(),
        tile_map.tile_seq,
        tile_map.tile_start,
        float(scale) * _LOG2E,
        *query.stride(),
        *out.stride(),
        *key_cache.stride(),
        *value_cache.stride(),
        block_table.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size,
        BLOCK_M=tile_map.block_m,
        BLOCK_Q=tile_map.block_q,
        BLOCK_N=block_n,
        DOT_FP32=dot_fp32,
        num_warps=4,
        num_stages=2,
    )
    return out


__all__ = [
    "TritonTileMap",
    "build_tile_map",
    "is_triton_available",
    "paged_attention_triton",
]
