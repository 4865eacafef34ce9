"""What a step costs: the shape of a scheduled batch, and the cost models that price it.

A step is priced from its shape alone (``StepShape``): the tokens it computes, how many of them
are prefill (or recompute) and how many are single decode tokens, the attention work (query x
key pairs, causal), the KV it reads, and how many rows sample. The CPU model is linear in those
features, fitted to this engine on this machine (``calibrate``); the GPU model is a roofline
(``roofline``). Both also give what the rest of the system needs from a cost model: Pensieve's
per-chunk recompute cost for eviction, and a prefill cost per token for placement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cadenza.core.eviction import CHUNK_TOKENS, CostModel
from cadenza.core.scheduler import SchedulerOutput


@dataclass(frozen=True)
class StepShape:
    tokens: int = 0  # every token computed this step
    decode_seqs: int = 0  # chunks of one token at the end of their sequence
    seqs: int = 0  # chunks (sequences) in the batch
    attention_pairs: int = 0  # sum over computed tokens of the positions each attends
    context_tokens: int = 0  # KV positions read: each chunk's end position
    sampled: int = 0  # rows that reach the LM head
    decode_pairs: int = 0  # of ``attention_pairs``, those of the decode tokens (one row each)

    @property
    def prefill_tokens(self) -> int:
        return self.tokens - self.decode_seqs


def causal_pairs(start: int, end: int) -> int:
    """Query-key pairs of computing positions ``[start, end)`` causally over ``[0, end)``."""
    return (end - start) * (start + end + 1) // 2


def step_shape(plan: SchedulerOutput) -> StepShape:
    tokens = decode = pairs = context = sampled = decode_pairs = 0
    for chunk in plan.chunks:
        segments = chunk.segments
        end = segments[-1][1]
        if len(segments) == 1:
            start = segments[0][0]
            n = end - start
            pairs += causal_pairs(start, end)
        else:
            n = chunk.num_tokens
            for start, stop in segments:
                pairs += causal_pairs(start, stop)
        tokens += n
        if n == 1 and chunk.samples and end > 1:
            decode += 1
            decode_pairs += end  # causal_pairs(end - 1, end)
        context += end
        sampled += chunk.samples
    return StepShape(tokens, decode, len(plan.chunks), pairs, context, sampled, decode_pairs)


def decode_shape(num_seqs: int, context_tokens: int) -> StepShape:
    """A plain decode step: ``num_seqs`` sequences (each at least 2 tokens long) computing
    their newest token, over ``context_tokens`` positions in all (the sum of their lengths):
    what ``step_shape`` gives for that plan."""
    return StepShape(
        num_seqs, num_seqs, num_seqs, context_tokens, context_tokens, num_seqs, context_tokens
    )


class StepCost(Protocol):
    """Prices a step; the simulator's executors advance the virtual clock by it."""

    def step_seconds(self, shape: StepShape) -> float: ...


def prefill_shape(start: int, end: int) -> StepShape:
    """One sequence computing ``[start, end)`` and sampling at the end."""
    return StepShape(
        tokens=end - start,
        seqs=1,
        attention_pairs=causal_pairs(start, end),
        context_tokens=end,
        sampled=1,
    )


def prefill_s_per_token(cost: StepCost, tokens: int = 1024) -> float:
    """Marginal cost of a prefill token (for placement's recompute-or-move estimate)."""
    full = cost.step_seconds(prefill_shape(0, tokens))
    none = cost.step_seconds(StepShape())
    return max(full - none, 1e-12) / tokens


def recompute_cost_model(cost: StepCost, max_context: int) -> CostModel:
    """Pensieve's ``Cost(l)``: recomputing a 32-token chunk that ends at position ``l``, priced
    at powers of two as the real engine profiles it (without the step's fixed cost)."""
    positions = [CHUNK_TOKENS]
    while positions[-1] < max_context:
        positions.append(positions[-1] * 2)
    none = cost.step_seconds(StepShape())
    seconds = [
        max(cost.step_seconds(prefill_shape(p - CHUNK_TOKENS, p)) - none, 1e-9) for p in positions
    ]
    return CostModel(tuple(positions), tuple(seconds))
