"""The domain of every numeric setting, declared once on its field and checked wherever a value
comes from: the command line, an @file, a checkpoint, or code that builds settings itself.

    epochs: int = bounded(90, "--epochs", low=1)
    bn_mom: float = bounded(0.05, "--bn-mom", low=0, high=1, low_open=True)

A value outside its domain (NaN and ±inf included: every bounded number must be finite) raises a
`BoundError` naming the flag, the value and the domain in one line; the command line adds where
the value came from. `seed_bound` keeps seeds where every generator that derives from them takes
them (torch's, numpy's, and seed * 100_003 + epoch of the loaders' shuffles).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from cellpaint.core.errors import UsageError

SEED_LIMIT = 2 ** 31  # seeds in [0, 2**31): seed * 100_003 + epoch stays below 2**63
CPUS = os.cpu_count() or 1  # more threads than the machine's CPUs only oversubscribe it (100000 exhaust it)
MAX_WEIGHT = 1e6  # ensemble weights are relative: a float32 sum of logits times 1e308 would be infinite


class BoundError(UsageError, ValueError):
    """A setting outside its declared domain."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(message)
        self.flag = flag


@dataclass(frozen=True)
class Bound:
    """A closed (or, with `*_open`, open) interval of finite numbers; `integer`: whole numbers only."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{kind} in {left}{_shown(self.low)}, {_shown(self.high)}{right}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {_shown(self.low)}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {_shown(self.high)}"
        return kind

    def holds(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True


def _shown(value: float) -> str:
    """A bound as typed: whole numbers in full (2147483648, not 2.14748e+09)."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else f"{value:g}"


def bounded(default, flag: str, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False, integer: bool | None = None):
    """A dataclass field whose numbers (each number of a tuple) must lie in the given domain; None
    passes where the field allows it. `integer` defaults to the default's type (an int: whole numbers)."""
    if integer is None:
        integer = isinstance(default, int) and not isinstance(default, bool)
    bound = Bound(low, high, low_open, high_open, integer)
    return dataclasses.field(default=default, metadata={"flag": flag, "bound": bound})


def seed_bound(default, flag: str):
    return bounded(default, flag, 0, SEED_LIMIT, high_open=True, integer=True)


def check_bounds(settings) -> None:
    """Raise BoundError for the first field of `settings` (a dataclass) outside its bound."""
    for f in dataclasses.fields(settings):
        bound = f.metadata.get("bound")
        value = getattr(settings, f.name)
        if bound is None or value is None:
            continue
        for v in value if isinstance(value, tuple) else (value,):
            if not bound.holds(v):
                shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
                raise BoundError(f.metadata["flag"], f"{f.metadata['flag']} {shown}: must be {bound.describe()}")


def flag_of(cls, name: str) -> str | None:
    """The flag a bounded field of `cls` is set by (None for a field without a bound)."""
    field = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    return None if field is None else field.metadata.get("flag")
