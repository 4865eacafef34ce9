"""The Azure LLM inference traces 2023 (Splitwise) → session traces with the real arrival bursts.

A line is ``TIMESTAMP,ContextTokens,GeneratedTokens`` with a wall-clock timestamp at 0.1 µs
(``2023-11-16 18:15:46.6805900``). The data has no session structure, so by default every
request is a **single-turn session** (``azure-<n>``) arriving at its recorded time, seconds from
the first request; ``input_tokens`` is ``ContextTokens`` and ``output_tokens``
``GeneratedTokens`` (a 0 in either is raised to 1: a turn needs both).

With ``turns_per_session`` > 1 requests are grouped into **synthetic** sessions (nothing in the
data says these requests belong together). Each turn keeps its request's recorded arrival as
``arrival_s`` (the load shape stays real) and its ``ContextTokens`` as new input, so a synthetic
session's prompts grow by whole requests. Grouping:

* ``"consecutive"``: requests ``k*n .. k*n+n-1`` form session ``k``. Consecutive requests arrive
  milliseconds apart, so each turn waits for the previous one (sessions are sequential, see
  :mod:`cadenza.sim.trace`): back-to-back turns with no think time.
* ``"strided"``: with ``S = ceil(N / n)`` sessions, request ``i`` is turn ``i // S`` of session
  ``i % S``, so a session's turns are spread over the trace (minutes apart in an hour-long trace),
  closer to a user coming back.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final, Literal, get_args

from cadenza.sim.converters._common import check_limit, round_s
from cadenza.sim.trace import TraceTurn

COLUMNS: Final = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
Grouping = Literal["consecutive", "strided"]
GROUPINGS: Final[tuple[str, ...]] = get_args(Grouping)


@dataclass(frozen=True)
class AzureRequest:
    offset_s: float  # seconds after the first request of the file
    context_tokens: int
    generated_tokens: int


def parse_timestamp(text: str) -> tuple[datetime, float]:
    """``"2023-11-16 18:15:46.6805900"`` → (the whole second, the fraction of a second).

    Parsed by hand: the 7 fractional digits are more than ``datetime`` keeps.
    """
    whole, _, fraction = text.strip().partition(".")
    if fraction and not fraction.isdigit():
        raise ValueError(f"bad fractional seconds in {text!r}")
    try:
        second = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S")
    except ValueError as e:
        raise ValueError(f"bad timestamp {text!r} (expected YYYY-MM-DD HH:MM:SS.fffffff)") from e
    return second, int(fraction) / 10 ** len(fraction) if fraction else 0.0


def _count(row: dict[str, str], column: str, where: str) -> int:
    try:
        value = int(row[column])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {column} must be an integer, got {row[column]!r}") from e
    if value < 0:
        raise ValueError(f"{where}: {column} must be >= 0, got {value}")
    return value


def read_azure(path: str | os.PathLike[str]) -> list[AzureRequest]:
    """The requests of an Azure CSV in file order, timed from the first; errors name the line."""
    source = Path(path)
    out: list[AzureRequest] = []
    with open(source, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not set(COLUMNS) <= set(reader.fieldnames):
            raise ValueError(
                f"{source}: expected the columns {', '.join(COLUMNS)}, got {reader.fieldnames}"
            )
        first: tuple[datetime, float] | None = None
        for row in reader:
            where = f"{source}:{reader.line_num}"
            try:
                second, fraction = parse_timestamp(row["TIMESTAMP"] or "")
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from e
            if first is None:
                first = (second, fraction)
            offset = (second - first[0]).total_seconds() + (fraction - first[1])
            out.append(
                AzureRequest(
                    offset_s=offset,
                    context_tokens=_count(row, "ContextTokens", where),
                    generated_tokens=_count(row, "GeneratedTokens", where),
                )
            )
    return out


def azure_to_trace(
    requests: Sequence[AzureRequest],
    *,
    turns_per_session: int = 1,
    grouping: Grouping = "consecutive",
    sessions: int | None = None,
) -> list[TraceTurn]:
    """The trace of ``requests`` (see the module docstring), in request order.

    ``sessions`` keeps the first that many sessions (numbered by their first request). Requests
    are sorted by arrival first (stable), so each session's turns are in order.
    """
    if turns_per_session < 1:
        raise ValueError(f"turns_per_session must be >= 1, got {turns_per_session}")
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; choose from {', '.join(GROUPINGS)}")
    check_limit("sessions", sessions)
    ordered = sorted(requests, key=lambda r: r.offset_s)
    t0 = ordered[0].offset_s if ordered else 0.0
    n_sessions = math.ceil(len(ordered) / turns_per_session)
    out: list[TraceTurn] = []
    for i, request in enumerate(ordered):
        session = i // turns_per_session if grouping == "consecutive" else i % n_sessions
        if sessions is not None and session >= sessions:
            continue
        out.append(
            TraceTurn(
                session_id=f"azure-{session}",
                arrival_s=round_s(request.offset_s - t0),
                input_tokens=max(1, request.context_tokens),
                output_tokens=max(1, request.generated_tokens),
            )
        )
    return out


def convert_azure(
    path: str | os.PathLike[str],
    *,
    turns_per_session: int = 1,
    grouping: Grouping = "consecutive",
    sessions: int | None = None,
) -> list[TraceTurn]:
    """Read an Azure CSV (:func:`read_azure`) and convert it (:func:`azure_to_trace`)."""
    return azure_to_trace(
        read_azure(path),
        turns_per_session=turns_per_session,
        grouping=grouping,
        sessions=sessions,
    )
