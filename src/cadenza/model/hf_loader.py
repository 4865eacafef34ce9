"""Load a Hugging Face model directory (config.json + safetensors + tokenizer.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from cadenza.config import ModelConfig, RopeScaling
from cadenza.model.random_init import check_state_dict
from cadenza.model.tokenizer import Tokenizer

HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
# Files other than weights that change what the model computes or how text is tokenized.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files holding the checkpoint, in a fixed order.

    With an index, exactly the files it names; otherwise every ``*.safetensors`` except
    ``consolidated*`` (Mistral repositories ship their native-format copy under that name).
    """
    directory = Path(path)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(
            f for f in directory.glob("*.safetensors") if not f.name.startswith("consolidated")
        )
    if not files:
        raise FileNotFoundError(f"{directory} has no *.safetensors weights")
    return files


def _architecture(raw: dict[str, Any]) -> str:
    for name in raw.get("architectures") or []:
        if name in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[name]
    if raw.get("model_type") in _MODEL_TYPES and not raw.get("architectures"):
        return _MODEL_TYPES[raw["model_type"]]
    raise ValueError(
        f"unsupported architecture {raw.get('architectures') or raw.get('model_type')}; "
        f"expected one of {sorted(HF_ARCHITECTURES)}"
    )


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling; transformers 5 nests both in ``rope_parameters``."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = float(raw.get("rope_theta") or params.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling {rope_type!r}; only 'llama3' is supported")
    return theta, RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _check_supported(raw: dict[str, Any], arch: str) -> None:
    max_positions = raw.get("max_position_embeddings", 4096)
    window = raw.get("sliding_window")
    # Qwen2 configs carry a sliding_window that only applies with use_sliding_window.
    uses_window = raw.get("use_sliding_window", False) if arch == "qwen2" else arch == "mistral"
    if uses_window and window is not None and window < max_positions:
        raise ValueError(
            f"sliding-window attention (sliding_window={window} < max_position_embeddings="
            f"{max_positions}) is not supported"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {raw['hidden_act']!r}")
    if raw.get("mlp_bias"):
        raise ValueError("mlp_bias is not supported")


def config_from_hf(
    raw: dict[str, Any], *, name: str, tokenizer: Tokenizer | None = None
) -> ModelConfig:
    """A ModelConfig from a parsed ``config.json``; bos/eos come from the tokenizer when given."""
    arch = _architecture(raw)
    _check_supported(raw, arch)
    hidden = int(raw["hidden_size"])
    n_head = int(raw["num_attention_heads"])
    head_dim = raw.get("head_dim")
    if head_dim is not None and int(head_dim) * n_head == hidden:
        head_dim = None
    rope_theta, rope_scaling = _rope(raw)
    eos = list(tokenizer.eos_token_ids) if tokenizer is not None else []
    eos_raw = raw.get("eos_token_id")
    eos += [eos_raw] if isinstance(eos_raw, int) else list(eos_raw or [])
    bos = raw.get("bos_token_id")
    if tokenizer is not None and tokenizer.bos_token_id is not None:
        bos = tokenizer.bos_token_id
    return ModelConfig(
        architecture=arch,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=n_head,
        num_key_value_heads=int(raw.get("num_key_value_heads") or n_head),
        head_dim=None if head_dim is None else int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
        bos_token_id=bos,
        eos_token_ids=tuple(dict.fromkeys(eos)),
        name=name,
    )


def load_hf_dir(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Read a Llama / Mistral / Qwen2 checkpoint directory into float32 CPU weights."""
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json")
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    tokenizer = Tokenizer.from_hf_dir(directory)
    config = config_from_hf(raw, name=directory.name, tokenizer=tokenizer)

    state_dict: dict[str, torch.Tensor] = {}
    for file in weight_files(directory):
        for name, tensor in load_file(str(file), device="cpu").items():
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer some old checkpoints saved
            state_dict[name] = tensor.to(torch.float32)
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    check_state_dict(config, state_dict)
    return config, state_dict, tokenizer
