"""``paged_attention_triton`` against the PyTorch reference on random ragged paged batches.

On CUDA the full case matrix runs in-process. Everywhere else (no GPU) the kernel still runs,
through Triton's CPU interpreter, on a few tiny cases: ``TRITON_INTERPRET=1`` must be set
before triton is imported and must not leak into the rest of the test session, so those cases
run in ONE subprocess (this file executed as a script) that prints each case's error as JSON,
and one test per case checks its line.

The reference is ``paged_attention_torch`` in float64 on CPU over the same (upcast) inputs, so
each tolerance measures the kernel's own error at its dtype.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from cadenza.runner.attention_metadata import AttentionMetadata, write_kv
from cadenza.runner.attention_torch import paged_attention_torch
from cadenza.runner.attention_triton import (
    build_tile_map,
    is_triton_available,
    paged_attention_triton,
)

BLOCK_SIZE = 16
KV_HEADS = 2

# Each mix: (cached_len, query_len) per sequence. cached_len 0 with query_len > 1 is a fresh
# prefill, cached_len > 0 with query_len > 1 a chunk after a cached prefix, query_len 1 a decode.
MIXES: dict[str, list[tuple[int, int]]] = {
    "fresh_prefill": [(0, 37), (0, 5), (0, 16)],
    "prefix_chunk": [(48, 20), (13, 3), (16, 16)],
    "decode": [(40, 1), (15, 1), (16, 1), (1, 1), (0, 1), (100, 1)],
    "mixed": [(0, 19), (33, 1), (27, 12), (64, 1), (0, 1), (5, 40)],
    "mixed_long": [(0, 300), (500, 1), (250, 130), (1000, 1), (77, 65), (0, 2)],
}

# (atol, rtol) per dtype, against the float64 reference
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (2e-3, 2e-3),
    "float16": (5e-3, 5e-3),
    "bfloat16": (2.5e-2, 2e-2),
}

requires_triton = pytest.mark.skipif(not is_triton_available(), reason="triton is not installed")


@dataclass(frozen=True)
class Case:
    mix: str
    group: int  # query heads per kv head
    head_dim: int
    dtype: str
    strided_query: bool = False  # query as a view into a wider (fused QKV-like) buffer

    @property
    def id(self) -> str:
        suffix = "-strided" if self.strided_query else ""
        return f"{self.mix}-g{self.group}-d{self.head_dim}-{self.dtype}{suffix}"


@dataclass
class Batch:
    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float


def make_batch(case: Case, device: str, seed: int = 0) -> Batch:
    """A random ragged batch whose sequences own shuffled (non-contiguous) cache blocks.

    The whole cache starts as random junk, so a read through the wrong block or past a
    sequence's length changes the answer; the step's new tokens go in through ``write_kv``.
    """
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    mix = MIXES[case.mix]
    num_heads = KV_HEADS * case.group
    seq_lens = [cached + q for cached, q in mix]
    query_lens = [q for _, q in mix]
    blocks_per_seq = [-(-n // BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # a few spare blocks nobody owns
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    block_table = torch.zeros(len(mix), max(blocks_per_seq) + 2, dtype=torch.int32)
    for s, n in enumerate(blocks_per_seq):
        block_table[s, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]

    cache_shape = (num_blocks, BLOCK_SIZE, KV_HEADS, case.head_dim)
    key_cache = torch.randn(cache_shape, generator=gen)
    value_cache = torch.randn(cache_shape, generator=gen)
    slots = []
    for s, (cached, q) in enumerate(mix):
        pos = torch.arange(cached, cached + q)
        slots.append(block_table[s, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE)
    slot_mapping = torch.cat(slots)
    num_tokens = sum(query_lens)
    new_k = torch.randn(num_tokens, KV_HEADS, case.head_dim, generator=gen)
    new_v = torch.randn(num_tokens, KV_HEADS, case.head_dim, generator=gen)
    write_kv(new_k, new_v, key_cache, value_cache, slot_mapping)

    # x2 sharpens the softmax so masking and max-tracking errors show
    query = 2 * torch.randn(num_tokens, num_heads, case.head_dim, generator=gen)
    if case.strided_query:
        wide = torch.randn(num_tokens, num_heads + 3, case.head_dim + 8, generator=gen)
        wide[:, 1 : 1 + num_heads, 4 : 4 + case.head_dim] = query
        query = wide.to(device=device, dtype=dtype)[:, 1 : 1 + num_heads, 4 : 4 + case.head_dim]
    else:
        query = query.to(device=device, dtype=dtype)

    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()])
    meta = AttentionMetadata(
        query_start_loc=query_start_loc.to(device=device, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_table=block_table.to(device),
        slot_mapping=slot_mapping.to(device),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        block_size=BLOCK_SIZE,
    )
    return Batch(
        query=query,
        key_cache=key_cache.to(device=device, dtype=dtype),
        value_cache=value_cache.to(device=device, dtype=dtype),
        meta=meta,
        scale=case.head_dim**-0.5,
    )


def reference(batch: Batch) -> torch.Tensor:
    """``paged_attention_torch`` in float64 on CPU over the batch's (possibly rounded) inputs."""
    m = batch.meta
    meta_cpu = AttentionMetadata(
        query_start_loc=m.query_start_loc.cpu(),
        seq_lens=m.seq_lens.cpu(),
        block_table=m.block_table.cpu(),
        slot_mapping=m.slot_mapping.cpu(),
        query_lens_cpu=m.query_lens_cpu,
        seq_lens_cpu=m.seq_lens_cpu,
        max_query_len=m.max_query_len,
        max_seq_len=m.max_seq_len,
        block_size=m.block_size,
    )
    return paged_attention_torch(
        batch.query.double().cpu(),
        batch.key_cache.double().cpu(),
        batch.value_cache.double().cpu(),
        meta_cpu,
        batch.scale,
    )


def compare(case: Case, device: str) -> dict[str, float | int | bool]:
    """Run the kernel on ``device`` and measure it against the reference."""
    batch = make_batch(case, device)
    out = paged_attention_triton(
        batch.query, batch.key_cache, batch.value_cache, batch.meta, batch.scale
    )
    assert out.shape == batch.query.shape and out.dtype == batch.query.dtype
    ref = reference(batch)
    got = out.double().cpu()
    atol, rtol = TOLERANCES[case.dtype]
    err = (got - ref).abs()
    return {
        "finite": bool(torch.isfinite(got).all()),
        "max_abs_err": float(err.max()),
        "num_bad": int((err > atol + rtol * ref.abs()).sum()),
    }


def check(case: Case, result: dict[str, float | int | bool]) -> None:
    assert result["finite"], f"{case.id}: non-finite output"
    assert result["num_bad"] == 0, (
        f"{case.id}: {result['num_bad']} elements outside tolerance "
        f"{TOLERANCES[case.dtype]}, max abs err {result['max_abs_err']:.3g}"
    )


# ---------------------------------------------------------------------------------------------
# CUDA: the full matrix, in-process
# ---------------------------------------------------------------------------------------------

CUDA_CASES = [
    Case(mix, group, head_dim, dtype)
    for mix in MIXES
    for group in (1, 3, 4)
    for head_dim in (64, 128)
    for dtype in ("float32", "bfloat16", "float16")
] + [Case("mixed_long", 4, 128, "bfloat16", strided_query=True)]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_triton
@requires_cuda
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: c.id)
def test_matches_reference_cuda(case: Case) -> None:
    check(case, compare(case, "cuda"))


@requires_triton
@requires_cuda
def test_tile_map_reused_across_layers_cuda() -> None:
    case = Case("mixed", 4, 64, "bfloat16")
    batch = make_batch(case, "cuda")
    tile_map = build_tile_map(batch.meta, group=4)
    first = paged_attention_triton(
        batch.query, batch.key_cache, batch.value_cache, batch.meta, batch.scale, tile_map
    )
    again = paged_attention_triton(
        batch.query, batch.key_cache, batch.value_cache, batch.meta, batch.scale, tile_map
    )
    fresh = paged_attention_triton(
        batch.query, batch.key_cache, batch.value_cache, batch.meta, batch.scale
    )
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    torch.testing.assert_close(first, fresh, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# CPU: Triton's interpreter, tiny cases, one subprocess
# ---------------------------------------------------------------------------------------------

INTERPRETER_CASES = [
    Case("mixed", 4, 64, "float32"),
    Case("mixed", 3, 128, "float32"),
    Case("prefix_chunk", 3, 64, "bfloat16"),
    Case("fresh_prefill", 1, 128, "float16"),
    Case("decode", 1, 64, "bfloat16"),
    Case("decode", 4, 128, "float32"),
    Case("mixed", 1, 64, "float32", strided_query=True),
    Case("mixed_long", 4, 128, "bfloat16"),
    Case("mixed_long", 3, 64, "float32"),
]
_INTERPRETER_FLAG = "--run-interpreter-cases"


def _interpreter_main() -> None:
    """Subprocess entry: run every interpreter case, print one JSON object keyed by case id."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "must start with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    results = {case.id: compare(case, "cpu") for case in INTERPRETER_CASES}
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict[str, float | int | bool]]:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    # the child sees exactly this session's import path (src layout, installed or not)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run(
        [sys.executable, __file__, _INTERPRETER_FLAG],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@requires_triton
@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=lambda c: c.id)
def test_matches_reference_interpreter(
    case: Case, interpreter_results: dict[str, dict[str, float | int | bool]]
) -> None:
    check(case, interpreter_results[case.id])


# ---------------------------------------------------------------------------------------------
# No triton needed
# ---------------------------------------------------------------------------------------------


def test_tile_map_assigns_tiles_per_sequence() -> None:
    query_lens = [5, 1, 40, 16, 17]
    seq_lens = [5, 9, 60, 16, 30]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, 5, 6, 46, 62, 79], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=torch.zeros(5, 4, dtype=torch.int32),
        slot_mapping=torch.zeros(79, dtype=torch.int64),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        max_query_len=40,
        max_seq_len=60,
        block_size=BLOCK_SIZE,
    )
    tile_map = build_tile_map(meta, group=4, block_m=64)  # 16 tokens per tile
    assert (tile_map.block_m, tile_map.block_q, tile_map.num_tiles) == (64, 16, 8)
    assert tile_map.tile_seq.tolist() == [0, 1, 2, 2, 2, 3, 4, 4]
    assert tile_map.tile_start.tolist() == [0, 0, 0, 16, 32, 0, 0, 16]
    group3 = build_tile_map(meta, group=3, block_m=16)  # 5 tokens per tile, 1 row padding
    assert group3.block_q == 5
    assert group3.num_tiles == sum(-(-q // 5) for q in query_lens)
    with pytest.raises(ValueError):
        build_tile_map(meta, group=3, block_m=24)


def test_module_imports_without_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "from cadenza.runner import attention_triton as m\n"
        "assert m.is_triton_available() is False\n"
        "try:\n"
        "    m.paged_attention_triton(None, None, None, None, 1.0)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('expected RuntimeError')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


if __name__ == "__main__" and _INTERPRETER_FLAG in sys.argv:
    _interpreter_main()
