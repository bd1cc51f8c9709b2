"""Writing files safely: atomic output, write failures as one line, exclusive claims, folders made and unmade.

- Atomic output: write to a temporary file in the target folder, then rename over the target. A process
  killed mid-write (kill -9, power loss) leaves its temporary behind; the next run that writes the same
  kind of file removes it with `remove_stale_temporaries`.
- A write that fails (full disk, quota, read-only, I/O error) is one PatchgenError line naming the path and
  what to do (`write_error`); where the size is known in advance, `check_free_space` says so before the work.
  The caller's way to write elsewhere is a Phrase that names its arguments ("choose another {run_dir}"), or
  plain text, and the error an ArgumentError that a CLI words in its options.
- `claim`: a run folder or an output file held by one process at a time (an flock the kernel drops when the
  holder dies, however); the second claimant is told the holder's pid.
- `made_folder` / `remove_if_empty`: a run that fails before writing anything leaves no folder it created.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no flock, so claims are not enforced there
    fcntl = None

from .environment import CACHE_ENV  # the root of patchgen's caches
from .errors import ArgumentError, PatchgenError, Phrase
from .memory import format_size

Fix = Union[str, Phrase]  # what to do: plain text, or a Phrase that names the caller's arguments


def cache_root() -> Path:
    """$PATCHGEN_CACHE_DIR, else $XDG_CACHE_HOME/patchgen, else ~/.cache/patchgen."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "patchgen"


def as_utf8(text: str) -> str:
    """`text` as valid UTF-8, for metadata (ONNX strings, PNG text): the bytes of a file name that is not UTF-8,
    which Python holds as surrogate escapes, become \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
_WRITE_FAILURES = (*_FULL, *_READ_ONLY, errno.EIO)


def _phrase(fix: Fix) -> Phrase:
    return fix if isinstance(fix, Phrase) else Phrase(fix)


def _todo(e: OSError, elsewhere: str) -> str:
    if e.errno in _FULL:
        return f"free some space there or {elsewhere}"
    if e.errno in _READ_ONLY:
        return f"{elsewhere}, a writable one"
    if e.errno == errno.EIO:
        return f"the disk reports an error: check it, or {elsewhere}"
    return elsewhere


def write_error(e: OSError, where=None, elsewhere: Fix = "choose another folder") -> ArgumentError:
    """One line for a write that failed: what failed, where, and what to do, by the kind of error (full
    disk or quota, read-only or not permitted, the device failing). `where`: the file or folder being
    written (default: the error's own file name); `elsewhere`: how to write somewhere else instead."""
    where = where if where is not None else (e.filename or "the output")
    fix = _phrase(elsewhere)
    return ArgumentError(f"cannot write {where}: {e.strerror or e or type(e).__name__}; ", _todo(e, fix.text),
                         **fix.arguments)


def os_error(e: OSError) -> PatchgenError:
    """One line for an OSError that no caller worded (the CLIs' last resort): the error, its file, what to do."""
    where = f" ({e.filename})" if e.filename else ""
    return PatchgenError(f"{e.strerror or e or type(e).__name__}{where}; {_todo(e, 'check the path and try again')}")


def os_error_in(exc: BaseException) -> Optional[OSError]:
    """The OSError that `exc` is or wraps (its __cause__/__context__ chain), e.g. the failed write inside
    torch.save's RuntimeError; None if there is none."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def check_free_space(folder, need: int, what: str, elsewhere: Fix = "choose another folder") -> None:
    """Refuse up front, before the work, when `folder` has less than `need` bytes free for `what`
    (`elsewhere`: how to write somewhere else instead)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # cannot tell: the write itself reports it
    if need > free:
        fix = _phrase(elsewhere)
        raise ArgumentError(f"{what} needs {format_size(need)} but {folder} has {format_size(free)} free; ",
                            f"free some space there or {fix.text}", **fix.arguments)


def check_writable_folder(folder) -> None:
    """Fail early, before any long work, when files cannot be created in `folder`."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PatchgenError(f"{folder} is a file, not a folder: choose another path")
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
def atomic_output(path, mode: str = "wb", elsewhere: Fix = "choose another folder"):
    """Yield a file object; on success it replaces `path` in one rename, on error nothing is left behind.

    A write that fails (a full disk or quota, a read-only or failing device), also one wrapped by the
    writer (torch.save raises RuntimeError around it), is one PatchgenError line naming `path`
    (`write_error`; `elsewhere`: how to write somewhere else)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise PatchgenError(f"output folder {path.parent} does not exist: create it or choose another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(e, path.parent, elsewhere) from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        cause = None if isinstance(e, PatchgenError) else os_error_in(e)
        if cause is not None and cause.errno in _WRITE_FAILURES:
            raise write_error(cause, path, elsewhere) from None
        raise


def made_folder(path) -> tuple[Path, list[Path]]:
    """Create `path` and its missing parents; (path, the folders created, innermost first), so that a run
    that fails before writing anything can remove what it made (`remove_if_empty`)."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PatchgenError(f"cannot create folder {path}: {e.strerror}; choose another one") from None
    return path, missing


def remove_if_empty(folders) -> None:
    """Remove each of `folders` (innermost first) that is empty; stop at the first that is not."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


class Claimed(ArgumentError):
    """Another live process holds the claim."""


_HELD: dict = {}  # (st_dev, st_ino) of each lock file this process holds -> how many times


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 32, 0).decode().strip()
        if text.isdigit():
            return f"process {text}"
    return "another process"


@contextlib.contextmanager
def claim(lock: Path, what: str, todo: Fix) -> Iterator[None]:
    """Hold `lock` exclusively (an `flock`, which the kernel releases when the holder exits, even by
    kill -9) for the block, with this process's pid written in it; the file is removed on the way out.

    `what` names what is claimed and `todo` what the second claimant can do (text, or a Phrase naming the
    caller's arguments): it gets one line, "<what> is in use by process <pid>; <todo>" (Claimed). Re-entrant
    within a process. Where there is no flock (Windows, some network file systems) the block runs unclaimed.
    A file left by a killed holder is taken over and removed by the next claimant."""
    lock = Path(lock)
    with contextlib.suppress(OSError):
        st = lock.stat()
        if (st.st_dev, st.st_ino) in _HELD:
            _HELD[(st.st_dev, st.st_ino)] += 1
            try:
                yield
            finally:
                _HELD[(st.st_dev, st.st_ino)] -= 1
            return
    fd = _acquire(lock, what, todo)
    if fd is None:
        yield
        return
    st = os.fstat(fd)
    _HELD[(st.st_dev, st.st_ino)] = 1
    try:
        yield
    finally:
        del _HELD[(st.st_dev, st.st_ino)]
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still locked: a waiting claimant then sees a new file (see _acquire)
        os.close(fd)


def _acquire(lock: Path, what: str, todo: Fix) -> Optional[int]:
    """The locked file's descriptor, or None where locking is unavailable; raises Claimed."""
    if fcntl is None:
        return None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as e:
            raise write_error(e, lock.parent) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            fix = _phrase(todo)
            raise Claimed(f"{what} is in use by {holder}; ", fix.text, **fix.arguments) from None
        except OSError:  # no flock here (ENOLCK, EOPNOTSUPP): unclaimed, and no lock file left
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(lock)
            return None
        try:  # the previous holder may have removed the file between our open and our lock: lock the new one
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            with contextlib.suppress(OSError):  # a full disk: held all the same, the pid just goes unsaid
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
