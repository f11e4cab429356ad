"""File locks that let many processes share one layer store with no daemon.

Every lock is an ``fcntl.flock`` on a file under ``<root>/locks/``. A flock belongs to the open
file description, so it is released by the kernel when its holder dies (SIGKILL included): a
crash never leaves a lock behind, and "can I take this lock?" is how recovery tells a crashed
operation from one still running in another process. Threads of one process exclude each other
too, because each acquisition opens the file anew.

The locks, and the only order in which they may be nested (outermost first)::

    locks/chain-<hex>.lock   one import per chain ID at a time            (imports)
    locks/layer-<id>.lock    build, mount, unmount, remove of one layer   (exclusive)
                             diff / changes / verify read it              (shared)
                             a child's lock before its parent's
    locks/store.lock         metadata writes and recovery; held for milliseconds, never while
                             a layer is applied, and nothing is waited for while holding it

A lock file may be deleted (the layer is gone) while its holder still has it. An acquirer
therefore checks after locking that the path still names the file it locked, and starts over
if not, so two holders never hold "the same" lock through two different inodes.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from graphdriver.errors import Busy
from graphdriver.ids import validate_id

__all__ = ["FileLock", "LockDir"]


class FileLock:
    """One flock'ed file. ``acquire`` blocks unless ``blocking=False`` (then Busy if held)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, shared: bool = False, blocking: bool = True) -> None:
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held by this object")
        op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        if not blocking:
            op |= fcntl.LOCK_NB
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, op)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise Busy(f"{self.path.name}: held by another operation") from None
                raise
            st = os.fstat(fd)
            try:
                now = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
                self._fd = fd
                return
            os.close(fd)  # deleted or replaced while we waited: lock the current file

    def try_acquire(self, *, shared: bool = False) -> bool:
        """Take the lock if it is free now; False if another holder has it."""
        try:
            self.acquire(shared=shared, blocking=False)
        except Busy:
            return False
        return True

    def release(self, *, unlink: bool = False) -> None:
        """Release; with ``unlink`` the file is deleted first (only while held, so it is safe)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if unlink:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LockDir:
    """The store's ``locks/`` directory: makes the named locks of the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(mode=0o700, exist_ok=True)

    def store(self) -> FileLock:
        return FileLock(self.path / "store.lock")

    def layer(self, layer_id: str) -> FileLock:
        return FileLock(self.path / f"layer-{validate_id(layer_id)}.lock")

    def chain(self, chain_id: str) -> FileLock:
        algo, _, hexpart = chain_id.partition(":")
        return FileLock(self.path / f"chain-{validate_id(algo + '-' + hexpart)}.lock")

    @contextmanager
    def holding(self, lock: FileLock, *, shared: bool = False, unlink: bool = False) -> Iterator[None]:
        lock.acquire(shared=shared)
        try:
            yield
        finally:
            lock.release(unlink=unlink)

    def is_held(self, lock: FileLock) -> bool:
        """Whether some operation (in any process) holds ``lock`` right now."""
        if not lock.path.exists():
            return False
        if lock.try_acquire():
            lock.release()
            return False
        return True
