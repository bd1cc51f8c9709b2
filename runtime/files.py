"""Atomic file output: write to a temporary file in the target folder, then rename over the target.

A process killed mid-write (kill -9, power loss) leaves its temporary behind; the next run that writes the
same kind of file removes it with `remove_stale_temporaries`.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import PatchgenError

CACHE_ENV = "PATCHGEN_CACHE_DIR"  # the root of patchgen's caches: images/ (training) and graphs/ (sampling)


def cache_root() -> Path:
    """$PATCHGEN_CACHE_DIR, else $XDG_CACHE_HOME/patchgen, else ~/.cache/patchgen."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "patchgen"


def current_umask() -> int:
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


def temporary_prefix(name: str) -> str:
    # ".<target name>.p<pid>." + mkstemp's random part + ".tmp": the pid tells a live writer's file from a stale one.
    return f".{name}.p{os.getpid()}."


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.p(?P<pid>\d+)\.[^.]+\.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder, pattern: str) -> int:
    """Delete the temporaries that killed writers of files named like `pattern` (a glob) left in `folder`.

    Only files (or folders, such as a graph cache build's) named in `atomic_output`'s own form are touched,
    and only those whose writing process is gone, so a concurrent run's files in progress survive. Returns
    how many were removed.
    """
    removed = 0
    for path in Path(folder).glob(f".{pattern}.p*.tmp"):
        m = _TEMPORARY.fullmatch(path.name)
        if m is None or _alive(int(m.group("pid"))):
            continue
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
    return removed


@contextlib.contextmanager
def atomic_output(path, mode: str = "wb"):
    """Yield a file object; on success it replaces `path` in one rename, on error nothing is left behind."""
    path = Path(path)
    if not path.parent.is_dir():
        raise PatchgenError(f"output folder {path.parent} does not exist: create it or choose another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise PatchgenError(f"cannot write to {path.parent}: {e.strerror}; choose a writable folder") from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
