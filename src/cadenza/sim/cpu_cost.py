"""The CPU cost model: step time linear in the step's shape, fitted to this engine here.

``t = base + prefill_step * [the step has prefill tokens] + prefill_token * prefill tokens
+ decode_seq * decode sequences + attention_pair * prefill query-key pairs
+ decode_pair * decode query-key pairs`` — the features that explain this engine's step times:
a step's fixed overhead, the extra fixed cost of a prefill pass (its larger activations and
masks), the GEMMs per token, and attention per pair, priced separately for prefill (one
batched matrix product over many query rows) and decode (one query row per sequence reading
its whole context, several times dearer per pair here). ``cadenza simulate calibrate`` fits the
coefficients on this machine and measures the copy bandwidths; ``DEFAULT`` (measured on the
development machine, see below) is used when no calibration file is given. A calibration file
written before the prefill-step and decode-pair terms existed loads with ``prefill_step_s`` 0
and ``decode_pair_s`` None (decode pairs then cost ``attention_pair_s``, as that model had it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cadenza.sim.hardware import GB, Links
from cadenza.sim.step_cost import StepShape


@dataclass(frozen=True)
class CPUCalibration:
    model: str
    base_s: float
    prefill_token_s: float
    decode_seq_s: float
    attention_pair_s: float
    memcpy_bytes_per_s: float
    disk_read_bytes_per_s: float
    disk_write_bytes_per_s: float
    num_samples: int = 0
    median_rel_error: float = 0.0
    prefill_step_s: float = 0.0
    decode_pair_s: float | None = None  # None: decode pairs cost ``attention_pair_s``

    @property
    def decode_pair_cost_s(self) -> float:
        return self.attention_pair_s if self.decode_pair_s is None else self.decode_pair_s

    def scaled(self, *, prefill: float, decode: float) -> CPUCalibration:
        """Step costs scaled: the decode terms (the fixed cost, per sequence, per decode pair)
        by ``decode``, the prefill terms (per token, per prefill pair, a prefill's fixed cost)
        by ``prefill``; copy bandwidths unchanged."""
        return replace(
            self,
            base_s=self.base_s * decode,
            decode_seq_s=self.decode_seq_s * decode,
            decode_pair_s=self.decode_pair_cost_s * decode,
            prefill_token_s=self.prefill_token_s * prefill,
            attention_pair_s=self.attention_pair_s * prefill,
            prefill_step_s=self.prefill_step_s * prefill,
        )

    def describe(self) -> str:
        """The fitted step model, in words and units."""
        return (
            f"step = {self.base_s * 1e3:.1f} ms"
            f" + {self.prefill_step_s * 1e3:.1f} ms if it has prefill tokens"
            f" + {self.prefill_token_s * 1e6:.0f} µs × prefill tokens"
            f" + {self.decode_seq_s * 1e3:.1f} ms × decode sequences"
            f" + {self.attention_pair_s * 1e9:.0f} ns × prefill attended pairs"
            f" + {self.decode_pair_cost_s * 1e9:.0f} ns × decode attended pairs"
        )

    def links(self, network_bytes_per_s: float = 10 * GB / 8) -> Links:
        """On a CPU, "device" and host are both RAM: a tier copy is a memcpy."""
        return Links(
            host_to_device=self.memcpy_bytes_per_s,
            device_to_host=self.memcpy_bytes_per_s,
            disk_read=self.disk_read_bytes_per_s,
            disk_write=self.disk_write_bytes_per_s,
            network=network_bytes_per_s,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CPUCalibration:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def load_calibration(path: str | Path | None) -> CPUCalibration:
    """The calibration ``cadenza simulate calibrate`` wrote at ``path`` (None: the built-in
    one); errors name the file and say how to make a good one."""
    if path is None:
        return DEFAULT
    remedy = "write one with `cadenza simulate calibrate --out FILE`"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"calibration {path}: not a calibration JSON file ({e}); {remedy}") from e
    try:
        if not isinstance(data, dict):
            raise TypeError(f"missing every field: the file holds a {type(data).__name__}")
        return CPUCalibration.from_json(data)
    except TypeError as e:  # "...__init__() missing 8 required positional arguments: ..."
        why = str(e).partition("() ")[2] or str(e)
        raise ValueError(f"calibration {path}: not a calibration ({why}); {remedy}") from e


class CPUCost:
    def __init__(self, calibration: CPUCalibration) -> None:
        self.c = calibration

    def step_seconds(self, shape: StepShape) -> float:
        c = self.c
        prefill_tokens = shape.tokens - shape.decode_seqs
        return max(
            c.base_s
            + (c.prefill_step_s if prefill_tokens else 0.0)
            + c.prefill_token_s * prefill_tokens
            + c.decode_seq_s * shape.decode_seqs
            + c.attention_pair_s * (shape.attention_pairs - shape.decode_pairs)
            + c.decode_pair_cost_s * shape.decode_pairs,
            0.0,
        )


# Measured on the development machine (SmolLM2-135M, float32, 2 shared cores under load):
# 18 engine steps — decode steps of one sequence took 0.08-0.10 s, prefills of 64 / 256 /
# 1024 tokens 0.27 / 0.69 / 3.04 s — fitted by hand to base + per-token (the attention term
# is folded into the per-token cost at these lengths); copy bandwidths from the `calibrate`
# probes on the same machine. Run `cadenza simulate calibrate` for a fit of your machine.
DEFAULT = CPUCalibration(
    model="smollm2-135m",
    base_s=0.085,
    prefill_token_s=2.9e-3,
    decode_seq_s=5e-3,
    attention_pair_s=0.0,
    memcpy_bytes_per_s=4.9 * GB,
    disk_read_bytes_per_s=1.9 * GB,
    disk_write_bytes_per_s=0.4 * GB,
    num_samples=18,
)
