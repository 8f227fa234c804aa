"""Downloads of official archives: into a temporary file beside the target, md5-checked, then
moved in place, so that a failed or wrong download never leaves a file behind."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from fewshot_cli.errors import FewshotError

log = logging.getLogger(__name__)


def md5_of(path: Path) -> str:
    """The md5 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_checked(url: str, target: Path, md5: str, fetch: Callable[[str, Path], None],
                     what: str, fix: str) -> Path:
    """``fetch(url, tmp)`` beside ``target``, check the md5, and move it to ``target``.

    Failures are one sentence: "{what} is not in {folder} and downloading {url} failed (...);
    {fix}", or the md5 found and the official one.
    """
    target = Path(target)
    log.info("downloading %s into %s", url, target.parent)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        os.close(fd)
        fetch(url, Path(tmp))
    except Exception as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise FewshotError(f"{what} is not in {target.parent} and downloading {url} failed "
                           f"({e}); {fix}") from None
    digest = md5_of(Path(tmp))
    if digest != md5:
        Path(tmp).unlink(missing_ok=True)
        raise FewshotError(f"the downloaded {target.name} has md5 {digest}, not the official "
                           f"{md5}, so it was discarded; retry, or {fix}")
    os.replace(tmp, target)
    return target
