"""Small helpers the converters share: argument checks and time rounding."""

from __future__ import annotations

import math


def round_s(seconds: float) -> float:
    """Seconds rounded to the microsecond: short, stable numbers in the trace files."""
    return round(seconds, 6)


def check_rate(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_limit(name: str, value: int | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
