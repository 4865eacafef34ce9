"""Per-request sampling parameters, compatible with vLLM's ``SamplingParams`` field names.

Torch-free on purpose: the API layer and the scheduler build and validate these without
importing the runner.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from cadenza.structured.spec import StructuredOutput

# Temperatures below this are treated as greedy decoding (same threshold as vLLM).
GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20


def _bad(name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_int(name: str, value: object, allowed: str) -> None:
    # bool is a subclass of int, but ``top_k=True`` is certainly a caller bug.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(name, value, allowed)


def _check_float(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _bad(name, value, "a number")
    return float(value)


@dataclass
class SamplingParams:
    """How to sample the tokens of one request.

    Only ``n == 1`` is supported. ``top_k`` 0 or -1 disables top-k; ``max_tokens=None`` means
    "up to the context limit"; ``logprobs`` is the number of top alternatives returned for each
    sampled token (0 = only the sampled token's own logprob). After construction ``stop`` and
    ``stop_token_ids`` are tuples. ``structured_output`` constrains the text to a grammar (JSON
    schema, JSON object, Lark or regex), enforced on the logits of every sampled token.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] | tuple[str, ...] | str | None = None
    stop_token_ids: list[int] | tuple[int, ...] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        self._validate_counts()
        self._validate_floats()
        self._normalise_stops()
        spec = self.structured_output
        if spec is not None and not isinstance(spec, StructuredOutput):
            raise _bad("structured_output", spec, "a StructuredOutput or None")
        if spec is not None:
            # A grammar that cannot compile would end the request at once, with no error.
            try:
                spec.check()
            except ValueError as exc:
                raise ValueError(f"structured_output is not usable: {exc}") from None

    def _validate_counts(self) -> None:
        _check_int("n", self.n, "1 (only n=1 is supported)")
        if self.n != 1:
            raise _bad("n", self.n, "1 (only n=1 is supported)")
        _check_int("top_k", self.top_k, "an int >= -1 (0 or -1 disables top-k)")
        if self.top_k < -1:
            raise _bad("top_k", self.top_k, "an int >= -1 (0 or -1 disables top-k)")
        if self.seed is not None:
            _check_int("seed", self.seed, "an int or None")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, "an int >= 1 or None")
            if self.max_tokens < 1:
                raise _bad("max_tokens", self.max_tokens, "an int >= 1 or None")
        upper = "max_tokens" if self.max_tokens is not None else "infinity"
        _check_int("min_tokens", self.min_tokens, f"an int in [0, {upper}]")
        if self.min_tokens < 0 or (
            self.max_tokens is not None and self.min_tokens > self.max_tokens
        ):
            raise _bad(
                "min_tokens", self.min_tokens, f"an int in [0, max_tokens={self.max_tokens}]"
            )
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, f"an int in [0, {MAX_LOGPROBS}] or None")
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise _bad("logprobs", self.logprobs, f"an int in [0, {MAX_LOGPROBS}] or None")

    def _validate_floats(self) -> None:
        # Written as ``not (lo <= x <= hi)`` so that NaN is rejected too.
        t = _check_float("temperature", self.temperature)
        if not t >= 0.0 or t == float("inf"):
            raise _bad("temperature", self.temperature, "a finite number >= 0")
        p = _check_float("top_p", self.top_p)
        if not 0.0 < p <= 1.0:
            raise _bad("top_p", self.top_p, "in (0, 1]")
        m = _check_float("min_p", self.min_p)
        if not 0.0 <= m <= 1.0:
            raise _bad("min_p", self.min_p, "in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= _check_float(name, value) <= 2.0:
                raise _bad(name, value, "in [-2, 2]")
        r = _check_float("repetition_penalty", self.repetition_penalty)
        if not 0.0 < r < float("inf"):
            raise _bad("repetition_penalty", self.repetition_penalty, "a finite number > 0")

    def _normalise_stops(self) -> None:
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise _bad("stop", self.stop, "non-empty strings")
        self.stop = tuple(stop)
        ids = () if self.stop_token_ids is None else tuple(self.stop_token_ids)
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise _bad("stop_token_ids", self.stop_token_ids, "non-negative ints")
        self.stop_token_ids = ids

    @property
    def is_greedy(self) -> bool:
        """True when the request decodes by argmax (temperature ~ 0)."""
        return self.temperature < GREEDY_EPS

    def clone(self) -> SamplingParams:
        """An independent copy (all fields are immutable once normalised)."""
        return copy.copy(self)
