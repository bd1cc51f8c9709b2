"""Shared CLI plumbing: user errors (PatchgenError, click's usage errors, a failed read or write) become one
line and exit code 2, the library's arguments named as the commands' options (`as_option`); SIGTERM unwinds
like Ctrl-C, so a stopped command removes its temporaries."""
from __future__ import annotations

import contextlib
import functools
import signal
import sys
import time
from typing import Callable, Iterator, Optional

import click

from patchgen.runtime.errors import PatchgenError
from patchgen.runtime.files import as_utf8, os_error


class CliError(click.ClickException):
    exit_code = 2


# The library's arguments (errors.ArgumentError) whose option is not `--` + the name with dashes: by name, or
# by name=value for a flag that sets that value.
OPTIONS = {"held_bytes": "--grid-image", "init_image": "--init-img", "output_path": "-o", "run_dir": "--out",
           "check=False": "--skip-check", "simplify_graph=False": "--no-simplify",
           "cache_dir": "patchgen-train --cache-dir", "workers": "patchgen-train --decode-workers"}


def as_option(name: str, value: Optional[object] = None) -> str:
    """A library argument as the commands spell it (an `errors.Naming`): memory_budget='94M' ->
    --memory-budget 94M, force=True -> --force, check=False -> --skip-check, eta -> --eta."""
    if f"{name}={value}" in OPTIONS:
        return OPTIONS[f"{name}={value}"]
    option = OPTIONS.get(name, "--" + name.replace("_", "-"))
    return option if value is None or value is True else f"{option} {value}"


def user_errors(fn):
    """Turn PatchgenError (anything the user can fix) into `Error: <message>` (naming options, not the library's
    arguments) and exit code 2; so too any
    OSError no one worded (a full disk, a read-only or failing device), as a last resort."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as e:  # past every `finally` of the command: stop as Command.main says
            raise Interrupted(isinstance(e, Terminated)) from None
        except PatchgenError as e:
            raise CliError(e.worded(as_option)) from None
        except OSError as e:
            raise CliError(str(os_error(e))) from None
    return wrapper


def one_line(message: str) -> str:
    """A message as one printable line: control characters (a newline in a file name) as escapes, and the bytes
    of a name that is not UTF-8 as \\xNN (`files.as_utf8`), not as surrogates the terminal cannot show."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in as_utf8(message))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that every `finally` and `with` on the way out runs (a
    process killed by the default handler would leave its temporaries)."""


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM that ended a command's work, on its way to Command.main. Not a KeyboardInterrupt, so
    click does not print a blank line and an `Aborted!` of its own on the way."""

    def __init__(self, terminated: bool):
        super().__init__()
        self.terminated = terminated


def _terminate(signum, frame):
    raise Terminated()


class Command(click.Command):
    """A click command whose every error, usage errors included, is one `Error: ...` line on stderr."""

    def main(self, args=None, prog_name=None, **extra):
        try:
            previous = signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread: signals stay with the caller
            previous = None
        try:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        except click.ClickException as e:
            click.echo(f"Error: {one_line(e.format_message())}", err=True)
            raise SystemExit(e.exit_code) from None
        except (Interrupted, click.Abort, KeyboardInterrupt) as e:  # click turns a Ctrl-C of its own into Abort
            terminated = (e.terminated if isinstance(e, Interrupted)
                          else any(isinstance(x, Terminated) for x in (e, e.__cause__, e.__context__)))
            click.echo("Terminated." if terminated else "Aborted.", err=True)
            # the shell's convention for a process a signal ended: 128 + the signal's number
            raise SystemExit(128 + (signal.SIGTERM if terminated else signal.SIGINT)) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


PROGRESS_FRACTION = 0.1  # off a terminal: a progress line at every tenth of the work ...
PROGRESS_INTERVAL_S = 30.0  # ... or after this long without one, whichever comes first


def _duration(seconds: float) -> str:
    """A duration as a person reads it: 45 s, 12 min 5 s, 3 h 20 min."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class LineProgress:
    """Progress for a stream that is not a terminal (nohup, CI, a log file): one line per tenth of the work,
    or every PROGRESS_INTERVAL_S, with the elapsed time and an ETA from the mean pace so far. The same calls
    as click's progress bar (`update`), so a command uses whichever `progress` gives it."""

    def __init__(self, total: int, label: str, unit: str = "", file=None,
                 clock: Callable[[], float] = time.monotonic, start: int = 0):
        self.total, self.label, self.unit, self.file, self.clock = total, label, unit, file, clock
        self.pos = self.start = start  # a resumed job starts at `start`: its pace counts from there
        self.t0 = self.last_time = clock()
        self.next_fraction = (int(start / max(total, 1) / PROGRESS_FRACTION) + 1) * PROGRESS_FRACTION

    def update(self, n: int, info: Optional[str] = None) -> None:
        self.pos += n
        now = self.clock()
        fraction = self.pos / max(self.total, 1)
        if fraction + 1e-9 < self.next_fraction and now - self.last_time < PROGRESS_INTERVAL_S:
            return
        while self.next_fraction <= fraction + 1e-9:
            self.next_fraction += PROGRESS_FRACTION
        self.last_time = now
        elapsed, done = now - self.t0, self.pos - self.start
        eta = (f", ETA {_duration(elapsed / done * (self.total - self.pos))}" if done and self.pos < self.total
               else "")
        unit = f" {self.unit}" if self.unit else ""
        click.echo(f"{self.label}: {self.pos}/{self.total}{unit} ({fraction:.0%}), {_duration(elapsed)}{eta}"
                   + (f"; {info}" if info else ""), file=self.file or sys.stderr)


@contextlib.contextmanager
def progress(total: int, label: str, unit: str = "", show_pos: bool = False, info: bool = False,
             start: int = 0) -> Iterator:
    """A progress reporter on stderr with `update(n[, info])`: click's bar with an ETA on a terminal, and
    `LineProgress`'s lines elsewhere (click's bar prints nothing but its label when stderr is not a terminal)."""
    if sys.stderr.isatty():
        with click.progressbar(length=total, label=label, show_pos=show_pos, show_eta=True, file=sys.stderr,
                               item_show_func=(lambda s: s) if info else None) as bar:
            if start:
                bar.update(start)
            yield bar
    else:
        yield LineProgress(total, label, unit, sys.stderr, start=start)
