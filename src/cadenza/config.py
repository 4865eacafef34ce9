"""Frozen configuration objects, built once at the edge (CLI / API) and passed inward.

Measured values (for example the number of KV blocks that fit in memory) live in runtime
objects, never here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

Architecture = Literal["llama", "qwen2", "mistral"]


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.x style RoPE frequency scaling (``rope_type == "llama3"``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder.

    Covers Llama 2/3.x, SmolLM2, Mistral (without sliding window) and Qwen2/2.5 (q/k/v biases).
    """

    architecture: Architecture = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    name: str = "model"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads and self.head_dim is None:
            raise ValueError(
                "hidden_size must divide by num_attention_heads when head_dim is unset"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def to_json(self) -> str:
        """A canonical JSON form, used for the model fingerprint."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache settings."""

    block_size: int = 16
    # Number of KV blocks; None sizes the pool from ``kv_cache_memory_gib``.
    num_blocks: int | None = None
    kv_cache_memory_gib: float = 1.0
    enable_prefix_caching: bool = True
    # Fraction of blocks admission keeps free for running decodes.
    admission_reserve_fraction: float = 0.10
    # Tiers below the device (Pensieve): host RAM and a disk directory. 0 disables a tier;
    # ``host_num_blocks`` / ``disk_num_blocks`` size them in blocks instead (tests).
    kv_host_gib: float = 0.0
    host_num_blocks: int | None = None
    kv_disk_gib: float = 0.0
    disk_num_blocks: int | None = None
    kv_disk_path: str | None = None
    kv_eviction_policy: Literal["cost", "lru"] = "cost"
    # Ahead-of-time copy to host when fewer than this fraction of device blocks are empty.
    kv_offload_threshold: float = 0.25
    # Retention pins may hold at most this fraction of device blocks.
    kv_pin_cap_fraction: float = 0.20
    # Write finished session turns through to disk (so KV survives a restart).
    kv_disk_write_through: bool = True

    @property
    def host_enabled(self) -> bool:
        return bool(self.host_num_blocks) or self.kv_host_gib > 0

    @property
    def disk_enabled(self) -> bool:
        return bool(self.disk_num_blocks) or self.kv_disk_gib > 0

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError("block_size must be positive")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        if not 0.0 <= self.admission_reserve_fraction < 1.0:
            raise ValueError("admission_reserve_fraction must be in [0, 1)")
        if self.kv_host_gib < 0 or self.kv_disk_gib < 0:
            raise ValueError("kv_host_gib and kv_disk_gib must not be negative")
        if self.disk_enabled and not self.kv_disk_path:
            raise ValueError("a disk KV tier needs kv_disk_path (e.g. --kv-disk-path ./kv)")
        if self.kv_eviction_policy not in ("cost", "lru"):
            raise ValueError(
                f"kv_eviction_policy must be 'cost' or 'lru'; got {self.kv_eviction_policy!r}"
            )
        if not 0.0 <= self.kv_offload_threshold < 1.0 or not 0.0 <= self.kv_pin_cap_fraction <= 1:
            raise ValueError("kv_offload_threshold and kv_pin_cap_fraction must be fractions")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching scheduler settings."""

    # Token budget of one step (prefill chunks + decodes).
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    enable_chunked_prefill: bool = True
    # Longest prefill chunk one request may take in a step (0 = the whole budget).
    long_prefill_token_threshold: int = 0
    policy: Literal["fcfs", "priority"] = "fcfs"

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens <= 0 or self.max_num_seqs <= 0:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine needs, besides the loaded model."""

    model: str = "smollm2-135m"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda if available, else cpu
    seed: int = 0
    num_threads: int | None = None
    max_model_len: int | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    # Matmuls: "auto" packs float32 CPU weights for oneDNN (model/packed_linear.py); "torch"
    # keeps torch's default GEMM.
    linear_backend: Literal["auto", "torch", "onednn"] = "auto"
    # The durable conversation store (SQLite); None keeps it in memory.
    session_store_path: str | None = None
    # Recompute cost profile for cost-aware eviction: "profile" measures this engine at start,
    # "linear" uses a fixed shape (fast start for tests).
    kv_cost_model: Literal["profile", "linear"] = "profile"
