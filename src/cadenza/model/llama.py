"""Llama-family decoder (Llama 2/3.x, SmolLM2, Mistral, Qwen2) over a flat ragged token batch.

The forward pass takes every scheduled token of every request as one flat sequence; attention
is the only layer that needs to know where requests begin and end, and it learns that from the
step's ``AttentionMetadata``. Q/K/V and gate/up projections are fused into single matmuls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cadenza.config import ModelConfig
from cadenza.model.rope import RopeTables, RotaryEmbedding, apply_rope
from cadenza.runner.attention_metadata import AttentionMetadata, write_kv

# (query, key_cache, value_cache, meta, scale, new_key, new_value) -> output
AttentionFn = Callable[..., torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.resolved_head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(
        self,
        hidden: torch.Tensor,
        rope: RopeTables,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        attention: AttentionFn,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        tokens = hidden.shape[0]
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(rope, q, k)
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        write_kv(k, v, key_cache, value_cache, meta.slot_mapping)
        out = attention(q, key_cache, value_cache, meta, self.scale, k, v)
        return self.o_proj(out.reshape(tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        hidden: torch.Tensor,
        rope: RopeTables,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        attention: AttentionFn,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(
            self.input_layernorm(hidden), rope, kv_cache, meta, attention
        )
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head; ``forward`` returns logits only for the rows that sample."""

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        # Built on the meta device and then loaded: no random init (on meta, Embedding's
        # normal_ imports torch._dynamo, seconds of every start-up for nothing).
        shape = (config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope = RotaryEmbedding(config, max_positions)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: torch.Tensor,
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,
        attention: AttentionFn,
    ) -> torch.Tensor:
        """``kv_caches`` is ``[layers, 2, blocks, block_size, kv_heads, head_dim]``."""
        hidden = self.embed_tokens(input_ids)
        rope = self.rope.tables(positions, hidden.dtype)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, rope, kv_caches[index], meta, attention)
        hidden = self.norm(hidden.index_select(0, logits_indices))
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy weights named as in Hugging Face ``LlamaForCausalLM``, fusing q/k/v and gate/up."""
        expected = set(state_dict)
        used: set[str] = set()

        def take(name: str) -> torch.Tensor:
            if name not in state_dict:
                raise KeyError(f"weight {name!r} missing from the checkpoint")
            used.add(name)
            return state_dict[name]

        self.embed_tokens.weight.copy_(take("model.embed_tokens.weight"))
        self.norm.weight.copy_(take("model.norm.weight"))
        if not self.config.tie_word_embeddings:
            self.lm_head.weight.copy_(take("lm_head.weight"))
        for i, layer in enumerate(self.layers):
            prefix = f"model.layers.{i}."
            attn = layer.self_attn
            names = [f"{prefix}self_attn.{p}_proj" for p in ("q", "k", "v")]
            attn.qkv_proj.weight.copy_(torch.cat([take(n + ".weight") for n in names]))
            if attn.qkv_proj.bias is not None:
                attn.qkv_proj.bias.copy_(torch.cat([take(n + ".bias") for n in names]))
            attn.o_proj.weight.copy_(take(f"{prefix}self_attn.o_proj.weight"))
            gate_up = [take(f"{prefix}mlp.{p}_proj.weight") for p in ("gate", "up")]
            layer.mlp.gate_up_proj.weight.copy_(torch.cat(gate_up))
            layer.mlp.down_proj.weight.copy_(take(f"{prefix}mlp.down_proj.weight"))
            layer.input_layernorm.weight.copy_(take(f"{prefix}input_layernorm.weight"))
            layer.post_attention_layernorm.weight.copy_(
                take(f"{prefix}post_attention_layernorm.weight")
            )
        unused = expected - used - {"lm_head.weight"}
        if unused:
            raise KeyError(f"unexpected weights in the checkpoint: {sorted(unused)[:5]}")
