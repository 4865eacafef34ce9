"""The session trace: one workload format for the real engine and the simulator.

A trace is JSON lines (gzipped when the name ends in ``.gz``), one line per turn::

    {"session_id":"s1","arrival_s":0.0,"input_tokens":42,"output_tokens":180}
    {"session_id":"s1","think_s":35.5,"input_tokens":12,"output_tokens":95,"hint_lead_s":8.0}

Fields (:data:`FIELDS` is the key order files are written in; absent optional fields and a zero
``shared_prefix_tokens`` are left out):

* ``session_id`` (str, required): the conversation or agent program the turn belongs to.
* ``arrival_s`` / ``think_s`` (float >= 0, exactly one): ``arrival_s`` is the absolute arrival,
  seconds from the trace start; ``think_s`` is the delay after the previous turn of the same
  session finished (its reply and then its tool call, if any). A session's first turn always has
  ``arrival_s``.
* ``input_tokens`` / ``output_tokens`` (int > 0, required): the tokens this turn adds (the new
  user message or observation) and the tokens its reply has (each at most 10,000,000).
* ``shared_prefix_id`` / ``shared_prefix_tokens`` (optional, both or neither): a prefix every
  session with that id starts with (a system prompt). It is a session property, repeated on every
  turn of the session so each line stands alone, and one id has one token count in the trace.
* ``hint_lead_s`` (float >= 0, optional): the client sends a hint (an advisory request) this
  long before the turn arrives. Absent: no hint for this turn.
* ``tool_s`` (float >= 0, optional): a tool call that runs for this long after this turn's reply,
  before the session's next turn can start.
* ``text`` (str, optional): the user message, when the source has text, for the real engine.

What a turn sends is the whole history: ``shared_prefix_tokens`` + every earlier turn's
``input_tokens`` and ``output_tokens`` + this turn's ``input_tokens``. Turns of a session appear
in the file in turn order (sessions may interleave). A session is sequential: a turn never starts
before the previous turn of its session and that turn's tool call have finished, so a later turn
with ``arrival_s`` arrives at the later of ``arrival_s`` and that moment.

:func:`validate` names the offending line (for a list: its 1-based position, which is its line in
the file :func:`write_trace` writes) and says what is wrong.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import math
import os
import tempfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

FIELDS: Final = (
    "session_id",
    "arrival_s",
    "think_s",
    "input_tokens",
    "output_tokens",
    "shared_prefix_id",
    "shared_prefix_tokens",
    "hint_lead_s",
    "tool_s",
    "text",
)
REQUIRED: Final = frozenset({"session_id", "input_tokens", "output_tokens"})
_STR_FIELDS: Final = frozenset({"session_id", "shared_prefix_id", "text"})
_INT_FIELDS: Final = frozenset({"input_tokens", "output_tokens", "shared_prefix_tokens"})
_SECONDS_FIELDS: Final = frozenset({"arrival_s", "think_s", "hint_lead_s", "tool_s"})


@dataclass(frozen=True)
class TraceTurn:
    """One turn of a session (see the module docstring for the meaning and rules of each field)."""

    session_id: str
    input_tokens: int
    output_tokens: int
    arrival_s: float | None = None
    think_s: float | None = None
    shared_prefix_id: str | None = None
    shared_prefix_tokens: int = 0
    hint_lead_s: float | None = None
    tool_s: float | None = None
    text: str | None = None

    def to_record(self) -> dict[str, Any]:
        """This turn as a JSON object: keys in :data:`FIELDS` order, None and no prefix left out."""
        record: dict[str, Any] = {}
        for name in FIELDS:
            value = getattr(self, name)
            if value is None or (name == "shared_prefix_tokens" and value == 0):
                continue
            record[name] = value
        return record


@dataclass(frozen=True)
class TraceSummary:
    """Totals of a trace. ``duration_s`` spans the first to the last arrival, counting each turn
    as taking no time (a lower bound: the real span also holds replies and tool calls)."""

    sessions: int
    turns: int
    input_tokens: int
    output_tokens: int
    duration_s: float
    hinted_turns: int
    tool_s: float

    def format(self) -> str:
        per = self.turns / self.sessions if self.sessions else 0.0
        return (
            f"{self.sessions} sessions, {self.turns} turns ({per:.2f} per session), "
            f"{self.input_tokens} input / {self.output_tokens} output tokens, "
            f"{self.duration_s:.1f} s of arrivals, {self.hinted_turns} hinted turns, "
            f"{self.tool_s:.1f} s of tool calls"
        )


# ------------------------------------------------------------------------------ checking

# A turn's token counts are checked against this before any tokens are made up for them (a
# typo of a few zeros would otherwise allocate the machine's memory away); the engine or the
# simulator then rejects a turn longer than its model's context, as the server would.
MAX_TURN_TOKENS: Final = 10_000_000


def _field_value(name: str, value: Any, where: str) -> Any:
    """``value`` checked against the type of field ``name``; seconds come back as float."""
    if name in _STR_FIELDS:
        if not isinstance(value, str):
            raise ValueError(f"{where}: {name} must be a string, got {value!r}")
        if name != "text" and not value:
            raise ValueError(f"{where}: {name} must not be empty")
        return value
    if name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: {name} must be an integer, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: {name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _turn_from_record(record: Any, where: str) -> TraceTurn:
    """A turn from one parsed JSON line: known fields, required ones present, types right.

    A JSON ``null`` counts as absent.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")
    values = {k: v for k, v in record.items() if v is not None}
    missing = sorted(REQUIRED - set(values))
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")
    return TraceTurn(**{k: _field_value(k, v, where) for k, v in values.items()})


def _check_turn(turn: TraceTurn, where: str) -> None:
    """The rules one line obeys on its own."""
    if turn.arrival_s is not None and turn.think_s is not None:
        raise ValueError(f"{where}: both arrival_s and think_s are set; exactly one is allowed")
    if turn.arrival_s is None and turn.think_s is None:
        raise ValueError(f"{where}: neither arrival_s nor think_s is set; exactly one is needed")
    for name in ("input_tokens", "output_tokens"):
        if getattr(turn, name) <= 0:
            raise ValueError(f"{where}: {name} must be > 0, got {getattr(turn, name)}")
    if turn.shared_prefix_tokens < 0:
        raise ValueError(f"{where}: shared_prefix_tokens must be >= 0")
    for name in ("input_tokens", "output_tokens", "shared_prefix_tokens"):
        if getattr(turn, name) > MAX_TURN_TOKENS:
            raise ValueError(
                f"{where}: {name} must be at most {MAX_TURN_TOKENS:,} (longer than any model's"
                f" context), got {getattr(turn, name):,}"
            )
    if (turn.shared_prefix_id is None) != (turn.shared_prefix_tokens == 0):
        raise ValueError(
            f"{where}: shared_prefix_id and shared_prefix_tokens > 0 go together "
            f"(got {turn.shared_prefix_id!r} and {turn.shared_prefix_tokens})"
        )


def _check(numbered: Iterable[tuple[str, Any]]) -> list[TraceTurn]:
    """Every rule, line by line; ``numbered`` pairs a place name with a turn or a raw record."""
    turns: list[TraceTurn] = []
    last_arrival: dict[str, tuple[float, str]] = {}  # session -> (earliest arrival, where)
    prefix_of_session: dict[str, tuple[str | None, int]] = {}
    tokens_of_prefix: dict[str, int] = {}
    for where, item in numbered:
        record = dataclasses.asdict(item) if isinstance(item, TraceTurn) else item
        turn = _turn_from_record(record, where)
        _check_turn(turn, where)
        sid = turn.session_id
        previous = last_arrival.get(sid)
        if previous is None:
            if turn.arrival_s is None:
                raise ValueError(
                    f"{where}: the first turn of session {sid!r} has think_s; it needs arrival_s"
                )
            arrival = turn.arrival_s
        elif turn.arrival_s is not None:
            if turn.arrival_s < previous[0]:
                raise ValueError(
                    f"{where}: turns of session {sid!r} are out of order: arrival_s "
                    f"{turn.arrival_s} is before the previous turn's arrival {previous[0]} "
                    f"({previous[1]})"
                )
            arrival = turn.arrival_s
        else:
            arrival = previous[0] + (turn.think_s or 0.0)
        last_arrival[sid] = (arrival, where)
        prefix = (turn.shared_prefix_id, turn.shared_prefix_tokens)
        if prefix_of_session.setdefault(sid, prefix) != prefix:
            raise ValueError(
                f"{where}: session {sid!r} changes its shared prefix from "
                f"{prefix_of_session[sid]} to {prefix}; it must be the same on every turn"
            )
        if turn.shared_prefix_id is not None:
            known = tokens_of_prefix.setdefault(turn.shared_prefix_id, turn.shared_prefix_tokens)
            if known != turn.shared_prefix_tokens:
                raise ValueError(
                    f"{where}: shared prefix {turn.shared_prefix_id!r} has "
                    f"{turn.shared_prefix_tokens} tokens here and {known} elsewhere"
                )
        turns.append(turn)
    return turns


def validate(turns: Sequence[TraceTurn | Mapping[str, Any]]) -> list[TraceTurn]:
    """Check a trace, raising ``ValueError("line N: ...")`` at the first broken rule.

    Accepts turns or raw JSON objects (then unknown and missing fields are caught too); returns
    the turns, with seconds as floats.
    """
    return _check((f"line {i}", turn) for i, turn in enumerate(turns, start=1))


def earliest_arrivals(turns: Sequence[TraceTurn]) -> list[float]:
    """Each turn's arrival if every turn took no time: ``arrival_s``, or the previous turn's
    earliest arrival + its ``tool_s`` + this ``think_s``. A lower bound on the real arrival."""
    out: list[float] = []
    ready: dict[str, float] = {}  # session -> when its next turn could start
    for turn in turns:
        free = ready.get(turn.session_id, 0.0)
        if turn.arrival_s is not None:
            arrival = max(turn.arrival_s, free)
        else:
            arrival = free + (turn.think_s or 0.0)
        out.append(arrival)
        ready[turn.session_id] = arrival + (turn.tool_s or 0.0)
    return out


def summarize(turns: Sequence[TraceTurn]) -> TraceSummary:
    """Totals of ``turns`` (see :class:`TraceSummary`)."""
    arrivals = earliest_arrivals(turns)
    return TraceSummary(
        sessions=len({t.session_id for t in turns}),
        turns=len(turns),
        input_tokens=sum(t.input_tokens for t in turns),
        output_tokens=sum(t.output_tokens for t in turns),
        duration_s=round((max(arrivals) - min(arrivals)) if arrivals else 0.0, 6),
        hinted_turns=sum(t.hint_lead_s is not None for t in turns),
        tool_s=round(sum(t.tool_s or 0.0 for t in turns), 6),
    )


# ------------------------------------------------------------------------------ files


def _open_read(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")  # noqa: SIM115 - the caller closes it


def read_trace(path: str | os.PathLike[str]) -> list[TraceTurn]:
    """The validated turns of a trace file; errors name the file and line. Blank lines are
    skipped (and still counted, so the line numbers are the file's)."""
    source = Path(path)

    if source.is_dir():
        raise ValueError(f"{source} is a directory; name a trace file (.jsonl or .jsonl.gz)")

    def numbered() -> Iterable[tuple[str, Any]]:
        lineno = 0
        try:
            with _open_read(source) as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    where = f"{source}: line {lineno}"
                    try:
                        yield where, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{where}: invalid JSON ({e.msg})") from e
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{source}: line {lineno + 1}: not UTF-8 text (byte {e.object[e.start]:#04x})"
            ) from e
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            after = f" after line {lineno}" if lineno else ""
            raise ValueError(
                f"{source}: not a readable gzip file{after} ({e}); a .gz trace must be"
                " complete and gzipped"
            ) from e

    turns = _check(numbered())
    if not turns:
        raise ValueError(f"{source}: the trace has no turns")
    return turns


def dumps_turn(turn: TraceTurn) -> str:
    """One line of a trace file (no newline): compact JSON, keys in :data:`FIELDS` order."""
    return json.dumps(turn.to_record(), ensure_ascii=False, separators=(",", ":"))


def write_trace(path: str | os.PathLike[str], turns: Sequence[TraceTurn]) -> Path:
    """Validate ``turns`` and write them as a trace, atomically (a temp file, then a rename).

    A ``.gz`` name is gzipped with a zero timestamp, so equal traces give equal bytes.
    """
    validate(turns)
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            if dest.name.endswith(".gz"):
                with (
                    gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz,
                    io.TextIOWrapper(gz, encoding="utf-8") as text,
                ):
                    _write_lines(text, turns)
            else:
                with io.TextIOWrapper(raw, encoding="utf-8") as text:
                    _write_lines(text, turns)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; this is plain data
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _write_lines(out: IO[str], turns: Iterable[TraceTurn]) -> None:
    for turn in turns:
        out.write(dumps_turn(turn) + "\n")
