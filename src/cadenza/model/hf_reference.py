"""The transformers implementation of a config, loaded with our weights: the reference that
tests and benchmarks compare against. transformers is optional, so it is imported lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from cadenza.config import ModelConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


def hf_config(config: ModelConfig, attn_implementation: str = "eager") -> PretrainedConfig:
    """The transformers config (Llama / Qwen2 / Mistral) equivalent to ``config``."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    rope_scaling = None
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope_scaling = {
            "rope_type": s.rope_type,
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    common: dict[str, Any] = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.resolved_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids),
        "attn_implementation": attn_implementation,
    }
    if config.architecture == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False, sliding_window=None)
    if config.architecture == "mistral":
        if config.attention_bias:
            raise ValueError("Mistral has no attention bias")
        return MistralConfig(**common, sliding_window=None)
    return LlamaConfig(**common, attention_bias=config.attention_bias, mlp_bias=False)


def build_hf_model(
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    attn_implementation: str = "eager",
) -> PreTrainedModel:
    """A float32 CPU transformers model in eval mode holding exactly ``state_dict``'s weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(
        hf_config(config, attn_implementation), dtype=torch.float32
    )
    weights = dict(state_dict)
    if config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    if config.architecture == "qwen2" and not config.attention_bias:
        # Qwen2 always has q/k/v biases; zeros are the same function as none.
        for name in [n for n in weights if n.endswith(("q_proj.weight", "k_proj.weight"))] + [
            n for n in weights if n.endswith("v_proj.weight")
        ]:
            bias = name.removesuffix("weight") + "bias"
            weights[bias] = torch.zeros(weights[name].shape[0])
    model.load_state_dict(weights, strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(torch.float32).eval()
