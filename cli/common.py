"""Shared CLI plumbing: user errors (PatchgenError, click's usage errors, a failed read or write) become one
line and exit code 2; SIGTERM unwinds like Ctrl-C, so a stopped command removes its temporaries."""
from __future__ import annotations

import functools
import signal

import click

from patchgen.runtime.errors import PatchgenError
from patchgen.runtime.files import as_utf8, os_error


class CliError(click.ClickException):
    exit_code = 2


def user_errors(fn):
    """Turn PatchgenError (anything the user can fix) into `Error: <message>` and exit code 2; so too any
    OSError no one worded (a full disk, a read-only or failing device), as a last resort."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PatchgenError as e:
            raise CliError(str(e)) from None
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
        except (click.Abort, KeyboardInterrupt) as e:  # click turns Ctrl-C into Abort; SIGTERM is Terminated
            terminated = any(isinstance(x, Terminated) for x in (e, e.__cause__, e.__context__))
            click.echo("Terminated." if terminated else "Aborted.", err=True)
            raise SystemExit(128 + signal.SIGTERM if terminated else 1) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
