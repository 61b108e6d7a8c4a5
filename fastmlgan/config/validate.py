"""The checks every option's ``__post_init__`` runs; each message names the option to change."""

from __future__ import annotations

import math
from typing import Any

from fastmlgan.errors import ConfigError


def choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"--{key}: {value!r} is not one of {', '.join(choices)}")


def positive(key: str, value: int) -> None:
    integer(key, value, 1)


def integer(key: str, value: Any, lo: int, hi: int | None = None) -> None:
    """An int in [lo, hi]; the message names the option (bools and floats are not ints)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rule = f"an integer in [{lo}, {hi}]" if hi is not None else ("> 0" if lo == 1 else f"an integer >= {lo}")
        raise ConfigError(f"--{key} must be {rule}, got {value!r}")


def finite(key: str, value: Any, lo: float, hi: float | None = None, *, lo_open=False, hi_open=False, off=None) -> None:
    """A finite number in [lo, hi] (ends open as asked; NaN fails every comparison, so it is
    tested first). ``off``: a value outside the interval that switches the feature off."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value > lo if lo_open else value >= lo) and (hi is None or (value < hi if hi_open else value <= hi))):
        ends = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}" if hi is not None else ""
        rule = f"in {ends}" if ends else f"{'>' if lo_open else '>='} {lo:g}"
        rule = f"a finite number {rule}" if off is None else f"{off} (off) or a finite number {rule}"
        raise ConfigError(f"--{key} must be {rule}, got {value if isinstance(value, (int, float)) else repr(value)}")
