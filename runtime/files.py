"""Atomic file output: write to a temporary file in the target folder, then rename over the target."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import PatchgenError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable_folder(folder) -> None:
    """Fail early, before any long work, when files cannot be created in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PatchgenError(f"output folder {folder} does not exist: create it or choose another path")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise PatchgenError(f"cannot write to {folder}: {e.strerror}; choose a writable folder") from None


@contextlib.contextmanager
def atomic_output(path, mode: str = "wb"):
    """Yield a file object; on success it replaces `path` in one rename, on error nothing is left behind."""
    path = Path(path)
    if not path.parent.is_dir():
        raise PatchgenError(f"output folder {path.parent} does not exist: create it or choose another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise PatchgenError(f"cannot write to {path.parent}: {e.strerror}; choose a writable folder") from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
