"""Mount reference counts that survive the process and are checked against the kernel.

The CLI mounts a layer in one process and unmounts it in another, so a driver cannot keep its
get/put counts in memory. :class:`MountCounter` keeps one small file per layer id under a state
directory, locked with ``fcntl.flock`` while it is read, the mount or unmount is done, and the
new count written. A count is only believed while the kernel agrees::

    <state_dir>/<id>      "<count> <kind> <boot id>\\n<path>\\n"   kind: "mount" or "plain"

- ``acquire``: count > 0 and the path is a mount point -> count + 1; otherwise (no count, or a
  count left behind after someone unmounted the layer by hand) mount again and count = 1.
- ``release``: count - 1; at 0 unmount and drop the file. Releasing an unknown id (or one the
  kernel already unmounted) returns 0 without error, so ``put`` after ``cleanup`` is harmless.

*Plain* counts (``mounts=False``) are for layers that are not mounted at all (overlay2's base
layer hands out its ``diff/`` directly): they still count gets so that ``remove`` can refuse a
layer in use, but there is no kernel state to check them against, so a process that dies
holding one leaves the count until :meth:`MountCounter.forget` (or the driver's ``cleanup``) or
the next boot (each count records the kernel's boot id).

Locks are per id, so mounts of different layers run concurrently.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from graphdriver.ids import validate_id
from graphdriver.mount import is_mountpoint

__all__ = ["MountCounter"]

_KIND_MOUNT = "mount"
_KIND_PLAIN = "plain"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return "-"


@dataclass
class _Entry:
    count: int
    kind: str
    path: str
    boot: str = ""

    def live(self) -> bool:
        """Whether the count is still true: this boot's plain counts are; mounted ones are while
        the kernel agrees."""
        if self.count <= 0:
            return False
        if self.kind == _KIND_PLAIN:
            return self.boot == _boot_id()
        return is_mountpoint(self.path)


class MountCounter:
    """Per-id get/put counts in ``state_dir``, shared by every process that uses the same dir."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)

    # -- files and locks ----------------------------------------------------------------------

    def _file(self, id: str) -> Path:
        return self.state_dir / validate_id(id)

    @contextmanager
    def _locked(self, id: str) -> Iterator[int]:
        """Hold the lock of ``id``'s count file; yields its fd (the file may be empty: count 0)."""
        path = self._file(id)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # the holder before us may have removed the file (count reached 0): start over
                st = os.fstat(fd)
                try:
                    current = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    current = None
                if current is None or (current.st_ino, current.st_dev) != (st.st_ino, st.st_dev):
                    continue
                yield fd
                return
            finally:
                os.close(fd)

    @staticmethod
    def _read(fd: int) -> _Entry:
        os.lseek(fd, 0, os.SEEK_SET)
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        head, _, rest = data.decode("utf-8", "surrogateescape").partition("\n")
        fields = head.split()
        try:
            count = int(fields[0])
            kind = fields[1]
        except (IndexError, ValueError):
            return _Entry(0, _KIND_MOUNT, "")
        boot = fields[2] if len(fields) > 2 else ""
        return _Entry(max(count, 0), kind, rest.rstrip("\n"), boot)

    @staticmethod
    def _write(fd: int, entry: _Entry) -> None:
        text = f"{entry.count} {entry.kind} {entry.boot or _boot_id()}\n{entry.path}\n"
        data = text.encode("utf-8", "surrogateescape")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def _drop(self, id: str) -> None:
        """Remove the count file; called with the lock held (waiters notice and reopen)."""
        try:
            os.unlink(self._file(id))
        except FileNotFoundError:
            pass

    # -- counting -------------------------------------------------------------------------------

    def acquire(self, id: str, path: Path, do_mount: Callable[[], None], *, mounts: bool = True) -> int:
        """Count one get of ``id`` at ``path``; calls ``do_mount`` when nothing is mounted yet.

        With ``mounts=False`` the path is never mounted: ``do_mount`` is still called on the first
        acquire (it may prepare the path), and the count is not checked against the kernel.
        Returns the new count. If ``do_mount`` raises, the count is unchanged (0).
        """
        kind = _KIND_MOUNT if mounts else _KIND_PLAIN
        with self._locked(id) as fd:
            entry = self._read(fd)
            if entry.live() and entry.kind == kind:
                entry.count += 1
            else:
                try:
                    do_mount()
                except BaseException:
                    self._drop(id)
                    raise
                entry = _Entry(1, kind, os.path.abspath(path))
            self._write(fd, entry)
            return entry.count

    def release(self, id: str, path: Path, do_unmount: Callable[[], None]) -> int:
        """Release one get of ``id``; the last one calls ``do_unmount``. Returns the new count.

        An id with no count (never acquired, already released, or unmounted behind our back) is
        0, not an error; ``do_unmount`` is then still called when ``path`` is a mount point, so a
        stray mount does not outlive its last put. If ``do_unmount`` raises, the count stays 1.
        """
        with self._locked(id) as fd:
            entry = self._read(fd)
            if not entry.live():
                self._drop(id)
                if entry.kind == _KIND_MOUNT and is_mountpoint(path):
                    do_unmount()
                return 0
            entry.count -= 1
            if entry.count == 0:
                do_unmount()
                self._drop(id)
                return 0
            self._write(fd, entry)
            return entry.count

    def run_if_idle(self, id: str, action: Callable[[], None]) -> int:
        """Run ``action`` while holding ``id``'s lock if its count is 0 (a stale count is reset
        first); return the live count otherwise, without running it. ``remove`` uses this so
        that no other process can get the layer between the check and the removal."""
        with self._locked(id) as fd:
            entry = self._read(fd)
            if entry.live():
                return entry.count
            action()
            self._drop(id)
            return 0

    def count(self, id: str) -> int:
        """The current count of ``id``; a mounted count the kernel no longer agrees with is reset
        to 0 (the layer was unmounted outside this library)."""
        if not self._file(id).exists():
            return 0
        with self._locked(id) as fd:
            entry = self._read(fd)
            if entry.live():
                return entry.count
            self._drop(id)
            return 0

    def forget(self, id: str) -> None:
        """Drop ``id``'s count whatever it is (after a forced unmount, or on remove)."""
        if not self._file(id).exists():
            return
        with self._locked(id):
            self._drop(id)

    def active(self) -> dict[str, int]:
        """Every id with a live count (stale ones are reset on the way)."""
        try:
            names = sorted(os.listdir(self.state_dir))
        except FileNotFoundError:
            return {}
        out = {}
        for name in names:
            if name.startswith("."):
                continue
            n = self.count(name)
            if n > 0:
                out[name] = n
        return out

    def path_of(self, id: str) -> str | None:
        """The path recorded at the first acquire of ``id``, if it has a count."""
        if not self._file(id).exists():
            return None
        with self._locked(id) as fd:
            entry = self._read(fd)
            return entry.path if entry.count > 0 else None
