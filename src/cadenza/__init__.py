"""Cadenza: a stateful LLM serving engine (paged KV, continuous batching, prefix caching).

Attributes load lazily so that ``cadenza.core`` (scheduler, block pool) stays importable
without torch, as the simulator and the router need.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"

_LOCATIONS = {
    "LLM": "cadenza.llm",
    "SamplingParams": "cadenza.core.sampling_params",
    "RequestOutput": "cadenza.outputs",
    "CompletionOutput": "cadenza.outputs",
}


def __getattr__(name: str) -> Any:
    if name not in _LOCATIONS:
        raise AttributeError(f"module 'cadenza' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LOCATIONS[name]), name)
