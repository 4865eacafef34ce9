"""Attention backends behind one interface: derive per-step state once, then run each layer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cadenza.runner.attention_metadata import AttentionMetadata
from cadenza.runner.attention_torch import paged_attention_torch, prepare_torch_attention


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    # Called once per step; the result is stored as ``meta.plan`` for every layer to reuse.
    prepare: Callable[[AttentionMetadata], Any]
    # (query, key_cache, value_cache, meta, scale, new_key, new_value) -> output
    forward: Callable[..., torch.Tensor]


TORCH_BACKEND = AttentionBackend("torch", prepare_torch_attention, paged_attention_torch)


def _triton_backend(group: int) -> AttentionBackend:
    from cadenza.runner.attention_triton import build_tile_map, paged_attention_triton

    def prepare(meta: AttentionMetadata) -> Any:
        return build_tile_map(meta, group)

    def forward(query, key_cache, value_cache, meta, scale, new_key=None, new_value=None):
        return paged_attention_triton(query, key_cache, value_cache, meta, scale, meta.plan)

    return AttentionBackend("triton", prepare, forward)


def select_attention(name: str, device: torch.device, group: int) -> AttentionBackend:
    """``auto`` is Triton on CUDA when triton is installed, the torch reference otherwise.

    ``group`` is the number of query heads per kv head.
    """
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"attention backend must be auto, torch or triton; got {name!r}")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TORCH_BACKEND
    from cadenza.runner.attention_triton import is_triton_available

    if is_triton_available() and device.type == "cuda":
        return _triton_backend(group)
    if name == "triton":
        raise ValueError("the triton attention backend needs CUDA and the triton package")
    return TORCH_BACKEND
