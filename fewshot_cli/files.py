"""Atomic writes: a reader (or a crash) never sees half a checkpoint, result or cache file.

Ground floor: imports nothing of fewshot but its errors.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from fewshot_cli.errors import FewshotError


def _umask_mode() -> int:
    """The mode a plain ``open(..., "w")`` would give a new file (mkstemp makes it 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write`` into a temporary file beside ``path``, flushed to disk, then renamed over it:
    a reader (or a crash, or a full disk) sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


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
    if cause is not None and cause.errno in FULL:
        fix = "free some space there or choose another folder"
    elif cause is not None and cause.errno in DENIED:
        fix = "make the folder writable or choose another one"
    else:
        fix = "check the disk and try again"
    return FewshotError(f"could not write {path}: {reason}; {consequence}; {fix}")
