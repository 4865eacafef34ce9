"""Per-step description of a ragged batch over paged KV, shared by every attention backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """Where each sequence's queries sit in the flat token batch and where its KV lives.

    Sequence ``s`` owns query rows ``query_start_loc[s] : query_start_loc[s + 1]``. Its context
    after this step is ``seq_lens[s]`` tokens, the last ``query_len`` of which are the new ones,
    so query ``i`` sits at absolute position ``seq_lens[s] - query_len + i`` and attends keys
    ``0 ..= that position`` (the causal mask offset by the cached length). Key ``j`` of sequence
    ``s`` lives in block ``block_table[s, j // block_size]`` at offset ``j % block_size``.
    """

    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, on the compute device
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_table: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    # [num_tokens] int64: block_id * block_size + offset of each new token
    slot_mapping: torch.Tensor
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    block_size: int
    # What the attention backend derives once per step (index tensors, masks, tile maps) and
    # reuses in every layer; set by ``AttentionBackend.prepare``.
    plan: Any = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.query_lens_cpu))

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store the new tokens' K/V ([T, kv_heads, head_dim]) into the paged cache in place.

    ``key_cache``/``value_cache`` are ``[num_blocks, block_size, kv_heads, head_dim]``.
    """
    num_blocks, block_size = key_cache.shape[:2]
    key_cache.view(num_blocks * block_size, *key_cache.shape[2:]).index_copy_(0, slot_mapping, key)
    value_cache.view(num_blocks * block_size, *value_cache.shape[2:]).index_copy_(
        0, slot_mapping, value
    )
