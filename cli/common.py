"""Shared CLI plumbing: user errors (PatchgenError, click's usage errors) become one line and exit code 2."""
from __future__ import annotations

import functools

import click

from patchgen.runtime.errors import PatchgenError


class CliError(click.ClickException):
    exit_code = 2


def user_errors(fn):
    """Turn PatchgenError (anything the user can fix) into `Error: <message>` and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PatchgenError as e:
            raise CliError(str(e)) from None
    return wrapper


class Command(click.Command):
    """A click command whose every error, usage errors included, is one `Error: ...` line on stderr."""

    def main(self, args=None, prog_name=None, **extra):
        try:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        except click.ClickException as e:
            click.echo(f"Error: {e.format_message()}", err=True)
            raise SystemExit(e.exit_code) from None
        except click.Abort:
            click.echo("Aborted.", err=True)
            raise SystemExit(1) from None
