"""The vLLM-compatible offline API: ``LLM(model=...).generate(...)`` and ``.chat(...)``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from cadenza.config import EngineConfig
from cadenza.core.sampling_params import SamplingParams
from cadenza.engine import LLMEngine
from cadenza.engine_api import ImportResult
from cadenza.kvstore.kv_export import KVExport
from cadenza.model.source import ModelSource
from cadenza.model.tokenizer import Tokenizer
from cadenza.outputs import RequestOutput
from cadenza.session.ids import session_id_problem
from cadenza.session.layer import SessionLayer
from cadenza.session.store import ConversationStore

Prompt = str | Sequence[int] | dict[str, Any]
Messages = list[dict[str, Any]]


class LLM:
    """Loads a model once and runs batches of prompts to completion.

    ``model`` is the alias ``smollm2-135m`` (the embedded default), a ``.gguf`` file or a Hugging
    Face model directory. ``source`` injects an already loaded model (tests use random weights).
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        *,
        source: ModelSource | None = None,
        clock: Callable[[], float] | None = None,
        **engine_options: Any,
    ) -> None:
        """``engine_options`` are the engine's knobs by their flat names (``block_size``,
        ``num_kv_blocks``, ``kv_host_gib``, ``session_store_path``, ...), declared with their
        defaults in ``cadenza.config``; an unknown name is a TypeError. ``clock`` replaces
        the monotonic clock every time-reading part of the engine uses (tests inject one)."""
        config = EngineConfig.from_options(model=model, **engine_options)
        self.engine = LLMEngine(config, source, clock=clock or time.monotonic)
        self._counter = 0

    def get_tokenizer(self) -> Tokenizer:
        if self.engine.tokenizer is None:
            raise ValueError("this model has no tokenizer")
        return self.engine.tokenizer

    @property
    def sessions(self) -> SessionLayer:
        """The durable conversation history (``session_store_path``, in memory by default),
        composed above the engine as the server does."""
        layer = self.__dict__.get("_sessions")
        if layer is None:
            path = self.engine.config.session_store_path or ":memory:"
            layer = SessionLayer(ConversationStore(path), self.engine.tokenizer)
            self.__dict__["_sessions"] = layer
        return layer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priority: Sequence[int] | None = None,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order.

        A prompt is a string, a list of token ids, or ``{"prompt": ...}`` /
        ``{"prompt_token_ids": [...]}`` (optionally with ``"cache_salt"``).
        """
        items = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(items))
        if priority is not None and len(priority) != len(items):
            raise ValueError("priority needs one value per prompt")
        ids = []
        try:
            for i, (item, p) in enumerate(zip(items, params, strict=True)):
                prompt, salt = _unpack(item, cache_salt)
                rid = self._next_id()
                prio = priority[i] if priority is not None else 0
                ids.append(self.engine.add_request(rid, prompt, p, priority=prio, cache_salt=salt))
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids)

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        cache_salt: str | None = None,
        session_id: str | None = None,
        retention: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them.

        With ``session_id``, the conversation is a session's next turn: the engine runs the
        session's stored exact token history plus the template delta of the new messages, so
        the previous turns' KV is reused wherever it lives (device, host or disk). Pass either
        only the new messages, or the whole conversation as vLLM users do: messages that
        repeat the stored transcript are recognised and skipped, as the server does.
        ``retention={"ttl_s": 30}`` keeps the session's KV pinned on the device after the turn.
        """
        if session_id is not None:
            if not _is_conversation(messages):
                raise ValueError("with session_id, pass one list of messages")
            params = sampling_params if isinstance(sampling_params, SamplingParams) else None
            if sampling_params is not None and params is None:
                raise ValueError("with session_id, pass one SamplingParams")
            rid = self.add_turn(
                session_id,
                messages,  # type: ignore[arg-type]
                params,
                tenant=cache_salt or "",
                retention=retention,
            )
            return self._run([rid])
        conversations = [messages] if _is_conversation(messages) else list(messages)
        tokenizer = self.get_tokenizer()
        prompts = [
            {"prompt_token_ids": tokenizer.encode_chat(c, add_generation_prompt)}  # type: ignore[arg-type]
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, cache_salt=cache_salt)

    def add_turn(
        self,
        session_id: str,
        messages: Messages,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        tenant: str = "",
        retention: dict[str, Any] | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a session's next turn without running it (drive it with ``step``)."""
        problem = session_id_problem(session_id)
        if problem is not None:
            raise ValueError(problem)
        rid = request_id or self._next_id()
        request = self.sessions.begin_turn(
            session_id,
            messages,
            rid,
            params,
            tenant=tenant,
            retention=retention,
            arrival_time=arrival_time,
        )
        try:
            self.engine.submit(request)
        except BaseException:
            self.sessions.abort(rid, "rejected")
            raise
        return rid

    def step(self) -> list[RequestOutput]:
        """One engine step; finished session turns are recorded in the store."""
        outputs = self.engine.step()
        for output in outputs:
            self.sessions.observe(output)
        return outputs

    def abort(self, request_id: str) -> bool:
        self.sessions.abort(request_id)
        return self.engine.abort_request(request_id)

    def reset_prefix_cache(self) -> bool:
        return self.engine.reset_prefix_cache()

    def hint(
        self, session_id: str, expected_arrival_s: float | None = None, *, tenant: str = ""
    ) -> dict[str, int]:
        """Tell the engine the session's next turn is coming; its KV moves towards the device."""
        if self.sessions.store.get_session(session_id, tenant=tenant) is None:
            raise KeyError(f"unknown session {session_id!r}")
        history = self.sessions.history(session_id)
        return self.engine.hint(
            session_id, history, cache_salt=tenant or None, expected_arrival_s=expected_arrival_s
        )

    def end_session(self, session_id: str, *, delete: bool = False, tenant: str = "") -> bool:
        """The session is over: unpin its KV (it becomes ordinary cache); optionally delete
        its stored history too."""
        store = self.sessions.store
        if store.get_session(session_id, tenant=tenant) is None:
            return False
        self.engine.end_session(self.sessions.history(session_id), tenant or None)
        if delete:
            store.delete_session(session_id, tenant=tenant)
        return True

    def session_messages(self, session_id: str) -> list[dict[str, Any]]:
        """The session's completed turns as chat messages (from the durable store)."""
        return self.sessions.store.messages(session_id)

    def export_kv(self, session_id: str, *, tenant: str = "") -> KVExport:
        """The session's cached KV (every full block of its history that this engine holds on
        any tier), checksummed, for ``import_kv`` on another engine."""
        if self.sessions.store.get_session(session_id, tenant=tenant) is None:
            raise KeyError(f"unknown session {session_id!r}")
        history = self.sessions.history(session_id)
        return self.engine.export_kv(session_id, history, tenant or None)

    def import_kv(self, export: KVExport) -> ImportResult:
        """Install another engine's export as cached KV (verified; rejected chunks are
        counted and recomputed by the next turn)."""
        return self.engine.import_kv(export)

    def close(self) -> None:
        self.engine.close()
        layer = self.__dict__.get("_sessions")
        if layer is not None:
            layer.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_id(self) -> str:
        rid = f"llm-{self._counter}"
        self._counter += 1
        return rid

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        pending = set(request_ids)
        final: dict[str, RequestOutput] = {}
        while pending:
            for output in self.step():
                if output.finished and output.request_id in pending:
                    final[output.request_id] = output
                    pending.discard(output.request_id)
            if pending and not self.engine.has_unfinished_requests():
                raise RuntimeError(f"requests vanished without finishing: {sorted(pending)}")
        return [final[rid] for rid in request_ids]


def _is_conversation(messages: Any) -> bool:
    return isinstance(messages, list) and (not messages or isinstance(messages[0], dict))


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)) or not hasattr(prompts, "__iter__"):
        raise TypeError(
            "prompts must be text, a list of token ids, a {'prompt': ...} or"
            f" {{'prompt_token_ids': [...]}} dict, or a list of those; got {type(prompts).__name__}"
        )
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _as_params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(params, SamplingParams):
        return [params] * count
    if isinstance(params, (dict, str)) or not hasattr(params, "__iter__"):
        raise TypeError(
            "sampling_params must be a SamplingParams (e.g. SamplingParams(max_tokens=32)) or"
            f" a list of them, one per prompt; got {type(params).__name__}"
        )
    params = list(params)
    wrong = [type(p).__name__ for p in params if not isinstance(p, SamplingParams)]
    if wrong:
        raise TypeError(f"sampling_params must all be SamplingParams; got {wrong[0]}")
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return params


def _unpack(item: Prompt, cache_salt: str | None) -> tuple[str | Sequence[int], str | None]:
    if isinstance(item, dict):
        salt = item.get("cache_salt", cache_salt)
        if "prompt_token_ids" in item:
            return item["prompt_token_ids"], salt
        if "prompt" in item:
            return item["prompt"], salt
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    return item, cache_salt
