"""The GPU cost model: a roofline of each step over a model's shape and a GPU's peaks.

A step runs the decoder's matrix multiplies over all its tokens and attention over each
sequence's context. Each phase takes the longer of its compute time and its memory time:

* GEMMs: ``2 * tokens * params`` FLOPs (plus the LM head for sampling rows) against reading the
  weights once per step;
* attention: ``4 * layers * heads * head_dim`` FLOPs per attended query-key pair (QK^T and PV)
  against reading the KV each sequence attends (and writing the new tokens' KV);

plus a fixed per-step overhead (kernel launches, scheduling, sampling) and a per-sequence one.
The efficiencies (what fraction of a peak each phase reaches) are parameters, stated here and
settable from the command line; the defaults are typical of vLLM-class engines on these parts
(dense GEMMs ~60% of tensor peak, paged attention ~40%, ~80% of HBM bandwidth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from cadenza.sim.hardware import GPUSpec
from cadenza.sim.model_shapes import ModelShape
from cadenza.sim.step_cost import StepShape


@dataclass(frozen=True)
class RooflineParams:
    matmul_efficiency: float = 0.6
    attention_efficiency: float = 0.4
    memory_efficiency: float = 0.8
    step_overhead_s: float = 2e-3
    seq_overhead_s: float = 2e-5
    memory_utilization: float = 0.9  # of GPU memory the engine may use (weights + KV)
    activation_reserve_bytes: int = 2 << 30  # kept free for activations and workspace

    def updated(self, assignments: list[str]) -> RooflineParams:
        """These parameters with ``name=value`` assignments applied (CLI ``--gpu-param``)."""
        names = {f.name: f.type for f in fields(self)}
        changes: dict[str, float | int] = {}
        for item in assignments:
            name, sep, value = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in names:
                raise ValueError(
                    f"--gpu-param wants NAME=VALUE with NAME one of {', '.join(names)}"
                )
            kind = int if name == "activation_reserve_bytes" else float
            try:
                changes[name] = kind(value)
            except ValueError:
                raise ValueError(
                    f"--gpu-param {name} wants {'an integer' if kind is int else 'a number'};"
                    f" got {value.strip()!r}"
                ) from None
            amount = changes[name]
            if name == "memory_utilization" and not 0 < amount <= 1:
                raise ValueError(
                    f"--gpu-param {name} is the share of GPU memory the engine may use, a"
                    f" fraction in (0, 1]; got {value.strip()}"
                )
            if name in _EFFICIENCIES and not (math.isfinite(amount) and amount > 0):
                raise ValueError(
                    f"--gpu-param {name} must be a number > 0 (1: the hardware's peak; above"
                    f" it: a what-if faster than the hardware); got {value.strip()}"
                )
            if not (math.isfinite(amount) and amount >= 0):
                raise ValueError(
                    f"--gpu-param {name} must be a finite number >= 0; got {value.strip()}"
                )
        return replace(self, **changes)  # type: ignore[arg-type]


# Fractions of a peak: 0 would price a step at infinity. Above 1 is allowed, as a what-if (the
# compute-free ceiling of the SYMPHONY reproduction sets them to 1e6).
_EFFICIENCIES = ("matmul_efficiency", "attention_efficiency", "memory_efficiency")


class RooflineCost:
    def __init__(self, model: ModelShape, gpu: GPUSpec, params: RooflineParams) -> None:
        self.model = model
        self.gpu = gpu
        self.params = params
        peak = gpu.peak_tflops * 1e12
        self._matmul_flops_per_s = peak * params.matmul_efficiency
        self._attention_flops_per_s = peak * params.attention_efficiency
        self._bytes_per_s = gpu.hbm_gbps * 1e9 * params.memory_efficiency
        self._pair_flops = 4 * model.num_layers * model.num_heads * model.head_dim
        # The shape's integer sizes, read once (a step is priced millions of times).
        self._linear_params = model.linear_params
        self._head_params = model.head_params
        self._dtype_bytes = model.dtype_bytes
        self._kv_bytes_per_token = model.kv_bytes_per_token

    def step_seconds(self, shape: StepShape) -> float:
        p = self.params
        if shape.seqs == 0:
            return 0.0
        linear, head = self._linear_params, self._head_params
        gemm_flops = 2 * shape.tokens * linear + 2 * shape.sampled * head
        weight_bytes = (linear + (head if shape.sampled else 0)) * self._dtype_bytes
        gemm = max(gemm_flops / self._matmul_flops_per_s, weight_bytes / self._bytes_per_s)
        attn_flops = self._pair_flops * shape.attention_pairs
        kv_bytes = self._kv_bytes_per_token * (shape.context_tokens + shape.tokens)
        attention = max(attn_flops / self._attention_flops_per_s, kv_bytes / self._bytes_per_s)
        return p.step_overhead_s + p.seq_overhead_s * shape.seqs + gemm + attention

    def kv_cache_bytes(self) -> int:
        """Device memory left for the KV pool after the weights and the activation reserve."""
        p = self.params
        free = int(self.gpu.memory_bytes * p.memory_utilization)
        free -= self.model.weight_bytes + p.activation_reserve_bytes
        if free <= 0:
            raise ValueError(
                f"{self.model.name} ({self.model.weight_bytes / 1e9:.1f} GB of weights) does not"
                f" fit on {self.gpu.name} ({self.gpu.memory_bytes / 1e9:.1f} GB at"
                f" {p.memory_utilization:.0%} utilisation) with room for a KV cache"
            )
        return free
