"""The engine's knobs are declared once (``cadenza.config``), and the CLI flags and ``LLM(...)``
keywords are derived from them: every flag has help, defaults are what they were, every
``LLM(...)`` keyword still works, and the server does not import the CLI."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import cadenza.server.serve as serve_module
from cadenza.cli import build_parser
from cadenza.config import CacheConfig, EngineConfig, SchedulerConfig, engine_knobs
from cadenza.config_args import engine_config_from_args
from cadenza.llm import LLM

# Every keyword LLM(...) took before the knobs were declared once, with a non-default value
# and where it lands in the config.
LLM_KEYWORDS: dict[str, tuple[Any, str]] = {
    "dtype": ("float32", "dtype"),
    "device": ("cpu", "device"),
    "seed": (3, "seed"),
    "max_model_len": (512, "max_model_len"),
    "block_size": (32, "cache.block_size"),
    "num_kv_blocks": (64, "cache.num_blocks"),
    "kv_cache_memory_gib": (0.5, "cache.kv_cache_memory_gib"),
    "enable_prefix_caching": (False, "cache.enable_prefix_caching"),
    "max_num_batched_tokens": (128, "scheduler.max_num_batched_tokens"),
    "max_num_seqs": (8, "scheduler.max_num_seqs"),
    "long_prefill_token_threshold": (64, "scheduler.long_prefill_token_threshold"),
    "scheduling_policy": ("priority", "scheduler.policy"),
    "attention_backend": ("torch", "attention_backend"),
    "linear_backend": ("torch", "linear_backend"),
    "num_threads": (1, "num_threads"),
    "kv_host_gib": (0.5, "cache.kv_host_gib"),
    "kv_disk_gib": (1.0, "cache.kv_disk_gib"),
    "kv_disk_path": ("/tmp/kv", "cache.kv_disk_path"),
    "host_num_blocks": (16, "cache.host_num_blocks"),
    "disk_num_blocks": (32, "cache.disk_num_blocks"),
    "kv_eviction_policy": ("lru", "cache.kv_eviction_policy"),
    "kv_offload_threshold": (0.5, "cache.kv_offload_threshold"),
    "kv_pin_cap_fraction": (0.3, "cache.kv_pin_cap_fraction"),
    "kv_disk_write_through": (False, "cache.kv_disk_write_through"),
    "kv_cost_model": ("linear", "kv_cost_model"),
    "session_store_path": ("/tmp/store.sqlite", "session_store_path"),
}


def lookup(config: EngineConfig, path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def subparsers(parser: argparse.ArgumentParser, prefix: str = "cadenza") -> Iterator[tuple]:
    """(command path, parser) for the parser and every subparser below it."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from subparsers(child, f"{prefix} {name}")


def missing_help(parser: argparse.ArgumentParser) -> list[str]:
    return [
        "/".join(action.option_strings) or action.dest
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]


_COMMANDS = [path for path, _ in subparsers(build_parser())]


@pytest.mark.parametrize("command", _COMMANDS)
def test_every_flag_has_help(command: str):
    parser = dict(subparsers(build_parser()))[command]
    assert missing_help(parser) == []


def test_every_knob_has_help_and_is_a_flag_or_says_why_not():
    for knob in engine_knobs():
        assert knob.help.strip(), knob.name
    serve = dict(subparsers(build_parser()))["cadenza serve"]
    dests = {action.dest for action in serve._actions}
    off_cli = {k.option for k in engine_knobs() if k.option not in dests}
    assert off_cli == {"seed"}  # the CLI's --seed is the sampling seed


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_cli_defaults_are_the_config_defaults():
    assert engine_config_from_args(parse("generate", "hi")) == EngineConfig()
    assert engine_config_from_args(parse("chat")) == EngineConfig()


def test_serve_keeps_its_tier_defaults(tmp_path: Path):
    args = parse("serve", "--data-dir", str(tmp_path))
    assert (args.kv_host_gib, args.kv_disk_gib) == (2.0, 8.0)
    config = serve_module.engine_config(args)
    assert config.cache.kv_host_gib == 2.0 and config.cache.kv_disk_gib == 8.0
    assert config.cache.kv_disk_path == str(tmp_path / "kv")
    assert config.session_store_path == str(tmp_path / "store.sqlite")
    assert config.scheduler == SchedulerConfig()


def test_serve_help_states_the_data_dir_defaults(capsys):
    """`cadenza serve` puts the store, the disk tier and the profiles under --data-dir, and
    its --help says so (the engine knobs' own help describes the offline defaults)."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("<data-dir>/store.sqlite", "<data-dir>/kv", "<data-dir>/profiles"):
        assert default in text
    assert "kept in memory" not in text


def test_bad_dtype_and_device_fail_before_any_model_loads():
    from cadenza.runner.model_runner import resolve_device

    with pytest.raises(ValueError, match="dtype must be one of auto"):
        EngineConfig(dtype="int8")
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use device='cpu'"):
            resolve_device("cuda")


def test_flags_build_the_config():
    args = parse(
        "generate",
        "hi",
        "--model",
        "m.gguf",
        "--dtype",
        "float32",
        "--block-size",
        "32",
        "--num-kv-blocks",
        "64",
        "--no-enable-prefix-caching",
        "--max-num-seqs",
        "4",
        "--scheduling-policy",
        "priority",
        "--kv-eviction-policy",
        "lru",
        "--session-store",
        "s.sqlite",
        "--kv-cost-model",
        "linear",
        "--seed",
        "5",
    )
    config = engine_config_from_args(args)
    assert config.model == "m.gguf" and config.dtype == "float32"
    assert config.cache == CacheConfig(
        block_size=32, num_blocks=64, enable_prefix_caching=False, kv_eviction_policy="lru"
    )
    assert config.scheduler == SchedulerConfig(max_num_seqs=4, policy="priority")
    assert config.session_store_path == "s.sqlite" and config.kv_cost_model == "linear"
    assert config.seed == 0 and args.seed == 5  # --seed is the sampling seed


def test_cli_choices_come_from_the_types():
    with pytest.raises(SystemExit):
        parse("generate", "hi", "--kv-eviction-policy", "random")
    with pytest.raises(SystemExit):
        parse("generate", "hi", "--dtype", "int4")


@pytest.mark.parametrize("option", sorted(LLM_KEYWORDS))
def test_every_llm_keyword_maps_onto_the_config(option: str):
    value, path = LLM_KEYWORDS[option]
    extra = {"kv_disk_path": "/tmp/kv"} if option in ("kv_disk_gib", "disk_num_blocks") else {}
    config = EngineConfig.from_options(model="m", **{option: value}, **extra)
    assert lookup(config, path) == value
    assert config.model == "m"


def test_from_options_without_options_is_the_default():
    assert EngineConfig.from_options() == EngineConfig()


def test_unknown_option_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="'blok_size'.*'block_size'"):
        EngineConfig.from_options(blok_size=32)
    # LLM(...) refuses it before loading anything (the model path does not exist).
    with pytest.raises(TypeError, match="'bogus'"):
        LLM("/nonexistent/model.gguf", bogus=1)


def test_llm_signature_keeps_model_positional():
    parameters = inspect.signature(LLM.__init__).parameters
    assert list(parameters)[:2] == ["self", "model"]
    assert parameters["model"].default == "smollm2-135m"
    assert parameters["model"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert parameters["source"].kind is inspect.Parameter.KEYWORD_ONLY


def test_configs_stay_frozen():
    for cls in (EngineConfig, CacheConfig, SchedulerConfig):
        assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineConfig().model = "x"  # type: ignore[misc]


def test_serve_does_not_import_the_cli():
    tree = ast.parse(Path(serve_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert "cadenza.cli" not in imported
    assert "cadenza.config_args" in imported
