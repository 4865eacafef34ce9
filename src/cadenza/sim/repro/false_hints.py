"""False hints: advisory requests that no request follows (a user starts typing, then leaves).

The trace format only carries true hints (``hint_lead_s`` on a turn that comes), and the
simulated client sends only those; so a false hint is added to a run from outside, through
what a ``Simulation`` exposes: when a session's reply finishes, the hook draws how many false
hints it sends during the following think gap (``per_reply`` on average), and at a uniform
moment of that gap calls the router's ``hint`` with the session's history then and a lead
drawn from the trace's own hint leads. The session's real next turn still comes when the
trace says (or never, after its last turn). A false hint therefore costs what SYMPHONY would
pay for one: a placement, a KV migration it did not need, and a pin on the destination.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cadenza.core.request import Request
from cadenza.sim.simulator import Simulation


@dataclass(frozen=True)
class FalseHints:
    per_reply: float  # false hints per finished reply, on average
    seed: int = 0
    gap_s: float = 30.0  # the gap after a session's last reply (it has no next turn)

    @property
    def key(self) -> str:
        return f"false-hints:{self.per_reply:.6f}:{self.seed}:{self.gap_s}"

    @staticmethod
    def for_fraction(fraction: float, hinted_share: float, seed: int = 0) -> FalseHints:
        """Hints of which ``fraction`` are false, when ``hinted_share`` of replies are followed
        by a true hint: ``fraction / (1 - fraction)`` false per true one."""
        if not 0.0 <= fraction < 1.0:
            raise ValueError("the false-hint fraction must be in [0, 1)")
        return FalseHints(fraction / (1.0 - fraction) * hinted_share, seed)

    def install(self, sim: Simulation) -> Callable[[], dict[str, Any]]:
        rng = random.Random(self.seed)
        client, router, events = sim.client, sim.router, sim.events
        leads = sorted(t.hint_lead_s for t in sim.turns if t.hint_lead_s is not None) or [1.0]
        sent = {"false_hints": 0}
        on_token = client.on_token

        def send(session_id: str, lead: float) -> None:
            session = client.sessions[session_id]
            if not session.history:
                return
            sent["false_hints"] += 1
            router.hint(session_id, session.history, session.keys, lead)

        def hooked(request: Request, t: float) -> None:
            on_token(request, t)
            if not request.is_finished or request.session_id not in client.sessions:
                return
            session = client.sessions[request.session_id]
            if session.next_turn < len(session.turns):
                gap = session.turns[session.next_turn].think_s or 0.0
            else:
                gap = self.gap_s
            whole = math.floor(self.per_reply)
            count = whole + (rng.random() < self.per_reply - whole)
            for _ in range(count):
                at = t + rng.random() * gap
                lead = leads[rng.randrange(len(leads))]
                sid = request.session_id
                events.at(at, lambda sid=sid, lead=lead: send(sid, lead))

        client.on_token = hooked  # type: ignore[method-assign]
        return lambda: dict(sent)
