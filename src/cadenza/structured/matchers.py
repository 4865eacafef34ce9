"""One grammar matcher per constrained request, advanced on its accepted tokens, and the
step's token bitmask for the sampler.

The engine's output path appends each sampled token to ``Request.output_token_ids``; a matcher
here remembers how many of them it has consumed and catches up before the next mask, so it
advances on exactly the tokens the request accepted (also after a preemption, whose recompute
keeps the output tokens). A matcher is dropped once its request finishes or is gone. The masks
of a batch are computed into one ``[rows, ceil(vocab / 32)]`` int32 array (bit ``t % 32`` of
word ``t // 32`` set: token ``t`` allowed), in parallel across requests by llguidance's
executor. Torch-free: the sampler applies the array.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import llguidance
import llguidance.numpy as llnp
import numpy as np

from cadenza.core.sampling_params import SamplingParams

_TEMPLATE_CACHE = 64


class ConstrainedRequest(Protocol):
    """What a matcher needs of a request (``core.request.Request`` has it)."""

    request_id: str
    sampling_params: SamplingParams
    output_token_ids: list[int]

    @property
    def is_finished(self) -> bool: ...


@dataclass
class _Entry:
    matcher: llguidance.LLMatcher
    owner: weakref.ref  # the request; a dead or finished one releases the matcher
    consumed: int = 0


@dataclass
class StepMasks:
    """The bitmask rows of one step: ``rows[i]`` is the sampling row masked by ``bitmask[i]``."""

    rows: list[int]
    bitmask: np.ndarray  # [len(rows), words] int32


class GrammarMatchers:
    """The per-request matchers of one engine (used on its step thread only)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = [t for t in eos_token_ids if 0 <= t < vocab_size]
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer_json, n_vocab=vocab_size, eos_token=self.eos_token_ids or None
        )
        self.words = (vocab_size + 31) // 32
        self._entries: dict[str, _Entry] = {}
        self._templates: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._executor = llguidance.LLExecutor()
        self._eos_only = np.zeros(self.words, dtype=np.int32)
        for t in self.eos_token_ids:
            self._eos_only[t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))

    def __len__(self) -> int:
        return len(self._entries)

    def masks(self, requests: Sequence[ConstrainedRequest]) -> StepMasks | None:
        """The bitmask of every constrained request among ``requests`` (sampling order), or
        None when none is constrained."""
        self._release_finished()
        rows = [i for i, r in enumerate(requests) if r.sampling_params.structured_output]
        if not rows:
            return None
        bitmask = np.empty((len(rows), self.words), dtype=np.int32)
        live: list[tuple[llguidance.LLMatcher, int]] = []
        for k, i in enumerate(rows):
            matcher = self._advance(requests[i])
            if matcher.is_error() or matcher.is_stopped():
                bitmask[k] = self._eos_only  # done (or broken): it can only end
            else:
                live.append((matcher, k))
        if len(live) == 1:
            matcher, k = live[0]
            llnp.fill_next_token_bitmask(matcher, bitmask, k)
        elif live:
            llnp.fill_next_token_bitmask_par(self._executor, live, bitmask)
        return StepMasks(rows, bitmask)

    def _advance(self, request: ConstrainedRequest) -> llguidance.LLMatcher:
        entry = self._entries.get(request.request_id)
        if entry is None or entry.owner() is not request:
            entry = _Entry(self._new_matcher(request.sampling_params), weakref.ref(request))
            self._entries[request.request_id] = entry
        tokens = request.output_token_ids
        if entry.consumed < len(tokens):
            if not entry.matcher.is_error():
                entry.matcher.consume_tokens(tokens[entry.consumed :])
            entry.consumed = len(tokens)
        return entry.matcher

    def _new_matcher(self, params: SamplingParams) -> llguidance.LLMatcher:
        spec = params.structured_output
        assert spec is not None
        grammar = spec.grammar()
        template = self._templates.get(grammar)
        if template is None:
            template = llguidance.LLMatcher(self.tokenizer, grammar)
            self._templates[grammar] = template
            while len(self._templates) > _TEMPLATE_CACHE:
                self._templates.popitem(last=False)
        self._templates.move_to_end(grammar)
        return template.deep_copy()

    def _release_finished(self) -> None:
        gone = [
            rid
            for rid, entry in self._entries.items()
            if (request := entry.owner()) is None or request.is_finished
        ]
        for rid in gone:
            del self._entries[rid]
