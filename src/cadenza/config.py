"""Frozen configuration objects, built once at the edge (CLI / API) and passed inward.

Measured values (for example the number of KV blocks that fit in memory) live in runtime
objects, never here.

The engine's knobs (``EngineConfig`` and its ``CacheConfig`` / ``SchedulerConfig`` sections)
are declared once, here: each field is a ``knob(...)`` that carries its default, its help text
and its flat option name. ``LLM(...)`` keywords (``EngineConfig.from_options``) and the CLI
flags (``cadenza.config_args``) are both derived from these fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

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


# Keys of a knob's ``field(metadata=...)``.
HELP = "help"  # one line for --help (required)
OPTION = "option"  # the flat name (LLM keyword, argparse dest) when not the field's name
FLAG = "flag"  # the CLI flag when not derived from the option; None: not on the CLI
CHOICES = "choices"  # allowed values on the CLI when the type is not a Literal


def knob(default: Any, help: str, **metadata: Any) -> Any:
    """A config field with its help text; ``metadata`` may add ``option``, ``flag``,
    ``choices`` (the keys above)."""
    unknown = set(metadata) - {OPTION, FLAG, CHOICES}
    if unknown:
        raise TypeError(f"unknown knob metadata: {sorted(unknown)}")
    return field(default=default, metadata={HELP: help, **metadata})


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache settings."""

    block_size: int = knob(16, "tokens per KV block")
    num_blocks: int | None = knob(
        None,
        "number of device KV blocks; unset: as many as --kv-cache-memory-gib holds",
        option="num_kv_blocks",
    )
    kv_cache_memory_gib: float = knob(1.0, "device memory for the KV block pool, in GiB")
    enable_prefix_caching: bool = knob(True, "reuse the KV of shared prompt prefixes")
    admission_reserve_fraction: float = knob(
        0.10, "fraction of KV blocks that admission keeps free for running decodes"
    )
    # Tiers below the device (Pensieve): host RAM and a disk directory. 0 disables a tier;
    # ``host_num_blocks`` / ``disk_num_blocks`` size them in blocks instead (tests).
    kv_host_gib: float = knob(0.0, "host RAM KV tier size in GiB (0: no host tier)")
    host_num_blocks: int | None = knob(
        None, "host KV tier size in blocks, instead of --kv-host-gib (tests)"
    )
    kv_disk_gib: float = knob(0.0, "disk KV tier size in GiB (0: no disk tier)")
    disk_num_blocks: int | None = knob(
        None, "disk KV tier size in blocks, instead of --kv-disk-gib (tests)"
    )
    kv_disk_path: str | None = knob(None, "directory of the disk KV tier")
    kv_eviction_policy: Literal["cost", "lru"] = knob(
        "cost", "which cached KV to evict first: cost-aware (Pensieve) or least recently used"
    )
    kv_offload_threshold: float = knob(
        0.25, "copy KV to host ahead of time when fewer than this fraction of blocks are empty"
    )
    kv_pin_cap_fraction: float = knob(
        0.20, "most of the device KV blocks that retention pins may hold, as a fraction"
    )
    kv_disk_write_through: bool = knob(
        True, "write finished session turns through to disk, so KV survives a restart"
    )

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

    max_num_batched_tokens: int = knob(
        2048, "token budget of one engine step (prefill chunks plus decodes)"
    )
    max_num_seqs: int = knob(64, "most requests running at once")
    enable_chunked_prefill: bool = knob(True, "split long prefills across steps")
    long_prefill_token_threshold: int = knob(
        0, "longest prefill chunk one request may take in a step (0: the whole budget)"
    )
    policy: Literal["fcfs", "priority", "program"] = knob(
        "fcfs",
        "order of waiting requests: first come first served; by priority; or program-level "
        "FCFS (Continuum: a session's turn is ordered by when its session began, so a returning"
        " agent step goes before a new program's first step)",
        option="scheduling_policy",
    )

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens <= 0 or self.max_num_seqs <= 0:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine needs, besides the loaded model.

    ``cache`` and ``scheduler`` are sections: their knobs are offered flat, next to this
    class's own (``EngineConfig.from_options(block_size=32)``, ``--block-size 32``).
    """

    model: str = knob(
        "smollm2-135m",
        "alias smollm2-135m (embedded default), a .gguf file, or a Hugging Face directory",
    )
    dtype: str = knob(
        "auto",
        "weights and KV dtype; auto: float32 on CPU, bfloat16 on CUDA",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    device: str = knob("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    # Not a flag: the CLI's --seed is the sampling seed.
    seed: int = knob(0, "engine seed", flag=None)
    num_threads: int | None = knob(None, "CPU threads of torch (unset: torch's default)")
    max_model_len: int | None = knob(
        None, "longest sequence (prompt plus output); unset: the model's context length"
    )
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    attention_backend: Literal["auto", "torch", "triton"] = knob(
        "auto", "attention kernels: auto picks Triton on CUDA, torch elsewhere"
    )
    linear_backend: Literal["auto", "torch", "onednn"] = knob(
        "auto",
        "matmul kernels: auto packs float32 CPU weights for oneDNN; torch keeps torch's GEMM",
    )
    session_store_path: str | None = knob(
        None,
        "SQLite file of the durable conversation store (unset: kept in memory)",
        flag="--session-store",
    )
    kv_cost_model: Literal["profile", "linear"] = knob(
        "profile",
        "recompute cost profile for cost-aware eviction: profile measures this engine at "
        "start; linear uses a fixed shape (fast start)",
    )
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = knob(
        "auto",
        "how tool calls are written and parsed (vLLM's names): hermes (<tool_call>{json}"
        "</tool_call>: Qwen2.5/3, Hermes, and the prompt given to templates without tools), "
        "llama3_json (Llama 3.1+), mistral ([TOOL_CALLS][...]); auto picks from the chat "
        "template",
    )
    profile_cache_dir: str | None = knob(
        None,
        "where the measured cost profile is cached per model and machine, so later starts skip "
        "profiling (unset: $XDG_CACHE_HOME/cadenza or ~/.cache/cadenza; 'none' disables)",
    )

    def __post_init__(self) -> None:
        # Checked here, before a model loads (the runner resolves it only after loading).
        dtypes = ("auto", "float32", "bfloat16", "float16")
        if self.dtype not in dtypes:
            raise ValueError(f"dtype must be one of {', '.join(dtypes)}; got {self.dtype!r}")

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """The config from flat options (``LLM(...)`` keywords): each knob by its option name,
        whichever section it lives in. An unknown name is a TypeError naming it."""
        knobs = {k.option: k for k in engine_knobs()}
        unknown = [name for name in options if name not in knobs]
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, knobs, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"unknown engine option {name!r}{hint}")
        section_types = _sections()
        own: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {name: {} for name in section_types}
        for option, value in options.items():
            k = knobs[option]
            (own if k.section is None else sections[k.section])[k.name] = value
        for name, values in sections.items():
            own[name] = section_types[name](**values)
        return cls(**own)


@dataclass(frozen=True)
class Knob:
    """One engine knob: a field of ``EngineConfig`` or of one of its sections."""

    field: dataclasses.Field[Any]
    owner: type  # the dataclass that declares it
    section: str | None  # the EngineConfig field holding ``owner``; None for EngineConfig's own

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def option(self) -> str:
        """The flat name: the ``LLM(...)`` keyword and the argparse dest."""
        return str(self.field.metadata.get(OPTION, self.field.name))

    @property
    def help(self) -> str:
        return str(self.field.metadata[HELP])

    @property
    def default(self) -> Any:
        return self.field.default


def _sections() -> dict[str, type]:
    """EngineConfig's nested config fields, by name."""
    return {
        f.name: f.default_factory  # type: ignore[misc]
        for f in dataclasses.fields(EngineConfig)
        if f.default_factory is not dataclasses.MISSING
    }


def engine_knobs() -> tuple[Knob, ...]:
    """Every engine knob, in declaration order (sections expanded in place)."""
    sections = _sections()
    knobs: list[Knob] = []
    for f in dataclasses.fields(EngineConfig):
        if f.name in sections:
            owner = sections[f.name]
            knobs += [Knob(g, owner, f.name) for g in dataclasses.fields(owner)]
        else:
            knobs.append(Knob(f, EngineConfig, None))
    return tuple(knobs)
