"""The durable history above the engine: the conversation store, chat templates, and the
turns in flight.

The engine runs token ids; this layer owns what a conversation *is*. A turn begins here (the
session is created if new, a pending turn is recorded, and its token sequence is built: the
exact stored history plus the template delta of the new messages), is submitted to any engine
as an ``EngineRequest`` (in-process, or a worker in a cluster), and ends here when its final
output arrives (the generated tokens are appended to the history) or when it is aborted.
The single-node server and the offline ``LLM`` compose it in-process; the cluster router will
own it for all its workers. Nothing here imports torch, and none of it runs on the engine's
step path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from cadenza.core.sampling_params import SamplingParams
from cadenza.engine_api import EngineRequest
from cadenza.model.tokenizer import Tokenizer
from cadenza.outputs import RequestOutput
from cadenza.session.manager import Retention, SessionManager, TurnPlan
from cadenza.session.store import ConversationStore
from cadenza.session.tool_ttl import ToolTTLLearner
from cadenza.tools.template import ToolContext

log = logging.getLogger("cadenza.sessions")


class SessionLayer:
    def __init__(
        self,
        store: ConversationStore,
        tokenizer: Tokenizer | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        tool_ttl: ToolTTLLearner | None = None,
    ) -> None:
        self.store = store
        self.manager = SessionManager(store, tokenizer)
        self.clock = clock
        # How long to pin a session through each tool call, learned per tenant and tool.
        self.tool_ttl = tool_ttl or ToolTTLLearner()
        self.turns: dict[str, TurnPlan] = {}  # request id -> its turn, while in flight
        self.num_interrupted_turns = store.recover_interrupted()
        if self.num_interrupted_turns:
            log.warning(
                "%d turn(s) left pending by an earlier process were marked interrupted; their"
                " sessions continue from their last complete turn",
                self.num_interrupted_turns,
            )

    # ------------------------------------------------------------------ turns
    def new_messages(
        self, session_id: str, messages: Sequence[dict[str, Any]], tenant: str = ""
    ) -> list[dict[str, Any]]:
        """The messages of ``messages`` that the session does not hold yet: a client may send
        only the new ones, or resend the whole conversation (as vLLM and OpenAI clients do);
        leading messages that repeat the stored transcript are recognised and skipped."""
        messages = list(messages)
        if self.store.get_session(session_id, tenant=tenant) is None:
            return messages
        stored = self.store.messages(session_id)
        same = len(stored) <= len(messages) and all(
            a.get("role") == b.get("role") and a.get("content") == b.get("content")
            for a, b in zip(stored, messages, strict=False)
        )
        new = messages[len(stored) :] if stored and same else messages
        if not new:
            raise ValueError("the session already holds every message sent; send a new message")
        return new

    def begin_turn(
        self,
        session_id: str,
        messages: Sequence[dict[str, Any]],
        request_id: str,
        params: SamplingParams | None = None,
        *,
        tenant: str = "",
        retention: Retention | dict[str, Any] | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        api: str = "chat",
        recognise_history: bool = True,
        tools: ToolContext | None = None,
    ) -> EngineRequest:
        """Record the session's next turn as pending and return the request to run for it.
        Raises ValueError (nothing recorded) for a bad turn, a session with a turn in flight
        (``TurnInProgressError``) or one that belongs to another API
        (``SessionNamespaceError``). ``tools`` are rendered into the turn (see
        ``cadenza.tools.template``: a template without tools gets them in the first turn's
        system message)."""
        keep = Retention.parse(retention)
        new = self.new_messages(session_id, messages, tenant) if recognise_history else messages
        template_tools = None
        if tools is not None:
            first = not self.store.messages(session_id)
            new, template_tools = tools.prepare(list(new), first), tools.template_tools()
        plan = self.manager.begin_turn(
            session_id, list(new), request_id, tenant=tenant, api=api, tools=template_tools
        )
        self.turns[request_id] = plan
        self.tool_ttl.turn_arrived(session_id, self.clock())
        return self._request(plan, params, tenant, keep, priority, arrival_time)

    def begin_raw_turn(
        self,
        session_id: str,
        input_token_ids: Sequence[int],
        request_id: str,
        params: SamplingParams | None = None,
        *,
        tenant: str = "",
        retention: Retention | dict[str, Any] | None = None,
        arrival_time: float | None = None,
        api: str = "chat",
    ) -> EngineRequest:
        """A turn given as token ids to append (completions-style sessions, traces)."""
        keep = Retention.parse(retention)
        plan = self.manager.begin_raw_turn(
            session_id, input_token_ids, request_id, tenant=tenant, api=api
        )
        self.turns[request_id] = plan
        self.tool_ttl.turn_arrived(session_id, self.clock())
        return self._request(plan, params, tenant, keep, 0, arrival_time)

    def _request(
        self,
        plan: TurnPlan,
        params: SamplingParams | None,
        tenant: str,
        keep: Retention | None,
        priority: int,
        arrival_time: float | None,
    ) -> EngineRequest:
        return EngineRequest.of(
            plan.request_id,
            plan.token_ids,
            sampling_params=params or SamplingParams(),
            session_id=plan.session_id,
            num_history_tokens=max(plan.num_history_tokens - 1, 0),
            retention_ttl_s=keep.ttl_s if keep else 0.0,
            priority=priority,
            cache_salt=tenant or None,
            arrival_time=arrival_time,
        )

    def tool_called(self, session_id: str, tenant: str, tools: Sequence[str]) -> float:
        """The session's turn ended calling ``tools``: the learned TTL to pin its KV for
        while they run (0: do not pin; the KV goes down a tier like any idle session's)."""
        return self.tool_ttl.tool_called(session_id, tenant, list(tools), self.clock())

    def observe(self, output: RequestOutput) -> None:
        """Record a finished turn's generated tokens (no-op for other outputs)."""
        if not output.finished:
            return
        plan = self.turns.pop(output.request_id, None)
        if plan is None:
            return
        completion = output.outputs[0]
        if completion.finish_reason == "abort":
            self.manager.abort_turn(plan)
            return
        self.manager.complete_turn(
            plan, completion.token_ids, completion.text, completion.finish_reason
        )

    def abort(self, request_id: str, reason: str = "aborted") -> None:
        """The turn will not finish (rejected, client gone, engine failure): not history."""
        plan = self.turns.pop(request_id, None)
        if plan is not None:
            self.manager.abort_turn(plan, reason)

    def in_flight(self, request_id: str) -> bool:
        return request_id in self.turns

    # ------------------------------------------------------------------ queries
    def history(self, session_id: str) -> list[int]:
        return self.store.history_token_ids(session_id)

    def template_delta(
        self,
        prior: list[dict[str, Any]],
        messages: list[dict[str, Any]],
        history: list[int],
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        return self.manager.template_delta(prior, messages, history, tools)

    def close(self) -> None:
        self.store.close()
