"""Random weights for a config, in Hugging Face Llama naming (tests and benchmarks)."""

from __future__ import annotations

import torch

from cadenza.config import ModelConfig


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter a checkpoint for ``config`` holds, with its shape, in HF naming.

    ``lm_head.weight`` is present only when the embeddings are not tied; q/k/v biases only when
    ``attention_bias`` is set. Loaders validate against this.
    """
    hidden, head_dim = config.hidden_size, config.resolved_head_dim
    q_dim = config.num_attention_heads * head_dim
    kv_dim = config.num_key_value_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
    }
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.q_proj.weight"] = (q_dim, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_dim, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_dim, hidden)
        if config.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_dim,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_dim,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_dim,)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q_dim)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (config.intermediate_size, hidden)
        shapes[p + "mlp.up_proj.weight"] = (config.intermediate_size, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, config.intermediate_size)
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def check_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise ValueError unless ``state_dict`` has exactly the parameters ``config`` needs."""
    expected = parameter_shapes(config)
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong = [
        f"{name}: {tuple(state_dict[name].shape)} != {shape}"
        for name, shape in expected.items()
        if name in state_dict and tuple(state_dict[name].shape) != shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            "weights do not match the model config: "
            f"missing={missing[:5]} unexpected={unexpected[:5]} wrong_shape={wrong[:5]}"
        )


def random_state_dict(
    config: ModelConfig,
    seed: int = 0,
    std: float = 0.02,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Float32 CPU weights, identical for the same (config, seed, std) on any machine; or
    drawn on another ``device`` in ``dtype`` (an 8B model's float32 weights drawn on the CPU
    take minutes; values then differ from the CPU's).

    Norm weights are ``1 + std * N(0, 1)`` so that a wrong norm is visible in tests.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    state_dict: dict[str, torch.Tensor] = {}
    for name, shape in parameter_shapes(config).items():
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype) * std
        state_dict[name] = noise + 1.0 if name.endswith("norm.weight") else noise
    return state_dict
