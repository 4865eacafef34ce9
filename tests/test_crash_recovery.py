"""Nothing is lost: SIGKILL mid-turn, restart, continue every conversation.

A child process serves three conversations (durable store + disk tier), then is killed with
SIGKILL while a turn is generating. The restarted engine finds every completed turn in the
store, marks the killed turn interrupted, reloads the disk tier (checksums verified), detects a
file corrupted on purpose, recomputes it, and continues each conversation with exactly the
tokens a fresh recompute gives.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cadenza import LLM, SamplingParams

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from tests.test_crash_recovery import build_llm, QUESTIONS, PARAMS
    from cadenza import SamplingParams
    llm = build_llm({store!r}, {disk!r})
    for turn in range(2):
        for c in range(3):
            msg = [{{"role": "user", "content": QUESTIONS[turn][c]}}]
            llm.chat(msg, PARAMS, session_id=f"c{{c}}")
    llm.engine.flush()
    llm.add_turn("c0", [{{"role": "user", "content": "a long one"}}],
                        SamplingParams(max_tokens=400, ignore_eos=True))
    for _ in range(6):
        llm.step()
    print("killing mid-turn", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)

QUESTIONS = [
    ["What is a KV cache?", "Name three rivers.", "Write a haiku about disks."],
    ["Why keep it between turns?", "Which is longest?", "Now one about memory."],
    ["And when memory runs out?", "Where do they flow?", "And one about recompute."],
]
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def tokenizer_only_source():
    """Tiny random weights with SmolLM2's tokenizer, identical in every process."""
    from gguf import GGUFReader
    from tests.conftest import chat_config

    from cadenza.model.source import random_model_source, smollm2_gguf_path
    from cadenza.model.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(GGUFReader(smollm2_gguf_path()))
    return random_model_source(chat_config(tok.vocab_size, tok.eos_token_ids), 11, tok)


def build_llm(store: str | None, disk: str | None, **kwargs) -> LLM:
    tiers = {"disk_num_blocks": 4096, "kv_disk_path": disk} if disk else {}
    return LLM(
        source=tokenizer_only_source(),
        num_kv_blocks=64,
        session_store_path=store,
        kv_cost_model="linear",
        **tiers,
        **kwargs,
    )


def test_sigkill_mid_turn_then_restart_continues_every_conversation(tmp_path):
    try:
        tokenizer_only_source()
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"embedded model not installed: {exc}")
    store, disk = str(tmp_path / "conv.db"), str(tmp_path / "kv")
    child = subprocess.run(
        [sys.executable, "-c", CHILD.format(repo=str(REPO), store=store, disk=disk)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert "killing mid-turn" in child.stdout

    files = sorted(Path(disk).rglob("*.kv"))
    # Full blocks are prefixes of every later turn, so each one is read again after restart
    # (a partial tail block may have been superseded by the next turn's).
    full = [f for f in files if struct.unpack_from("<I", f.read_bytes(), 72)[0] == 16]
    assert full, "write-through left nothing on disk"
    victim = full[len(full) // 2]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF  # flip a payload byte: the checksum must catch it
    victim.write_bytes(bytes(data))

    with build_llm(store, disk) as llm:
        assert llm.sessions.num_interrupted_turns == 1
        for c in range(3):
            turns = llm.sessions.store.turns(f"c{c}", include_incomplete=True)
            assert [t.status for t in turns if t.status == "complete"] == ["complete"] * 2
        assert llm.sessions.store.turns("c0", include_incomplete=True)[-1].status == "interrupted"
        continued = [
            llm.chat([{"role": "user", "content": QUESTIONS[2][c]}], PARAMS, session_id=f"c{c}")[0]
            for c in range(3)
        ]
        assert sum(o.cached_tokens_by_tier.get("disk", 0) for o in continued) > 0
        assert llm.engine.disk is not None and llm.engine.disk.stats.num_corrupt == 1

    with build_llm(None, None, enable_prefix_caching=False) as fresh:
        for turn in range(2):
            for c in range(3):
                msg = [{"role": "user", "content": QUESTIONS[turn][c]}]
                fresh.chat(msg, PARAMS, session_id=f"c{c}")
        expected = [
            fresh.chat([{"role": "user", "content": q}], PARAMS, session_id=f"c{c}")[0]
            for c, q in enumerate(QUESTIONS[2])
        ]
    assert [o.outputs[0].token_ids for o in continued] == [o.outputs[0].token_ids for o in expected]
