"""What every route needs: the engine, the session layer, the served model's names, tenants,
remembered replies."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from cadenza.server.async_engine import AsyncEngine
from cadenza.server.chat_prompt import GenerationMemory
from cadenza.server.errors import APIError
from cadenza.session.layer import SessionLayer
from cadenza.session.store import ConversationStore


def tenant_name(api_key: str) -> str:
    """A tenant id derived from its key: stable across restarts, never the key itself."""
    return "t-" + hashlib.sha256(api_key.encode()).hexdigest()[:16]


@dataclass
class ServerState:
    engine: AsyncEngine
    model_name: str
    aliases: frozenset[str] = frozenset()
    api_keys: dict[str, str] = field(default_factory=dict)  # key -> tenant
    memory: GenerationMemory = field(default_factory=GenerationMemory)
    max_body_bytes: int = 4 << 20
    created: int = field(default_factory=lambda: int(time.time()))
    extras: dict[str, Any] = field(default_factory=dict)  # optional components (metrics, ...)
    # The durable history above the engine (opened on first use on the engine's store file).
    session_layer: SessionLayer | None = None

    @property
    def sessions(self) -> SessionLayer:
        """The conversation store and turns in flight; used on the event loop only."""
        if self.session_layer is None:
            path = self.engine.config.session_store_path or ":memory:"
            self.session_layer = SessionLayer(ConversationStore(path), self.engine.tokenizer)
        return self.session_layer

    @classmethod
    def with_keys(cls, engine: AsyncEngine, model_name: str, keys: list[str], **kw: Any):
        return cls(engine, model_name, api_keys={k: tenant_name(k) for k in keys}, **kw)

    def check_model(self, model: str) -> None:
        if model != self.model_name and model not in self.aliases:
            raise APIError(
                404,
                f"model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )


def get_state(request: Request) -> ServerState:
    return request.app.state.cadenza


def tenant_of(request: Request) -> str:
    """The caller's tenant (its cache salt and session namespace). With ``--api-key`` set,
    a missing or unknown Bearer key is a 401; without keys everyone is the tenant ``""``."""
    state = get_state(request)
    if not state.api_keys:
        return ""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    tenant = state.api_keys.get(key.strip())
    if tenant is None:
        raise APIError(
            401,
            "invalid API key",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return tenant


def scoped_session(tenant: str, session_id: str) -> str:
    """The store's id for a client's session: tenants never share (or collide on) ids."""
    return f"{tenant}:{session_id}" if tenant else session_id
