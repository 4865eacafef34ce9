"""The CPU cost model: step time linear in the step's shape, fitted to this engine here.

``t = base + prefill_token * prefill tokens + decode_seq * decode sequences
+ attention_pair * attended query-key pairs`` — the features the replay benchmark found to
explain this engine's step times (a step's fixed overhead, the GEMMs per token, attention per
pair). ``cadenza simulate calibrate`` fits the coefficients on this machine and measures the
copy bandwidths; ``DEFAULT`` (measured on the development machine, see below) is used when no
calibration file is given.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
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
    if path is None:
        return DEFAULT
    return CPUCalibration.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


class CPUCost:
    def __init__(self, calibration: CPUCalibration) -> None:
        self.c = calibration

    def step_seconds(self, shape: StepShape) -> float:
        c = self.c
        return max(
            c.base_s
            + c.prefill_token_s * shape.prefill_tokens
            + c.decode_seq_s * shape.decode_seqs
            + c.attention_pair_s * shape.attention_pairs,
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
