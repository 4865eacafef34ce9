"""Incremental detokenization for streaming output.

Decoding token by token is wrong in two ways: a character may be split over several byte-level
tokens (an emoji is often 2-4 tokens), and some tokenizers decode a token differently depending
on what precedes it. So, as vLLM does, we decode a small sliding window twice -- once up to the
text already emitted (``read_offset``) and once including the new tokens -- and emit only the
difference, holding it back while it ends in an incomplete character (U+FFFD).
"""

from __future__ import annotations

from collections.abc import Sequence

from cadenza.model.tokenizer import Tokenizer

# Prompt tokens kept as left context for the first output tokens (vLLM uses the same number).
INITIAL_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas.

    ``ids[prefix_offset:read_offset]`` is the context whose text was already emitted;
    ``ids[read_offset:]`` are tokens whose text is still pending.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-INITIAL_CONTEXT_TOKENS:])
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._num_context = len(context)
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        return "".join(self._chunks)

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context :]

    def push(self, new_token_ids: Sequence[int]) -> str:
        """Add generated tokens; return the text they complete (possibly empty)."""
        if not new_token_ids:
            return ""
        self._ids.extend(new_token_ids)
        decode = self.tokenizer.decode
        window = self._ids[self._prefix_offset :]
        prefix_text = decode(
            window[: self._read_offset - self._prefix_offset],
            skip_special_tokens=self.skip_special_tokens,
        )
        new_text = decode(window, skip_special_tokens=self.skip_special_tokens)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            # Nothing new yet (a skipped special token), or a character is still incomplete.
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._chunks.append(delta)
        return delta
