"""Load a GGUF file (llama.cpp format) into float32 weights in Hugging Face Llama naming.

Every tensor is dequantized once at load; the model then runs in its own dtype. Two llama.cpp
conventions are undone here:

* GGUF lists dimensions fastest-first (``ne0`` = columns), the reverse of torch.
* ``convert_hf_to_gguf`` permutes the rows of ``q_proj``/``k_proj`` of llama-arch models so that
  llama.cpp can rotate adjacent pairs; HF rotates halves (``rotate_half``), so we permute back.
  Qwen2 files are written unpermuted (llama.cpp runs them in NeoX rope mode).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from cadenza.config import ModelConfig, RopeScaling
from cadenza.model.gguf_file import GGUFFile, Tensor, open_gguf
from cadenza.model.random_init import check_state_dict
from cadenza.model.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
# Architectures whose q/k rows convert_hf_to_gguf permutes.
_PERMUTED_ARCHITECTURES = ("llama", "mistral")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors with no HF counterpart: llama3 rope factors are turned into config.rope_scaling.
_IGNORED_TENSORS = frozenset({"rope_freqs.weight"})


def dequantize_tensor(tensor: ReaderTensor | Tensor) -> torch.Tensor:
    """A GGUF tensor as a float32 torch tensor in torch dimension order (a fresh copy)."""
    qtype = GGMLQuantizationType(tensor.tensor_type)
    values = dequantize(tensor.data, qtype)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    # F32/F16 data can be a view of the read-only memory map: copy unless we own the array.
    array = np.require(values, dtype=np.float32, requirements=["C", "W", "O"])
    return torch.from_numpy(array.reshape(shape))


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``LlamaModel.permute`` for a q/k weight (or bias).

    The forward map is ``w.reshape(n_head, 2, d // n_head // 2, *rest).swapaxes(1, 2)``; pass
    the number of query heads for q and of key/value heads for k.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot unpermute {rows} rows over {n_head} heads")
    rest = weight.shape[1:]
    return (
        weight.reshape(n_head, rows // n_head // 2, 2, *rest)
        .transpose(1, 2)
        .reshape(weight.shape)
        .contiguous()
    )


def llama3_rope_factors(scaling: RopeScaling, head_dim: int, rope_theta: float) -> list[float]:
    """Per-frequency divisors of Llama 3.x rope scaling (what llama.cpp stores as rope_freqs)."""
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * rope_theta ** (i / head_dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(scaling.factor)
        else:
            smooth = scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor
            smooth /= scaling.high_freq_factor - scaling.low_freq_factor
            factors.append(1.0 / ((1 - smooth) / scaling.factor + smooth))
    return factors


def llama3_scaling_from_rope_freqs(
    factors: list[float], head_dim: int, rope_theta: float, original_max_position_embeddings: int
) -> RopeScaling:
    """Recover the Llama 3.x rope scaling parameters from llama.cpp's ``rope_freqs`` tensor.

    GGUF keeps only the per-frequency factors, not the parameters. The factor is their maximum;
    low/high frequency factors come from a line fit over the smoothly interpolated band (or the
    Llama 3.x defaults 1/4 when that band is too narrow); the result must reproduce the tensor.
    """
    factor = float(max(factors))
    original = original_max_position_embeddings
    candidates = [RopeScaling(factor, 1.0, 4.0, original)]
    if factor > 1.0:
        xs, ys = [], []
        for i, value in zip(range(0, head_dim, 2), factors, strict=False):
            if 1.0 + 1e-6 < value < factor - 1e-6:
                # 1/value = (1 - s)/factor + s, and s = (original/wavelen - low)/(high - low).
                xs.append((1.0 / value - 1.0 / factor) / (1.0 - 1.0 / factor))
                ys.append(original / (2 * math.pi * rope_theta ** (i / head_dim)))
        if len(xs) >= 2:
            slope, low = np.polyfit(xs, ys, 1)
            candidates.append(
                RopeScaling(factor, round(float(low), 4), round(float(low + slope), 4), original)
            )
    for scaling in candidates:
        if np.allclose(llama3_rope_factors(scaling, head_dim, rope_theta), factors, rtol=1e-4):
            return scaling
    raise ValueError("rope_freqs.weight does not match Llama 3.x rope scaling; unsupported model")


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def _f32(value: float) -> float:
    """GGUF stores floats as float32: give back the short decimal they were written from."""
    return float(str(np.float32(value)))


class _Metadata:
    def __init__(self, reader: GGUFFile | GGUFReader) -> None:
        self._fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        if key not in self._fields:
            raise ValueError(f"GGUF metadata lacks {key!r}")
        return self._fields[key].contents()


def _rope_scaling(
    meta: _Metadata,
    arch: str,
    tensors: dict[str, ReaderTensor | Tensor],
    head_dim: int,
    rope_theta: float,
) -> RopeScaling | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    original = meta.get(f"{arch}.rope.scaling.original_context_length") or 8192
    if "rope_freqs.weight" in tensors:
        factors = dequantize_tensor(tensors["rope_freqs.weight"]).flatten().tolist()
        return llama3_scaling_from_rope_freqs(factors, head_dim, rope_theta, original)
    if kind in (None, "none"):
        return None
    if kind == "llama3":
        return RopeScaling(
            factor=_f32(meta.require(f"{arch}.rope.scaling.factor")),
            low_freq_factor=_f32(meta.get(f"{arch}.rope.scaling.low_freq_factor", 1.0)),
            high_freq_factor=_f32(meta.get(f"{arch}.rope.scaling.high_freq_factor", 4.0)),
            original_max_position_embeddings=original,
        )
    raise ValueError(f"unsupported rope scaling {kind!r}; only Llama 3.x scaling is supported")


def _model_config(
    meta: _Metadata, tensors: dict[str, ReaderTensor | Tensor], tokenizer: Tokenizer, name: str
) -> ModelConfig:
    arch = meta.require("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; expected one of {SUPPORTED_ARCHITECTURES}"
        )
    hidden = int(meta.require(f"{arch}.embedding_length"))
    n_head = int(meta.require(f"{arch}.attention.head_count"))
    n_kv_head = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
    head_dim = int(
        meta.get(f"{arch}.attention.key_length")
        or meta.get(f"{arch}.rope.dimension_count")
        or hidden // n_head
    )
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"partial rotary embeddings ({rope_dim} of {head_dim}) are unsupported")
    rope_theta = _f32(meta.get(f"{arch}.rope.freq_base", 10000.0))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    vocab_size = int(meta.get(f"{arch}.vocab_size") or len(tokens))
    embedding_rows = int(tensors["token_embd.weight"].shape[-1])
    if vocab_size != embedding_rows:
        raise ValueError(f"vocab_size {vocab_size} != token_embd rows {embedding_rows}")
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(meta.require(f"{arch}.feed_forward_length")),
        num_hidden_layers=int(meta.require(f"{arch}.block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv_head,
        head_dim=None if head_dim * n_head == hidden else head_dim,
        rms_norm_eps=_f32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling(meta, arch, tensors, head_dim, rope_theta),
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=tokenizer.eos_token_ids,
        name=name,
    )


def load_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Read a llama / qwen2 / mistral GGUF: its config, float32 CPU weights and tokenizer."""
    path = Path(path)
    reader = open_gguf(path)
    meta = _Metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    tokenizer = Tokenizer.from_gguf(reader)
    name = meta.get("general.name") or path.stem
    config = _model_config(meta, tensors, tokenizer, name)

    permuted = config.architecture in _PERMUTED_ARCHITECTURES
    state_dict: dict[str, torch.Tensor] = {}
    for gguf_name, tensor in tensors.items():
        if gguf_name in _IGNORED_TENSORS:
            continue
        hf_name = _hf_name(gguf_name)
        value = dequantize_tensor(tensor)
        if permuted and ".self_attn.q_proj." in hf_name:
            value = unpermute_qk(value, config.num_attention_heads)
        elif permuted and ".self_attn.k_proj." in hf_name:
            value = unpermute_qk(value, config.num_key_value_heads)
        state_dict[hf_name] = value
    check_state_dict(config, state_dict)
    return config, state_dict, tokenizer
