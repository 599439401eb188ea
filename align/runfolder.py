"""A stage's output folder: checked before any work, and held by one run at a time.

* :func:`check_output_dir` refuses an ``output_dir`` that is a file or cannot be created, before anything is
  loaded or written (an ``mkdir`` deep inside a stage would otherwise end in a traceback after minutes).
* :func:`hold_output_dir` takes an exclusive ``flock`` on ``output_dir/.align.lock`` for the whole run, so a
  second run started on the same folder refuses at once instead of interleaving its checkpoints and metrics
  with the first one's. The kernel drops a ``flock`` when its holder dies, even by ``kill -9``: a dead run never
  leaves the folder stuck. A run that fails before it wrote anything leaves no folder behind.

Multi-process runs: rank 0 takes the lock (ranks may not share a filesystem), and every rank learns the outcome
through one collective, so a refused lock stops all ranks instead of leaving the others waiting.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from align.errors import AlignError

LOCK_NAME = ".align.lock"


class _Dist(Protocol):
    is_main: bool

    def all_reduce_mean(self, value: float) -> float: ...


def check_output_dir(path: str | Path, key: str = "output_dir") -> Path:
    """``path`` as a Path if it is a folder or can be created as one; else AlignError naming ``key``."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise AlignError(f"{key} {path}: exists and is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise AlignError(f"{key} {path}: no permission to write in it")
        return path
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise AlignError(f"{key} {path}: cannot be created, {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise AlignError(f"{key} {path}: cannot be created, no permission to write in {ancestor}")
    return path


def _holder(lock_file: Path) -> str:
    """Who holds the lock, as its holder wrote it (best effort: it may be mid-write)."""
    try:
        info = json.loads(lock_file.read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"pid {info['pid']} on {info['host']}, started {started}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _acquire(output_dir: Path) -> int:
    """An fd holding the exclusive lock on ``output_dir/.align.lock``; AlignError if another run holds it."""
    lock_file = output_dir / LOCK_NAME
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlignError(
                f"output_dir {output_dir} is in use by another run ({_holder(lock_file)}); wait for it to end "
                "or choose another output_dir"
            ) from None
        # A holder that failed early removes the file; a lock taken on that removed file would be no lock.
        if lock_file.exists() and os.stat(lock_file).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": sys.argv}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    return fd


@contextlib.contextmanager
def hold_output_dir(output_dir: str | Path, dist: _Dist) -> Iterator[Path]:
    """Hold ``output_dir`` for the body (see the module docstring); yields it as a Path."""
    output_dir = check_output_dir(output_dir)
    made = [p for p in (output_dir, *output_dir.parents) if not p.exists()]  # what mkdir will create
    fd, error = None, ""
    if dist.is_main:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            fd = _acquire(output_dir)
        except AlignError as err:
            error = str(err)
        except OSError as err:
            error = f"output_dir {output_dir}: cannot be created ({err.strerror})"
    if dist.all_reduce_mean(0.0 if error else 1.0) < 1.0:
        raise AlignError(error or f"output_dir {output_dir}: rank 0 could not take it (see its error)")
    failed = True
    try:
        yield output_dir
        failed = False
    finally:
        if fd is not None:
            lock_file = output_dir / LOCK_NAME
            # nothing but the lock was written: leave the file system as the run found it
            if failed and [p.name for p in output_dir.iterdir()] == [LOCK_NAME]:
                lock_file.unlink()
                for folder in made:  # deepest first
                    folder.rmdir()
            os.close(fd)
