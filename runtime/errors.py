"""The one exception type for problems a user can fix (bad path, corrupt file, budget too small)."""


class PatchgenError(Exception):
    """A user-facing error: the message says what is wrong and what to do. CLIs print it and exit 2."""
