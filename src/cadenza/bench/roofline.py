"""The machine's GEMM roofline for a model's matmul shapes.

Times each matmul of a prefill (projections, MLP, attention score and value products, the LM
head for the last row) on this machine and thread count: the sum is the time a perfect engine,
doing nothing but those GEMMs, would need. Each shape runs as a bare ``torch.matmul`` and, for
the weight matmuls, as a oneDNN GEMM on a pre-packed weight (what Cadenza's CPU engine uses);
the roofline takes the faster, so an engine cannot beat it by picking a better kernel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cadenza.config import ModelConfig
from cadenza.model.packed_linear import onednn_linear_available, pack_weight, packed_linear


@dataclass
class GemmShape:
    name: str
    batch: int  # independent products (attention heads)
    m: int
    k: int
    n: int
    count: int  # how many times one forward pass runs it
    flop_fraction: float = 1.0  # causal attention needs half the products

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.k * self.n * self.count * self.flop_fraction


def prefill_shapes(config: ModelConfig, tokens: int) -> list[GemmShape]:
    d = config.resolved_head_dim
    h, kvh, hidden = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
    layers = config.num_hidden_layers
    inter = config.intermediate_size
    return [
        GemmShape("qkv_proj", 1, tokens, hidden, (h + 2 * kvh) * d, layers),
        GemmShape("o_proj", 1, tokens, h * d, hidden, layers),
        GemmShape("gate_up_proj", 1, tokens, hidden, 2 * inter, layers),
        GemmShape("down_proj", 1, tokens, inter, hidden, layers),
        GemmShape("attn_scores", h, tokens, d, tokens, layers, 0.5),
        GemmShape("attn_values", h, tokens, tokens, d, layers, 0.5),
        GemmShape("lm_head", 1, 1, hidden, config.vocab_size, 1),
    ]


def decode_shapes(config: ModelConfig, batch: int) -> list[GemmShape]:
    """One decode step of ``batch`` sequences: every projection at ``m = batch`` plus the LM
    head (attention over the short benchmark contexts is left out, so this is a floor)."""
    shapes = [s for s in prefill_shapes(config, batch) if not s.name.startswith("attn_")]
    for shape in shapes:
        if shape.name == "lm_head":
            shape.m = batch
    return shapes


def _fastest(fn, repeats: int) -> float:
    """A roofline is a best case, so it takes the fastest repeat: on a shared machine the median
    mixes in other processes' load and can end up slower than the engine it bounds."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return min(samples)


def time_gemm(shape: GemmShape, repeats: int = 9) -> dict[str, float]:
    """Fastest seconds of one product of this shape (all its batch entries), per kernel."""
    a = torch.randn(shape.batch, shape.m, shape.k)
    b = torch.randn(shape.batch, shape.k, shape.n)
    times = {"torch": _fastest(lambda: torch.matmul(a, b), repeats)}
    if shape.batch == 1 and onednn_linear_available():
        x = a[0]
        packed = pack_weight(b[0].t().contiguous())
        times["onednn"] = _fastest(lambda: packed_linear(x, packed), repeats)
    return times


def measure_roofline(
    config: ModelConfig, tokens: int, shapes: list[GemmShape] | None = None
) -> dict[str, float | list]:
    """Seconds and FLOP/s of a GEMM-only forward pass (a ``tokens``-token prefill by default)."""
    rows = []
    total_s = 0.0
    total_flops = 0.0
    for shape in shapes or prefill_shapes(config, tokens):
        per_kernel = {
            kernel: t * shape.count * shape.flop_fraction for kernel, t in time_gemm(shape).items()
        }
        kernel = min(per_kernel, key=per_kernel.__getitem__)
        seconds = per_kernel[kernel]
        total_s += seconds
        total_flops += shape.flops
        rows.append(
            {
                "name": shape.name,
                "shape": [shape.batch, shape.m, shape.k, shape.n],
                "count": shape.count,
                "seconds": seconds,
                "kernel": kernel,
                "gflops_per_s": shape.flops / seconds / 1e9 if seconds else 0.0,
                "gflops_per_s_by_kernel": {
                    k: shape.flops / t / 1e9 if t else 0.0 for k, t in per_kernel.items()
                },
            }
        )
    return {
        "seconds": total_s,
        "flops": total_flops,
        "gflops_per_s": total_flops / total_s / 1e9,
        "tokens_per_s": tokens / total_s,
        "shapes": rows,
    }
