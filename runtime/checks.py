"""Range checks for values read from untrusted files (checkpoint configs, ONNX metadata): gathered as
(field, problem) pairs and worded as one line. Used by the config dataclasses (Schedule, ModelSpec,
ModelConfig, TrainConfig), the ONNX metadata reader and the checkpoint loader."""
from __future__ import annotations

import math
import numbers
from typing import Optional


class Problems(list):
    """(field, what is wrong with it) pairs gathered by the range checks of the config dataclasses (Schedule,
    ModelSpec, ModelConfig, TrainConfig) and of the ONNX metadata. `message()` words them as one line; a
    loader that knows where a field came from (a metadata key) can word `(field, text)` its own way.

    Each check returns whether the value passed, so that checks that depend on it can be skipped."""

    def add(self, name: str, text: str) -> bool:
        self.append((name, text))
        return False

    def integer(self, name: str, value, low: int, high: Optional[int] = None, why: str = "") -> bool:
        """An int (not a bool, not a float, however whole) in [low, high]."""
        if not is_int(value):
            return self.add(name, f"must be an integer, got {shown(value)}")
        if value < low or (high is not None and value > high):
            return self.add(name, f"must be {_range(low, high)}{why}, got {shown(value)}")
        return True

    def real(self, name: str, value, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
             high_open: bool = False, why: str = "") -> bool:
        """A finite int or float (not a bool) in the interval between low and high, open where asked."""
        try:
            finite = is_real(value) and math.isfinite(value)
        except OverflowError:  # an int beyond float's range
            finite = False
        if not finite:
            return self.add(name, f"must be a finite number, got {shown(value)}")
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            if high == math.inf:
                where = f"{'>' if low_open else '>='} {low:g}"
            else:
                where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            return self.add(name, f"must be {where}{why}, got {value:g}")
        return True

    def flag(self, name: str, value) -> bool:
        if not isinstance(value, bool):
            return self.add(name, f"must be true or false, got {shown(value)}")
        return True

    def choice(self, name: str, value, choices: tuple) -> bool:
        if not isinstance(value, str) or value not in choices:
            return self.add(name, f"must be one of {', '.join(choices)}, got {shown(value)}")
        return True

    def message(self) -> str:
        return "; ".join(f"{name} {text}" for name, text in self)


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def shown(value, limit: int = 40) -> str:
    """repr(value), cut to `limit` characters: values come from untrusted files and go into one-line errors."""
    if isinstance(value, int) and value.bit_length() > 128:  # repr refuses ints of over 4300 digits
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _range(low: int, high: Optional[int]) -> str:
    return f">= {low}" if high is None else f"between {low} and {high}"
