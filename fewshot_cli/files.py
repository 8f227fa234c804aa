"""Atomic writes: a reader (or a crash) never sees half a checkpoint, result or cache file;
and locked merges: processes that update one JSON file at once all keep their update.

Ground floor: imports nothing of fewshot but its errors.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fewshot_cli.errors import FewshotError


def _umask_mode() -> int:
    """The mode a plain ``open(..., "w")`` would give a new file (mkstemp makes it 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write`` into a temporary file beside ``path``, flushed to disk, then renamed over it:
    a reader (or a crash, or a full disk) sees the old file or the new one, never half.

    An OSError names ``path``, not the temporary file the user never asked for.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    _written.append(path)


_written: list[Path] = []  # every file this process wrote in full, in order


def written() -> list[Path]:
    """The files this process has written in full so far (what an interruption leaves)."""
    return list(_written)


def atomic_torch_save(obj: object, path: Path) -> None:
    """``torch.save(obj)`` into ``path`` atomically."""
    import torch  # here, so that the command line's option checks need no torch start-up

    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """Write bytes into ``path`` atomically."""
    _atomic(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: Path) -> None:
    """Write UTF-8 text into a temporary file beside ``path``, then rename over it."""
    atomic_write_bytes(text.encode("utf-8"), path)


# What to do about each system error, in words that fit any file or folder it names.
ADVICE = {
    errno.ENOSPC: "free some space there or choose another folder",
    errno.EDQUOT: "free some of your disk quota or choose another folder",
    errno.EFBIG: "the file system cannot hold a file this large; choose a folder on another disk",
    errno.EACCES: "check its permissions (or its folder's) or choose another place",
    errno.EPERM: "check its permissions (or its folder's) or choose another place",
    errno.EROFS: "it is on a read-only file system; choose a place on a writable disk",
    errno.ELOOP: "a symbolic link on that path points back into the path (a loop); fix or "
                 "remove the link, or give a path without it",
    errno.ENOENT: "a folder on that path does not exist; check the path for a typo",
    errno.ENOTDIR: "a part of that path is a file, not a folder; check the path",
    errno.EISDIR: "it is a folder; name a file (inside it, or elsewhere) instead",
    errno.ENAMETOOLONG: "the name is longer than the file system allows; choose a shorter path",
    errno.EEXIST: "a file of that name is in the way; move it, or choose another path",
    errno.ENOTEMPTY: "the folder is not empty; choose another one",
    errno.EIO: "the disk reported a read or write error; check the disk and try again",
    errno.EMFILE: "too many files are open; raise the limit (ulimit -n) or close other programs",
    errno.ENFILE: "too many files are open on this machine; close other programs and try again",
    errno.EBUSY: "it is in use by another program; try again when it is free",
    errno.ESTALE: "the network file system lost track of it; try again or remount",
}


def advice(err: OSError | None) -> str:
    """The fix for a system error, by its errno (a generic one for the rest)."""
    fix = ADVICE.get(err.errno) if err is not None else None
    return fix or "check the path, the disk and its permissions, then try again"


def os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` (torch wraps some in RuntimeError), or None."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def write_failure(path: Path, err: BaseException, consequence: str) -> FewshotError:
    """One sentence for a failed write of ``path``: the system's reason, what it left, the fix."""
    cause = os_error_in(err)
    reason = cause.strerror if cause is not None and cause.strerror else "the write failed"
    return FewshotError(f"could not write {path}: {reason}; {consequence}; {advice(cause)}")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the hidden ``.<name>.lock`` beside ``path`` for the block,
    so that processes updating ``path`` (on one machine, or over NFS) take turns. The kernel
    drops the lock when a process dies; the lock file stays (removing it would let two
    processes lock two different files). Raises OSError where the folder cannot be written."""
    fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@dataclass(frozen=True)
class MovedAside:
    """A file :func:`merge_json` could not merge into, and where it now lies."""

    reason: str
    to: Path


def _read_json(path: Path, problem: Callable[[Any], str | None]) -> tuple[Any, str | None]:
    """``(data, None)``, ``(None, None)`` where there is no file, or ``(None, why)`` where it
    cannot be merged into: unreadable, not JSON, or ``problem(data)`` names what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except OSError as err:
        return None, f"it cannot be read ({err.strerror or err})"
    except UnicodeDecodeError:
        return None, "it is not UTF-8 text"
    try:
        data = json.loads(text)
    except ValueError as err:
        return None, f"it is not valid JSON ({err})"
    return data, problem(data)


def _move_aside(path: Path) -> Path:
    """Rename ``path`` to a free ``<name>.corrupt-<date>-<time>[-n]`` beside it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        to = path.with_name(f"{path.name}.corrupt-{stamp}" + (f"-{n}" if n > 1 else ""))
        if not to.exists():
            os.replace(path, to)
            return to
    raise FileExistsError(errno.EEXIST, "too many files moved aside", str(path))


def merge_json(path: Path, update: Callable[[Any], Any],
               problem: Callable[[Any], str | None] = lambda data: None) -> MovedAside | None:
    """Read-modify-write the JSON file ``path`` under its :func:`locked` lock: ``update(data)``
    (``data`` None where there is no file yet) is written back atomically, so N processes
    merging at once keep N updates. A file that cannot be merged into (unreadable, not JSON,
    or ``problem(data)`` returns why) is never lost and never blocks the update: it is moved
    aside to ``<name>.corrupt-<time>`` and ``update(None)`` starts a fresh file; the move is
    returned so the caller can say so. Raises OSError where the folder cannot be written
    (turn it into one sentence with :func:`write_failure`)."""
    path = Path(path)
    with locked(path):
        data, why = _read_json(path, problem)
        moved = None
        if why is not None:
            moved, data = MovedAside(why, _move_aside(path)), None
        text = json.dumps(update(data), indent=2, allow_nan=False) + "\n"
        atomic_write_text(text, path)
    return moved
