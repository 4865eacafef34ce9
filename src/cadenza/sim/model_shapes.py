"""Shapes of the models the simulator prices: what a step's FLOPs and bytes follow from.

Values are the models' published Hugging Face ``config.json`` files (meta-llama/Llama-2-7b-hf,
meta-llama/Llama-2-13b-hf, meta-llama/Llama-3.1-8B, HuggingFaceTB/SmolLM2-135M-Instruct). The
GPU configurations serve in bfloat16 (2 bytes); SmolLM2 is what the CPU engine runs, in
float32 (4 bytes), so its KV block bytes match the real CPU engine's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_context: int
    dtype_bytes: int = 2
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer."""
        return 2 * self.num_layers * self.kv_dim * self.dtype_bytes

    def block_bytes(self, block_size: int) -> int:
        return block_size * self.kv_bytes_per_token

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer's matrices (q, k, v, o; gate, up, down)."""
        h = self.hidden_size
        return h * (h + 2 * self.kv_dim) + h * h + 3 * h * self.intermediate_size

    @property
    def linear_params(self) -> int:
        return self.num_layers * self.layer_params

    @property
    def head_params(self) -> int:
        """The LM head (run only for the rows that sample)."""
        return self.vocab_size * self.hidden_size

    @property
    def weight_bytes(self) -> int:
        """Resident weights: layers, LM head and (untied) embedding table."""
        embeddings = 0 if self.tied_embeddings else self.head_params
        return (self.linear_params + self.head_params + embeddings) * self.dtype_bytes


MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, 4096),
        ModelShape("llama-2-13b", 40, 5120, 40, 40, 13824, 32000, 4096),
        ModelShape("llama-3.1-8b", 32, 4096, 32, 8, 14336, 128256, 131072),
        ModelShape(
            "smollm2-135m", 30, 576, 9, 3, 1536, 49152, 8192, dtype_bytes=4, tied_embeddings=True
        ),
    )
}


def model_shape(name: str) -> ModelShape:
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"model must be one of {', '.join(MODELS)}; got {name!r}") from None
