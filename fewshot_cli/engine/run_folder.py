"""A run's folder: claimed by one run at a time, holding its config, log and checkpoints.

Hydra picks the folder (``hydra.run.dir``); this module makes it safe to share a machine:

* default folders are claimed with an atomic ``mkdir`` (:func:`claim_new_dir`), so two runs
  started in the same second get ``...-protonet-omniglot`` and ``...-protonet-omniglot-2``;
* a run holds an exclusive ``flock`` on ``<folder>/.lock`` for its whole life, so a second run
  (or a resume) given the same folder is refused instead of interleaving files; the kernel
  drops the lock when the process dies, so a crash never leaves the folder locked;
* a new run refuses a folder that already holds checkpoints (that is what ``resume=`` is for);
* ``.hydra/`` and ``train.log`` are written by the run only once it holds the folder, fatal
  errors are logged there, and a run that fails before it trains leaves no folder behind;
* a Ctrl-C that stops the run before it could save (the second one) is told what the folder
  holds: its checkpoints and their steps, and the command that continues from them.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from fewshot_cli.errors import FewshotError, Interrupted
from fewshot_cli.files import advice, atomic_write_text
from fewshot_cli.shell import arg, command

log = logging.getLogger("fewshot")

LOCK = ".lock"
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
_claimed: dict[str, str] = {}


def claim_new_dir(base: str) -> str:
    """The first of ``base``, ``base-2``, ``base-3``... that did not exist, created just now.

    A Hydra resolver (``${fewshot.new_dir:...}`` in conf/train.yaml): ``mkdir`` either creates
    a folder or fails, so two processes can never both claim one. Hydra resolves the run folder
    more than once per job, hence the memo.

    Raises:
        FewshotError: the folder cannot be made (a read-only current folder, a file in the way).
    """
    if base in _claimed:
        return _claimed[base]
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 claims, then tells the others
        _claimed[base] = scratch_dir("fewshot-rank-")
        return _claimed[base]
    n, candidate = 1, base
    try:
        Path(base).parent.mkdir(parents=True, exist_ok=True)
        while True:
            candidate = base if n == 1 else f"{base}-{n}"
            try:
                os.mkdir(candidate)
                break
            except FileExistsError:
                n += 1
    except OSError as err:
        raise FewshotError(f"cannot make the run folder {candidate} in the current folder "
                           f"{Path.cwd()} ({err.strerror}): {advice(err)}; or run from another "
                           "folder, or name the run folder with hydra.run.dir=PATH "
                           "(hydra.sweep.dir=PATH for a sweep)") from None
    _claimed[base] = candidate
    return candidate


def scratch_dir(prefix: str = "fewshot-") -> str:
    """A new temporary folder, removed when this process ends: for Hydra's bookkeeping where a
    command writes its results elsewhere (``fewshot eval -m`` writes beside each checkpoint;
    a Hydra resolver, ``${fewshot.scratch_dir:}``), and for the ranks of a torchrun job that
    do not write."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def checkpoints_held(folder: Path) -> str:
    """``last.pt (step 40) and best.pt (step 30)``: the checkpoints in ``folder`` with their
    steps (read lazily: only the step, not the weights), or "" when there are none."""
    import torch  # only when a run stops: the run folder itself is torch-free

    held = []
    for name in ("last.pt", "best.pt"):
        if (folder / name).is_file():
            try:
                step = torch.load(folder / name, map_location="cpu", weights_only=True,
                                  mmap=True)["step"]
                held.append(f"{name} (step {step})")
            except Exception:  # noqa: BLE001 (whatever makes it unreadable, say so)
                held.append(f"{name} (unreadable)")
    return " and ".join(held)


def has_started(folder: Path) -> bool:
    """Whether a run has trained in ``folder``: it holds checkpoints or TensorBoard events."""
    return any((folder / name).exists() for name in ("last.pt", "best.pt")) or any(
        folder.glob("events.out.tfevents.*"))


class RunFolder:
    """Holds ``path`` for one run: ``with RunFolder(path, hydra_files) as folder: ...``.

    ``hydra_files`` maps ``.hydra/<name>`` to the YAML text to write there (a new run's
    composed config, Hydra's own config and the overrides); None for a resumed run, which keeps
    its own.
    """

    def __init__(self, path: Path, hydra_files: dict[str, str] | None, resuming: bool) -> None:
        self.path, self.hydra_files, self.resuming = Path(path), hydra_files, resuming
        self._lock: Any = None
        self._handler: logging.Handler | None = None
        self.fresh = False

    def __enter__(self) -> RunFolder:
        where = "resume a run elsewhere" if self.resuming else "choose another hydra.run.dir"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.fresh = not any(self.path.iterdir())
            self._lock = open(self.path / LOCK, "a+")  # noqa: SIM115 (held for the whole run)
        except OSError as err:
            raise FewshotError(f"cannot write into the run folder {self.path} "
                               f"({err.strerror or err}); make it writable or {where}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.seek(0)
            owner = self._lock.read().strip() or "unknown"
            self._lock.close()
            raise FewshotError(f"the run folder {self.path} is in use by another fewshot run "
                               f"(pid {owner}); wait for it to finish or {where}") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"{os.getpid()}\n")
        self._lock.flush()
        try:
            self._claim()
        except BaseException:
            self._release()
            raise
        return self

    def _claim(self) -> None:
        if not self.resuming and any((self.path / n).exists() for n in ("last.pt", "best.pt")):
            raise FewshotError(f"{self.path} already holds a run's checkpoints; continue it with "
                               f"{command('train', arg('resume', self.path / 'last.pt'))}, or "
                               "give this run its own hydra.run.dir")
        try:
            for name, text in (self.hydra_files or {}).items():
                atomic_write_text(text, self.path / ".hydra" / name)
            handler = logging.FileHandler(self.path / "train.log", mode="a")
        except OSError as err:
            raise FewshotError(f"cannot write into the run folder {self.path} "
                               f"({err.strerror or err}); make it writable or choose another "
                               "hydra.run.dir") from None
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(handler)
        self._handler = handler

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        if err is not None and self._handler is not None:
            # Into train.log only: the command line prints its own one sentence.
            if isinstance(err, (FewshotError, Interrupted)):
                self._log(str(err))
            elif isinstance(err, KeyboardInterrupt):
                self._log("interrupted")
            elif isinstance(err, SystemExit):  # submitit requeued the job (the log says why)
                pass
            else:
                self._log("stopped by an unexpected error", (kind, err, tb))
        self._release()
        if err is not None and self.fresh and not has_started(self.path):
            self._remove()  # a folder this run created and never trained in
        if isinstance(err, KeyboardInterrupt) and self.path.exists():
            raise Interrupted(self._interrupted()) from None  # a second Ctrl-C: say what is kept

    def _interrupted(self) -> str:
        """What the folder holds after a Ctrl-C that stopped the run before it could save."""
        held = checkpoints_held(self.path)
        if not held:
            return (f"interrupted before the first checkpoint was saved; {self.path} holds no "
                    "checkpoint; start the run again")
        latest = self.path / ("last.pt" if (self.path / "last.pt").is_file() else "best.pt")
        return (f"interrupted before saving; {self.path} holds {held} from before; continue "
                f"with {command('train', arg('resume', latest))}")

    def _log(self, message: str, exc_info: Any = None) -> None:
        self._handler.handle(logging.LogRecord(log.name, logging.ERROR, __file__, 0, message,
                                               None, exc_info))

    def _release(self) -> None:
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()
            self._handler = None
        if self._lock is not None and not self._lock.closed:
            self._lock.close()  # closing the descriptor drops the flock

    def _remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        prune_empty_parents(self.path)


def prune_empty_parents(path: Path) -> None:
    """Remove the empty folders above ``path`` up to the working directory (the
    ``outputs/<date>/`` of a failed first run of the day); nothing outside it."""
    cwd, parent = Path.cwd().resolve(), Path(path).resolve().parent
    while parent != cwd and cwd in parent.parents:
        try:
            parent.rmdir()  # only succeeds when empty
        except OSError:
            break
        parent = parent.parent


def discard_if_empty(path: Path) -> None:
    """Remove ``path`` (the folder Hydra made for a run that failed before it began) if it is
    empty, and its empty parents up to the working directory; never the working directory
    itself or a folder above it (a command that runs in ``.``)."""
    cwd = Path.cwd().resolve()
    if Path(path).resolve() == cwd or Path(path).resolve() in cwd.parents:
        return
    try:
        Path(path).rmdir()
    except OSError:
        return
    prune_empty_parents(path)


def record_failed_run(path: Path, hydra_files: dict[str, str], message: str) -> None:
    """Leave a failed run of a sweep visible: its ``.hydra/`` config and the error in
    ``train.log``, so that ``fewshot report`` lists it as failed instead of missing."""
    try:
        for name, text in hydra_files.items():
            target = Path(path) / ".hydra" / name
            if not target.exists():
                atomic_write_text(text, target)
        handler = logging.FileHandler(Path(path) / "train.log", mode="a")
    except OSError:
        return  # nowhere to write: the message on stderr is all there is
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.handle(logging.LogRecord(log.name, logging.ERROR, __file__, 0, message, None, None))
    handler.close()
