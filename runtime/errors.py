"""The exceptions for problems a user can fix (bad path, corrupt file, budget too small).

The library words them in its own terms: a fix names the caller's arguments (memory_budget='94M', eta),
never a command's flags. An ArgumentError keeps those arguments and their values apart from its text, so
that a CLI words the same error in its options (`worded`, cli/common.py).
"""
from __future__ import annotations

from typing import Callable, Optional

# How a caller sets an argument: (argument name, the value to give it, or None for the argument itself) -> words.
Naming = Callable[[str, Optional[object]], str]


class PatchgenError(Exception):
    """A user-facing error: the message says what is wrong and what to do. CLIs print it and exit 2."""

    def worded(self, naming: Naming) -> str:
        """The message with the arguments it names worded by `naming` (here: none, so the message as is)."""
        return str(self)


def as_argument(name: str, value: Optional[object] = None) -> str:
    """The library's words for an argument: `memory_budget='94M'` to set it, `eta` for the argument itself."""
    return name if value is None else f"{name}={value!r}"


class ArgumentError(PatchgenError):
    """A PatchgenError whose fix names the caller's arguments.

    problem: what is wrong (any text); fix: what to do, naming each argument as a str.format field
    ("pass {memory_budget} or more"); arguments: each field's argument -> the value to give it (None: the
    argument itself). str() words them as the library's arguments (`as_argument`)."""

    def __init__(self, problem: str, fix: str, **arguments: Optional[object]):
        self.problem, self.fix, self.arguments = problem, fix, arguments
        super().__init__(self.worded(as_argument))

    def worded(self, naming: Naming) -> str:
        return self.problem + self.fix.format_map({name: naming(name, value) for name, value in self.arguments.items()})
