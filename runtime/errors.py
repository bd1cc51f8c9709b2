"""The exceptions for problems a user can fix (bad path, corrupt file, budget too small).

The library words them in its own terms: a message names the caller's arguments (memory_budget='94M', eta),
never a command's flags. An ArgumentError keeps those arguments and their values apart from its text, so
that a CLI words the same error in its options (`worded`, cli/common.py); a Phrase does the same for a
note or for a fix that a helper words into its error (files.write_error's `elsewhere`).
"""
from __future__ import annotations

import re
from typing import Callable, Optional

# How a caller sets an argument: (argument name, the value to give it, or None for the argument itself) -> words.
Naming = Callable[[str, Optional[object]], str]

FIELD = re.compile(r"\{(\w+)\}")  # an argument named in a message's text


class PatchgenError(Exception):
    """A user-facing error: the message says what is wrong and what to do. CLIs print it and exit 2."""

    def worded(self, naming: Naming) -> str:
        """The message with the arguments it names worded by `naming` (here: none, so the message as is)."""
        return str(self)


def as_argument(name: str, value: Optional[object] = None) -> str:
    """The library's words for an argument: `memory_budget='94M'` to set it, `eta` for the argument itself."""
    return name if value is None else f"{name}={value!r}"


def field(name: str) -> str:
    """The field that names the argument `name` in a message's text ("{mask}"), for a name held in a variable."""
    return "{" + name + "}"


def word(text: str, arguments: dict, naming: Naming) -> str:
    """`text` with each {name} field of a name in `arguments` worded by `naming`; every other brace, such as
    one in a path or an OSError's text, stays as it is."""
    return FIELD.sub(lambda m: naming(m[1], arguments[m[1]]) if m[1] in arguments else m[0], text)


class Phrase:
    """Text for the user that names the caller's arguments as {name} fields (a note, a fix): arguments, each
    field's argument -> the value to give it (None: the argument itself). str() words them as the library's
    arguments, worded(naming) as a command's options."""

    def __init__(self, text: str, **arguments: Optional[object]):
        self.text, self.arguments = text, arguments

    def worded(self, naming: Naming) -> str:
        return word(self.text, self.arguments, naming)

    def __str__(self) -> str:
        return self.worded(as_argument)

    def __repr__(self) -> str:
        return f"Phrase({self.text!r}, **{self.arguments!r})"


class ArgumentError(PatchgenError):
    """A PatchgenError that names the caller's arguments.

    problem: what is wrong; fix: what to do. Both name each argument as a {name} field ("{mask} must be ...",
    "pass {memory_budget} or more"); arguments: each field's argument -> the value to give it (None: the
    argument itself). Only those fields are worded, so any other text (a path, an OSError's) may hold braces.
    str() words them as the library's arguments (`as_argument`)."""

    def __init__(self, problem: str, fix: str, **arguments: Optional[object]):
        self.problem, self.fix, self.arguments = problem, fix, arguments
        super().__init__(self.worded(as_argument))

    def worded(self, naming: Naming) -> str:
        return word(self.problem, self.arguments, naming) + word(self.fix, self.arguments, naming)
