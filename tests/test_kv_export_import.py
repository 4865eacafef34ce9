"""KV export and import: a session's KV moves between engines — in another OS process too —
and the importing engine's next turn reuses it and gives the tokens of a cold recompute.
Every chunk is checksummed and every block key verified: a corrupted chunk is rejected and
counted, never installed, and the turn recomputes what it lost."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests.conftest import TINY_LLAMA, sharegpt_user_messages

from cadenza import LLM, SamplingParams
from cadenza.core.kv_import import ImportRejected
from cadenza.kvstore.kv_export import KVExport, LayerChunk
from cadenza.model.source import random_model_source

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
REPO = Path(__file__).resolve().parents[1]


def tiny_llm(source, **kw) -> LLM:
    kw.setdefault("num_kv_blocks", 96)
    return LLM(source=source, block_size=4, kv_cost_model="linear", **kw)


def run_tokens(llm: LLM, tokens: list[int], history: int, session: str):
    rid = llm.engine.add_request(
        None, tokens, GREEDY, session_id=session, num_history_tokens=history
    )
    while True:
        for out in llm.engine.step():
            if out.request_id == rid and out.finished:
                return out


def flip_byte(export: KVExport, layer: int) -> KVExport:
    chunks = list(export.chunks)
    i = next(j for j, c in enumerate(chunks) if c.layer == layer)
    c = chunks[i]
    k = bytearray(c.k)
    k[len(k) // 2] ^= 0x40
    chunks[i] = LayerChunk(c.layer, c.group, bytes(k), c.v, c.checksum)
    return KVExport(export.session_id, export.layout, export.blocks, tuple(chunks))


@pytest.fixture(scope="module")
def tiny_source():
    return random_model_source(TINY_LLAMA, seed=3)


def test_export_round_trips_through_bytes_and_imports_as_cached_prefix(tiny_source):
    first = [5 + (i * 7) % 300 for i in range(45)]
    with tiny_llm(tiny_source) as a, tiny_llm(tiny_source) as b:
        (out,) = a.generate([first], GREEDY)
        history = first + out.outputs[0].token_ids
        export = a.engine.export_kv("s", history)
        assert len(export.blocks) == (len(history) - 1) // 4
        assert all(len(c.k) == len(c.v) for c in export.chunks)
        data = export.to_bytes()
        copy = KVExport.from_bytes(data)
        assert copy == export
        nxt = history + [9, 10, 11]
        cold = run_tokens(b, nxt, len(history) - 1, "cold")
        assert b.reset_prefix_cache()
        result = b.import_kv(copy)
        assert result.rejected_chunks == 0 and result.num_blocks == len(export.blocks)
        warm = run_tokens(b, nxt, len(history) - 1, "s")
        assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
        assert warm.num_cached_tokens >= len(history) - 4
        assert b.engine.num_free_blocks == b.engine.num_total_blocks


def test_a_corrupted_chunk_is_rejected_counted_and_recomputed(tiny_source):
    first = [7 + (i * 11) % 300 for i in range(70)]
    with tiny_llm(tiny_source) as a, tiny_llm(tiny_source) as b:
        (out,) = a.generate([first], GREEDY)
        history = first + out.outputs[0].token_ids
        nxt = history + [3, 4]
        export = a.engine.export_kv("s", history)
        assert export.num_groups >= 2
        cold = run_tokens(b, nxt, len(history) - 1, "cold")
        assert b.reset_prefix_cache()
        bad = flip_byte(export, layer=1)  # the first group of layer 1
        result = b.import_kv(bad)
        assert result.rejected_chunks == 1
        assert result.rejected_blocks == len(export.blocks)  # the cut is at block 0
        assert b.engine.stats().import_rejected_chunks == 1
        warm = run_tokens(b, nxt, len(history) - 1, "s")
        assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
        assert warm.num_cached_tokens == 0
        assert b.engine.num_free_blocks == b.engine.num_total_blocks


def test_a_late_bad_chunk_keeps_the_blocks_before_it(tiny_source):
    first = [11 + (i * 13) % 300 for i in range(90)]
    with tiny_llm(tiny_source) as a, tiny_llm(tiny_source) as b:
        (out,) = a.generate([first], GREEDY)
        history = first + out.outputs[0].token_ids
        export = a.engine.export_kv("s", history)
        chunks = list(export.chunks)
        i = next(j for j, c in enumerate(chunks) if c.group == 1)
        c = chunks[i]
        chunks[i] = LayerChunk(c.layer, c.group, c.k, c.v[::-1], c.checksum)
        result = b.import_kv(
            KVExport(export.session_id, export.layout, export.blocks, tuple(chunks))
        )
        assert result.rejected_chunks == 1 and result.num_blocks == 16
        warm = run_tokens(b, history + [5], len(history) - 1, "s")
        assert warm.num_cached_tokens == 16 * 4


def test_imports_are_refused_for_another_model_or_a_broken_chain(tiny_source):
    other = random_model_source(TINY_LLAMA, seed=4)
    tokens = [3 + i % 250 for i in range(40)]
    with tiny_llm(tiny_source) as a, tiny_llm(other) as b:
        a.generate([tokens], GREEDY)
        export = a.engine.export_kv("s", tokens)
        with pytest.raises(ImportRejected, match="fingerprint"):
            b.import_kv(export)
        blocks = list(export.blocks)
        blocks[2] = type(blocks[2])(blocks[2].key, blocks[2].parent, (1, 2, 3, 4), 8)
        forged = KVExport(export.session_id, export.layout, tuple(blocks), export.chunks)
        result = a.import_kv(forged)
        assert result.num_blocks == 2 and result.rejected_blocks == len(blocks) - 2
    with pytest.raises(ValueError, match="not a Cadenza KV export"):
        KVExport.from_bytes(b"garbage")
    with pytest.raises(ValueError, match="another format.*export it again"):
        KVExport.from_bytes(b"CADENZA-KV1\n" + bytes(64))


EXPORTER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {repo!r})
    from cadenza import LLM, SamplingParams
    out_dir, firsts, seconds = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    with LLM("smollm2-135m", kv_cost_model="linear", kv_cache_memory_gib=0.5) as llm:
        for i, (first, second) in enumerate(zip(firsts, seconds)):
            sid = f"conv-{{i}}"
            llm.chat([{{"role": "user", "content": first}}], params, session_id=sid)
            history = llm.sessions.history(sid)
            prior = llm.session_messages(sid)
            new = [{{"role": "user", "content": second}}]
            delta = llm.sessions.template_delta(prior, new, history)
            with open(f"{{out_dir}}/{{sid}}.kv", "wb") as fh:
                fh.write(llm.export_kv(sid).to_bytes())
            with open(f"{{out_dir}}/{{sid}}.json", "w") as fh:
                json.dump({{"history": history, "next": history + delta}}, fh)
    """
)


@pytest.mark.slow
def test_smollm2_sessions_move_between_processes(smollm2_source, tmp_path):
    """Export 10 ShareGPT sessions from SmolLM2 in a child process, import them here: each
    next turn reuses the history (cached ≥ history − one block) and gives exactly the tokens
    of a cold recompute; a flipped byte in one layer chunk is rejected and counted, and that
    turn's tokens are still identical."""
    messages = sharegpt_user_messages(20, max_chars=400)
    firsts, seconds = messages[:10], messages[10:]
    script = EXPORTER.format(repo=str(REPO))
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), json.dumps(firsts), json.dumps(seconds)],
        check=True,
        timeout=600,
    )
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    with LLM(source=smollm2_source, kv_cost_model="linear", kv_cache_memory_gib=0.5) as llm:
        engine = llm.engine
        for i in range(10):
            sid = f"conv-{i}"
            saved = json.loads((tmp_path / f"{sid}.json").read_text())
            history, nxt = saved["history"], saved["next"]
            export = KVExport.from_bytes((tmp_path / f"{sid}.kv").read_bytes())
            assert export.num_tokens >= len(history) - 16
            if i == 9:
                export = flip_byte(export, layer=7)
            (cold,) = llm.generate([nxt], params)
            assert llm.reset_prefix_cache()
            result = llm.import_kv(export)
            rid = engine.add_request(
                None, nxt, params, session_id=sid, num_history_tokens=len(history) - 1
            )
            warm = None
            while warm is None:
                warm = next((o for o in engine.step() if o.request_id == rid and o.finished), None)
            assert warm.outputs[0].token_ids == cold.outputs[0].token_ids, sid
            if i == 9:
                assert result.rejected_chunks == 1
                assert warm.num_cached_tokens < len(history) - 16
            else:
                assert result.rejected_chunks == 0
                assert warm.num_cached_tokens >= len(history) - 16, (sid, warm.num_cached_tokens)
            assert llm.reset_prefix_cache()
        assert engine.stats().import_rejected_chunks == 1


def test_blocks_past_a_full_device_are_imported_to_the_host_tier(tiny_source):
    first = [13 + (i * 17) % 300 for i in range(100)]
    with tiny_llm(tiny_source) as a, tiny_llm(tiny_source) as cold_engine:
        (out,) = a.generate([first], GREEDY)
        history = first + out.outputs[0].token_ids
        nxt = history + [7, 8]
        export = a.engine.export_kv("s", history)
        cold = run_tokens(cold_engine, nxt, len(history) - 1, "cold")
    # Half the pool is the admission reserve: an import takes the other half, then host slots.
    small = {"num_kv_blocks": 40, "host_num_blocks": 64, "admission_reserve_fraction": 0.5}
    with tiny_llm(tiny_source, **small) as b:
        result = b.import_kv(export)
        assert result.installed_by_tier["host"] > 0 and result.installed_by_tier["device"] > 0
        assert result.num_blocks == len(export.blocks) and result.rejected_chunks == 0
        warm = run_tokens(b, nxt, len(history) - 1, "s")
        assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
        assert warm.num_cached_tokens >= len(history) - 4
        assert warm.cached_tokens_by_tier.get("host", 0) > 0
        b.engine.flush()
        assert b.engine.num_free_blocks == b.engine.num_total_blocks
