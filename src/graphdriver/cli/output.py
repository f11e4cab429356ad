"""Terminal-aware input and output for the CLI.

- :func:`atomic_output`: write ``-o FILE`` through a temp file in the same directory, renamed
  over ``FILE`` only when everything was written and synced; on any failure the temp file is
  removed and ``FILE`` is left as it was.
- :class:`Progress`: a one-line progress display on stderr while a long command runs, only
  when stderr is a terminal. It polls a callable from a daemon thread, so the data path is not
  wrapped (the library keeps reading and writing the real file descriptors).
- :func:`file_position` / :func:`file_size`: what the progress polls.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO, TextIO

from graphdriver.errors import InvalidArgument, NotFound

_MiB = 1 << 20


@contextmanager
def atomic_output(path: str) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``path`` only if the block completes.

    The data is written to ``.<name>.<random>.tmp`` beside ``path``, flushed, fsynced, given
    the mode a new file would get (0666 minus the umask), then renamed over ``path``.
    """
    target = os.path.abspath(path)
    directory, base = os.path.split(target)
    if os.path.isdir(target):
        raise InvalidArgument(f"{path}: is a directory")
    if not os.path.isdir(directory):
        raise NotFound(f"{path}: directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def file_position(fd: int) -> Callable[[], tuple[int, int | None]]:
    """A poller giving (offset, size) of a regular file open for reading."""
    size = os.fstat(fd).st_size

    def poll() -> tuple[int, int | None]:
        return os.lseek(fd, 0, os.SEEK_CUR), size

    return poll


def file_size(fd: int) -> Callable[[], tuple[int, int | None]]:
    """A poller giving (bytes written so far, unknown total) of a file open for writing."""

    def poll() -> tuple[int, int | None]:
        return os.fstat(fd).st_size, None

    return poll


def _format(label: str, done: int, total: int | None) -> str:
    if total:
        pct = min(100, done * 100 // total)
        return f"{label}: {pct:3d}% ({done / _MiB:.1f} of {total / _MiB:.1f} MiB)"
    return f"{label}: {done / _MiB:.1f} MiB"


class Progress:
    """Show ``label: 42% (50.0 of 120.0 MiB)`` on ``stream`` while the ``with`` block runs.

    Does nothing unless ``stream`` is a terminal. The line is erased at the end, so the
    command's real output is not interleaved with progress debris.
    """

    interval = 0.25

    def __init__(self, stream: TextIO, label: str, poll: Callable[[], tuple[int, int | None]]) -> None:
        self._stream = stream
        self._label = label
        self._poll = poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._width = 0

    def __enter__(self) -> Progress:
        if self._stream.isatty():
            self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        if self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                line = _format(self._label, *self._poll())
            except OSError:
                return
            pad = max(0, self._width - len(line))
            self._stream.write("\r" + line + " " * pad)
            self._stream.flush()
            self._width = max(self._width, len(line))
