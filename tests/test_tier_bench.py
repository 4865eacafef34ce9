"""`cadenza bench tiers` on a tiny model: the TTFT cases run through the real engine, land where
they claim (device, host, hinted to device), and the report renders what was measured."""

from __future__ import annotations

import argparse

from tests.conftest import TINY_LLAMA

from cadenza.bench.tier_probe import _history_ttft, flop_ratio_floor, render_markdown


def test_flop_floor_grows_with_history_and_with_a_cached_fresh_prefix() -> None:
    assert flop_ratio_floor(TINY_LLAMA, 0, 40, 40) == 1.0
    longer = flop_ratio_floor(TINY_LLAMA, 2000, 40, 40)
    assert longer > 1.0
    # When the fresh prompt's first blocks are cached, it computes less: the ratio rises.
    assert flop_ratio_floor(TINY_LLAMA, 2000, 40, 40, fresh_cached=16) > longer


def test_history_ttft_cases_on_a_tiny_model(tiny_chat_source, sharegpt_data_dir, capsys) -> None:
    # `sharegpt_data_dir` makes the probe's default ShareGPT sample exist without ../shared.
    args = argparse.Namespace(history_tokens=300, threads=1, repeats=2)
    result = _history_ttft(tiny_chat_source, args)
    assert "warning" not in capsys.readouterr().out  # every case found its KV where intended
    assert result["history_tokens"] >= 200
    # The cached turn computes only its new message; the fresh prompt carries the system prompt.
    assert result["cached_turn_prompt_tokens"] - result["history_tokens"] < 60
    assert 0 < result["fresh_prompt_prefix_cached_tokens"] < result["fresh_prompt_tokens"]
    for key in (
        "ttft_device_hit_s",
        "ttft_no_history_s",
        "ttft_no_history_prefix_cached_s",
        "ttft_stateless_recompute_s",
        "ttft_host_hit_s",
        "ttft_host_hit_with_hint_s",
        "ttft_same_engine_device_hit_s",
    ):
        assert result[key] > 0, key
    assert len(result["samples"]["hinted"]) == 2
    bandwidth = {
        f"{name}_gbps": 1.0
        for name in (
            "memcpy",
            "disk_seq_write",
            "disk_seq_read",
            "device_to_host",
            "host_to_device",
            "device_to_disk",
            "disk_to_device",
        )
    }
    report = {"model": "tiny", "bandwidth": bandwidth, "ttft": result, "ttft_large": result}
    md = render_markdown(report, repeats=2)
    assert f"| turn ({result['history_tokens']} history tokens) | TTFT (ms) |" in md
    assert f"**{result['ratio_hinted_vs_device_hit']:.2f}×**" in md
