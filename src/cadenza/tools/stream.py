"""Tool calls out of a streamed reply: content is passed on as it comes until a call marker
appears (text that may still turn into a marker is held back), then each call is sent once it
is complete, and the rest when the reply ends. The OpenAI SDK accumulates a call from deltas
keyed by ``index``; a complete call in one delta is valid."""

from __future__ import annotations

from dataclasses import dataclass, field

from cadenza.tools.parsers import ToolCall, ToolParser


@dataclass
class StreamEvents:
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)


class ToolCallStream:
    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.sent = 0  # content sent up to here
        self.region: int | None = None  # where the calls begin, once a marker is seen
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> StreamEvents:
        self.text += delta
        out = StreamEvents()
        if self.region is None:
            found = [p for m in self.parser.markers if (p := self.text.find(m, self.sent)) >= 0]
            if found:
                self.region = min(found)
                out.content = self.text[self.sent : self.region]
                self.sent = self.region
            else:
                end = len(self.text) - self._held_back()
                out.content = self.text[self.sent : end]
                self.sent = max(self.sent, end)
        if self.region is not None:
            region = self.text[self.region :]
            done = self.parser.complete_prefix(region)
            if done:
                out.calls = self._new_calls(self.parser.parse(region[:done]).calls)
        return out

    def finish(self) -> StreamEvents:
        """What is left when the reply ends: the last calls, or text that was no call."""
        if self.region is None:
            out = StreamEvents(self.text[self.sent :])
            self.sent = len(self.text)
            return out
        parsed = self.parser.parse(self.text[self.region :])
        if not parsed.calls and not self.calls:
            out = StreamEvents(self.text[self.sent :])
            self.sent = len(self.text)
            return out
        return StreamEvents("", self._new_calls(parsed.calls))

    def _new_calls(self, calls: list[ToolCall]) -> list[ToolCall]:
        fresh = calls[len(self.calls) :]
        self.calls += fresh
        return fresh

    def _held_back(self) -> int:
        """Length of the longest end of the text that begins some marker."""
        tail = self.text[self.sent :]
        best = 0
        for marker in self.parser.markers:
            for k in range(min(len(marker) - 1, len(tail)), best, -1):
                if tail.endswith(marker[:k]):
                    best = k
                    break
        return best
