"""Linear layers whose weights are packed once for oneDNN's CPU GEMM.

``torch.nn.functional.linear`` on CPU calls MKL's sgemm, which re-packs the weight matrix on
every call and, on AMD cores, runs without its AVX-512 kernels. A decode step multiplies a
few dozen rows by every weight matrix, so that packing is most of the work: on the 2-core
AVX-512 machine of ``docs/benchmarks/engine.md`` oneDNN with pre-packed weights runs the
SmolLM2 projections 2-4x faster at 32 rows and the LM head 5x faster (``cadenza bench
engine`` measures both in its roofline table). Packing happens once at load; the packed
tensor replaces the plain weight, so memory does not grow (the tied LM head keeps the
embedding table it shares, plus its packed copy).

oneDNN's result for a row does not depend on the other rows in the batch, which keeps greedy
outputs identical whatever the batch composition. vLLM's CPU backend uses oneDNN the same way.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

LinearBackend = Literal["auto", "torch", "onednn"]
LINEAR_BACKENDS: tuple[str, ...] = ("auto", "torch", "onednn")

# Rows per call the packed layout is tuned for (a decode batch); any row count works.
PACKING_BATCH_HINT = 32


def onednn_linear_available() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def use_onednn(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """``auto`` packs float32 CPU weights when this torch build has oneDNN."""
    if backend not in LINEAR_BACKENDS:
        choices = ", ".join(LINEAR_BACKENDS)
        raise ValueError(f"linear backend must be one of {choices}; got {backend!r}")
    if backend == "torch":
        return False
    fits = device.type == "cpu" and dtype == torch.float32 and onednn_linear_available()
    if backend == "onednn" and not fits:
        raise ValueError(
            "the onednn linear backend needs float32 on CPU and a torch built with oneDNN"
        )
    return fits


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` float32 weight in oneDNN's blocked layout (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(
        weight.detach().contiguous(), batch_size=PACKING_BATCH_HINT
    )


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T + b`` for 2-D ``x`` with a weight from :func:`pack_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """Drop-in for an inference-only ``nn.Linear`` over 2-D inputs."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.register_buffer("packed_weight", pack_weight(linear.weight), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed_weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn"


def pack_linears(module: nn.Module) -> int:
    """Swap every ``nn.Linear`` below ``module`` for a :class:`PackedLinear`; returns the count."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child))
            count += 1
        else:
            count += pack_linears(child)
    return count
