"""A sentinel tree: the oracle that shows an operation touched nothing outside its root.

A hostile layer (or a removal that follows a symlink) does its damage *outside* the directory it
was given. :class:`Sentinel` plants a small tree of valuable-looking files next to that
directory, takes a snapshot of everything around it, and afterwards says exactly what changed,
byte for byte and stat for stat (the moby ``testBreakout`` oracle, extended)::

    base/
        victim/                 0750, fixed times
            hello               unique bytes, mode 0400, xattr user.sentinel, fixed times
            dir/inner           unique bytes
            link -> hello
            fifo
        victim-evil/secret      unique bytes: the sibling-prefix trap (base/victim vs base/victim-evil)
        <excluded names>        the roots under test (a layer root, a store root...): not compared

Use::

    s = Sentinel(base, exclude=("store",))     # plants victim/ and victim-evil/ in base
    ...                                        # prepare the root under test, symlinks to s.victim...
    s.arm()                                    # snapshot everything in base but the excluded names
    ...                                        # run the hostile operation
    s.assert_intact(scan=[base / "store"])     # nothing changed, and no copy of a secret in store

The snapshot of each path holds its type and mode, owner, size, link count, inode number, mtime
and ctime with nanoseconds (ctime moves on any chmod, chown, xattr change, link or write, even one
that restores the old value), every xattr, and the content (bytes, link target, or the sorted
names of a directory). Access times are not compared: reading is not damage. A copy of a secret
inside a scanned root (a hard link or a read through a symlink into the layer) is found by content.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SENTINEL_TIME_NS", "Sentinel", "SnapshotEntry", "diff_snapshots", "snapshot_tree"]

SENTINEL_TIME_NS = 1_234_567_890_123_456_789
"""the mtime and atime of the sentinel's files (2009-02-13, with nanoseconds)"""


@dataclass(frozen=True)
class SnapshotEntry:
    """Everything :func:`snapshot_tree` records about one path."""

    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    ino: int
    mtime_ns: int
    ctime_ns: int
    xattrs: tuple[tuple[str, bytes], ...]
    content: bytes | str | tuple[str, ...] | None
    """file bytes, symlink target, sorted directory entries, or None (devices, fifos)"""


def _open_nofollow(path: str) -> int:
    """Open a regular file for reading without following a symlink and, where permitted,
    without moving its access time."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError:
        return os.open(path, flags)


def _entry(path: str) -> SnapshotEntry:
    st = os.lstat(path)
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
        xattrs = tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)
    except OSError:
        xattrs = ()
    content: bytes | str | tuple[str, ...] | None = None
    if stat.S_ISREG(st.st_mode):
        fd = _open_nofollow(path)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            content = b"".join(chunks)
        finally:
            os.close(fd)
    elif stat.S_ISLNK(st.st_mode):
        content = os.readlink(path)
    elif stat.S_ISDIR(st.st_mode):
        content = tuple(sorted(os.listdir(path)))
    return SnapshotEntry(
        mode=st.st_mode,
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size,
        nlink=st.st_nlink,
        ino=st.st_ino,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        xattrs=xattrs,
        content=content,
    )


def snapshot_tree(
    base: Path | str, *, exclude: Callable[[str], bool] | None = None
) -> dict[str, SnapshotEntry]:
    """Every path under ``base`` (``"."`` for base itself), symlinks never followed. ``exclude``
    gets each path relative to base; a directory it returns True for is neither recorded nor
    entered (its own entry in the parent's name list still counts)."""
    root = os.fspath(base)
    out: dict[str, SnapshotEntry] = {".": _entry(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        keep = []
        for name in sorted(dirnames) + sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if exclude is not None and exclude(rel):
                continue
            out[rel] = _entry(full)
            if name in dirnames:
                keep.append(name)
        dirnames[:] = keep
    return out


def diff_snapshots(before: dict[str, SnapshotEntry], after: dict[str, SnapshotEntry]) -> list[str]:
    """What differs between two snapshots, one readable line per path."""
    lines = []
    for path in sorted(set(before) | set(after)):
        old, new = before.get(path), after.get(path)
        if old == new:
            continue
        if old is None:
            lines.append(f"{path}: appeared")
        elif new is None:
            lines.append(f"{path}: vanished")
        else:
            fields = [
                f"{name} {getattr(old, name)!r:.80} -> {getattr(new, name)!r:.80}"
                for name in SnapshotEntry.__dataclass_fields__
                if getattr(old, name) != getattr(new, name)
            ]
            lines.append(f"{path}: " + "; ".join(fields))
    return lines


class Sentinel:
    """A planted sentinel tree in ``base`` and the snapshot that proves it untouched.

    ``exclude``: top-level names in ``base`` that are the roots under test (not compared).
    ``plant=False`` adopts a sentinel tree another process planted in ``base`` (its secrets are
    read back from the files). Planting needs no privilege; the fifo is skipped where mkfifo is
    not permitted.
    """

    def __init__(self, base: Path | str, *, exclude: Iterable[str] = (), plant: bool = True) -> None:
        self.base = Path(base)
        self.exclude = frozenset(exclude)
        self.victim = self.base / "victim"
        self.evil = self.base / "victim-evil"
        self._before: dict[str, SnapshotEntry] | None = None
        if plant:
            tag = uuid.uuid4().hex
            self.hello = f"sentinel hello {tag}\n".encode()
            self.inner = f"sentinel inner {tag}\n".encode()
            self.secret = f"sentinel secret {tag}\n".encode()
            self._plant()
        else:
            self.hello = (self.victim / "hello").read_bytes()
            self.inner = (self.victim / "dir/inner").read_bytes()
            self.secret = (self.evil / "secret").read_bytes()

    @property
    def secrets(self) -> tuple[bytes, ...]:
        """The unique contents that must never show up inside a root under test."""
        return (self.hello, self.inner, self.secret)

    def _plant(self) -> None:
        v = self.victim
        (v / "dir").mkdir(parents=True)
        (v / "dir/inner").write_bytes(self.inner)
        (v / "hello").write_bytes(self.hello)
        try:
            os.setxattr(v / "hello", "user.sentinel", b"1")
        except OSError:
            pass  # a filesystem without user xattrs: the rest of the oracle still holds
        os.symlink("hello", v / "link")
        try:
            os.mkfifo(v / "fifo", 0o600)
        except OSError:
            pass
        self.evil.mkdir()
        (self.evil / "secret").write_bytes(self.secret)
        os.chmod(v / "hello", 0o400)
        os.chmod(v / "dir", 0o750)
        os.chmod(v, 0o750)
        for p in (v / "hello", v / "dir/inner", v / "dir", self.evil / "secret", self.evil, v):
            os.utime(p, ns=(SENTINEL_TIME_NS, SENTINEL_TIME_NS))

    def _excluded(self, rel: str) -> bool:
        return rel in self.exclude

    def snapshot(self) -> dict[str, SnapshotEntry]:
        """Everything in ``base`` except the excluded roots."""
        return snapshot_tree(self.base, exclude=self._excluded)

    def arm(self) -> None:
        """Take the reference snapshot (after the roots under test are set up)."""
        self._before = self.snapshot()

    def changes(self) -> list[str]:
        """What changed outside the excluded roots since :meth:`arm`."""
        if self._before is None:
            raise RuntimeError("Sentinel.arm() was not called")
        before = dict(self._before)
        after = self.snapshot()
        # base's own directory listing may differ only by the excluded roots appearing or going
        for snap in (before, after):
            entry = snap["."]
            assert isinstance(entry.content, tuple)
            snap["."] = SnapshotEntry(
                **{
                    **entry.__dict__,
                    "content": tuple(n for n in entry.content if n not in self.exclude),
                    "nlink": 0,
                    "mtime_ns": 0,
                    "ctime_ns": 0,
                    "size": 0,
                }
            )
        return diff_snapshots(before, after)

    def copies_under(self, root: Path | str) -> list[str]:
        """Regular files under ``root`` (symlinks never followed) that hold a secret's bytes."""
        longest = max(len(s) for s in self.secrets)
        found = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            for name in [*dirnames, *filenames]:
                full = os.path.join(dirpath, name)
                try:
                    st = os.lstat(full)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode) or st.st_size > longest:
                    continue
                fd = _open_nofollow(full)
                try:
                    data = os.read(fd, longest + 1)
                finally:
                    os.close(fd)
                if data in self.secrets:
                    found.append(full)
        return found

    def assert_intact(self, *, scan: Iterable[Path | str] = ()) -> None:
        """Fail (AssertionError listing every difference) unless nothing outside the excluded
        roots changed since :meth:`arm` and no root in ``scan`` holds a copy of a secret."""
        problems = self.changes()
        for root in scan:
            if os.path.isdir(root):
                problems += [f"{p}: holds a sentinel's bytes" for p in self.copies_under(root)]
        if problems:
            raise AssertionError("the sentinel tree was touched:\n  " + "\n  ".join(problems))
