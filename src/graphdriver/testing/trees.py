"""Exact snapshots of directory trees, their differences, and a sample tree with every file kind.

:func:`snapshot_tree` records, for every path below a root (keys are "/"-rooted: ``"/"``,
``"/etc/passwd"``), what a layer must reproduce: type, permission bits with set-id and sticky,
owner, size, mtime with nanoseconds, device numbers, symlink target, xattrs, a sha256 of regular
content and the hard-link group (the smallest path of the group, so it is the same in two trees
that link the same names). :func:`diff_snapshots` lists the differences in words
(``"/etc/passwd: mode 0644 != 0600"``). Every driver's tests compare trees with these, and so
does the comparison with umoci's output.

:func:`make_sample_tree` builds a small tree holding every kind of entry a layer can hold (the
privileged ones only as root).

The walk uses directory fds and never follows a symlink. Run unprivileged, a file or directory
the caller owns but may not read (mode 0000, 0222) is read by granting the owner read/search
permission for the moment, then restoring the exact mode.
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import hashlib
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from graphdriver.fs.copy import open_as_owner
from graphdriver.fs.xattrs import is_overlay_xattr

__all__ = [
    "FIELDS",
    "Entry",
    "diff_snapshots",
    "format_entry",
    "make_sample_tree",
    "snapshot_tree",
]

FIELDS = ("type", "mode", "uid", "gid", "size", "mtime", "rdev", "target", "xattrs", "content", "link")
"""Field names :func:`diff_snapshots` can be told to ignore."""

_TYPES = (
    (stat.S_ISDIR, "dir"),
    (stat.S_ISREG, "file"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISCHR, "chr"),
    (stat.S_ISBLK, "blk"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True)
class Entry:
    """One path of a snapshot."""

    type: str
    """dir, file, symlink, chr, blk, fifo or socket"""
    mode: int
    """permission bits with setuid, setgid and sticky (``& 0o7777``)"""
    uid: int
    gid: int
    size: int
    """``st_size``; 0 for directories, whose size depends on the filesystem"""
    mtime_ns: int
    rdev: tuple[int, int] | None = None
    """(major, minor) of a device node"""
    target: str | None = None
    """a symlink's target"""
    xattrs: tuple[tuple[str, bytes], ...] = ()
    """sorted by name"""
    sha256: str | None = None
    """hex digest of a regular file's content (``content=True``)"""
    link_group: str | None = None
    """the smallest path of this entry's hard-link group in the tree; None if it has one name"""


def _type_name(mode: int) -> str:
    for test, name in _TYPES:
        if test(mode):
            return name
    return "unknown"


def _xattrs(target: str | int, overlay: bool) -> tuple[tuple[str, bytes], ...]:
    follow = isinstance(target, int)
    try:
        names = os.listxattr(target, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENODATA):
            return ()
        raise
    out = []
    for name in sorted(names):
        if not overlay and is_overlay_xattr(name):
            continue
        try:
            out.append((name, os.getxattr(target, name, follow_symlinks=follow)))
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed meanwhile
                raise
    return tuple(out)


def _digest(fd: int) -> str:
    h = hashlib.sha256()
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _entry(st: os.stat_result, **extra: object) -> Entry:
    kind = _type_name(st.st_mode)
    rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("chr", "blk") else None
    return Entry(
        type=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=0 if kind == "dir" else st.st_size,
        mtime_ns=st.st_mtime_ns,
        rdev=rdev,
        **extra,  # type: ignore[arg-type]
    )


def snapshot_tree(
    root: Path | str, *, content: bool = True, overlay_xattrs: bool = False
) -> dict[str, Entry]:
    """Record every path below ``root`` (``root`` itself as ``"/"``), sorted by path.

    Args:
        root: the tree; it is never followed if it is a symlink.
        content: hash regular files' content (sha256).
        overlay_xattrs: keep ``trusted.overlay.*`` / ``user.overlay.*`` xattrs (left out by default).
    """
    entries: dict[str, Entry] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    root_fd = os.open(root, _DIR_FLAGS)
    root_st = os.fstat(root_fd)
    entries["/"] = _entry(root_st, xattrs=_xattrs(root_fd, overlay_xattrs))
    stack: list[tuple[int, str, int | None]] = [(root_fd, "", None)]
    try:
        while stack:
            dir_fd, prefix, restore = stack.pop()
            try:
                with os.scandir(dir_fd) as it:
                    dirents = list(it)
                for de in dirents:
                    path = f"{prefix}/{de.name}"
                    st = de.stat(follow_symlinks=False)
                    proc = f"/proc/self/fd/{dir_fd}/{de.name}"
                    kind = _type_name(st.st_mode)
                    if kind == "dir":
                        sub_fd, sub_restore = open_as_owner(de.name, dir_fd, st, _DIR_FLAGS)
                        entries[path] = _entry(st, xattrs=_xattrs(sub_fd, overlay_xattrs))
                        stack.append((sub_fd, path, sub_restore))
                        continue
                    if st.st_nlink > 1:
                        inodes.setdefault((st.st_dev, st.st_ino), []).append(path)
                    if kind == "file":
                        fd, _ = open_as_owner(de.name, dir_fd, st, _FILE_FLAGS)
                        try:
                            xattrs = _xattrs(fd, overlay_xattrs)
                            digest = _digest(fd) if content else None
                        finally:
                            os.close(fd)
                        entries[path] = _entry(st, xattrs=xattrs, sha256=digest)
                    elif kind == "symlink":
                        target = os.readlink(de.name, dir_fd=dir_fd)
                        entries[path] = _entry(st, xattrs=_xattrs(proc, overlay_xattrs), target=target)
                    else:
                        entries[path] = _entry(st, xattrs=_xattrs(proc, overlay_xattrs))
            finally:
                if restore is not None:
                    os.fchmod(dir_fd, restore)
                os.close(dir_fd)
    finally:
        for fd, _, restore in stack:
            if restore is not None:
                os.fchmod(fd, restore)
            os.close(fd)
    for paths in inodes.values():
        if len(paths) > 1:
            group = min(paths)
            for path in paths:
                entries[path] = dataclasses.replace(entries[path], link_group=group)
    return dict(sorted(entries.items()))


def _fmt_time(ns: int) -> str:
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def _fmt_xattr(value: bytes | None) -> str:
    if value is None:
        return "(absent)"
    return repr(value) if len(value) <= 40 else f"{value[:40]!r}... ({len(value)} bytes)"


def format_entry(entry: Entry) -> str:
    """One line describing ``entry`` (type, mode, owner, size, mtime and whatever else it has)."""
    parts = [entry.type, f"{entry.mode:04o}", f"{entry.uid}:{entry.gid}", f"size={entry.size}"]
    parts.append(f"mtime={_fmt_time(entry.mtime_ns)}")
    if entry.rdev is not None:
        parts.append(f"rdev={entry.rdev[0]}:{entry.rdev[1]}")
    if entry.target is not None:
        parts.append(f"-> {entry.target!r}")
    if entry.xattrs:
        parts.append("xattrs=" + ",".join(name for name, _ in entry.xattrs))
    if entry.sha256 is not None:
        parts.append(f"sha256={entry.sha256[:12]}")
    if entry.link_group is not None:
        parts.append(f"link={entry.link_group}")
    return " ".join(parts)


def _excluded(path: str, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        if fnmatch.fnmatchcase(path, pattern):
            return True
        # a pattern naming a directory excludes what is below it too
        parent = path
        while (parent := os.path.dirname(parent)) != "/":
            if fnmatch.fnmatchcase(parent, pattern):
                return True
    return False


def _entry_diffs(path: str, x: Entry, y: Entry, skip: set[str]) -> list[str]:
    if x.type != y.type and "type" not in skip:
        return [f"{path}: type {x.type} != {y.type}"]
    out = []
    if "mode" not in skip and x.mode != y.mode:
        out.append(f"{path}: mode {x.mode:04o} != {y.mode:04o}")
    if "uid" not in skip and x.uid != y.uid:
        out.append(f"{path}: uid {x.uid} != {y.uid}")
    if "gid" not in skip and x.gid != y.gid:
        out.append(f"{path}: gid {x.gid} != {y.gid}")
    if "size" not in skip and x.size != y.size:
        out.append(f"{path}: size {x.size} != {y.size}")
    if "mtime" not in skip and x.mtime_ns != y.mtime_ns:
        out.append(f"{path}: mtime {_fmt_time(x.mtime_ns)} != {_fmt_time(y.mtime_ns)}")
    if "rdev" not in skip and x.rdev != y.rdev:
        out.append(f"{path}: rdev {x.rdev} != {y.rdev}")
    if "target" not in skip and x.target != y.target:
        out.append(f"{path}: target {x.target!r} != {y.target!r}")
    if "xattrs" not in skip and x.xattrs != y.xattrs:
        xa, ya = dict(x.xattrs), dict(y.xattrs)
        for name in sorted(xa.keys() | ya.keys()):
            if xa.get(name) != ya.get(name):
                out.append(f"{path}: xattr {name} {_fmt_xattr(xa.get(name))} != {_fmt_xattr(ya.get(name))}")
    if "content" not in skip and x.sha256 != y.sha256:
        out.append(f"{path}: content sha256 {str(x.sha256)[:12]} != {str(y.sha256)[:12]}")
    if "link" not in skip and x.link_group != y.link_group:
        out.append(f"{path}: hard-link group {x.link_group} != {y.link_group}")
    return out


def diff_snapshots(
    a: dict[str, Entry],
    b: dict[str, Entry],
    *,
    ignore_mtime_dirs: bool = False,
    ignore: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> list[str]:
    """The differences between two snapshots, one readable line each, in path order.

    Args:
        a, b: snapshots from :func:`snapshot_tree`.
        ignore_mtime_dirs: do not compare directories' mtimes.
        ignore: field names (:data:`FIELDS`) not to compare, e.g. ``("uid", "gid")``.
        exclude: fnmatch patterns of paths to leave out, with everything below them
            (``"/proc"``, ``"/.gd-done"``).

    Lines read ``"/etc/passwd: mode 0644 != 0600"`` (a's value first), ``"/x: only in a"``.
    """
    skip = set(ignore)
    unknown = skip - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown snapshot fields {sorted(unknown)}; known: {', '.join(FIELDS)}")
    patterns = tuple(exclude)
    out: list[str] = []
    for path in sorted(a.keys() | b.keys()):
        if patterns and _excluded(path, patterns):
            continue
        x, y = a.get(path), b.get(path)
        if x is None:
            out.append(f"{path}: only in b")
            continue
        if y is None:
            out.append(f"{path}: only in a")
            continue
        entry_skip = skip | {"mtime"} if ignore_mtime_dirs and x.type == y.type == "dir" else skip
        out.extend(_entry_diffs(path, x, y, entry_skip))
    return out


# -- a sample tree ---------------------------------------------------------------------------------

SAMPLE_CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
"""A valid ``security.capability`` value (VFS_CAP_REVISION_2, effective, CAP_NET_RAW permitted)."""

BIG_SIZE = (1 << 20) + 123


def _set_times_post_order(root: Path, start_ns: int) -> None:
    """Give every entry below and including ``root`` distinct ns times, children before parents."""
    stamp = start_ns
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in sorted(filenames) + sorted(links):
            stamp += 1_000_000_007
            os.utime(os.path.join(dirpath, name), ns=(stamp, stamp), follow_symlinks=False)
        for name in sorted(set(dirnames) - set(links)):
            stamp += 1_000_000_007
            os.utime(os.path.join(dirpath, name), ns=(stamp, stamp + 1), follow_symlinks=False)
    stamp += 1_000_000_007
    os.utime(root, ns=(stamp, stamp), follow_symlinks=False)


def make_sample_tree(root: Path | str, *, privileged: bool | None = None) -> None:
    """Fill the existing empty directory ``root`` with every kind of entry a layer can hold.

    Regular files (empty, 1 MiB + 123 bytes, setuid, mode 0000 and 0222, a 255-byte name, a
    non-ASCII name), directories (nested 8 deep, sticky 1777, setgid 2755, read-only 0555 with a
    file in it), symlinks (relative, absolute, dangling, to a directory), a hard-link pair across
    directories, a fifo, ``user.*`` xattrs on a file, a directory and a symlink-free path, and
    distinct nanosecond mtimes on everything. ``privileged`` (default: running as root) adds
    char and block devices, ``security.capability``, ``trusted.*`` and files and directories
    owned by other users.
    """
    root = Path(root)
    if privileged is None:
        privileged = os.geteuid() == 0
    old_umask = os.umask(0)
    try:
        for d, mode in (
            ("bin", 0o755),
            ("etc", 0o755),
            ("data", 0o750),
            ("data/sub", 0o755),
            ("tmp", 0o1777),
            ("shared", 0o2775),
            ("ro", 0o755),
            *(("/".join("abcdefgh"[: i + 1]), 0o755) for i in range(8)),
        ):
            (root / d).mkdir(mode=mode)
            os.chmod(root / d, mode)
        files = {
            "bin/tool": (0o4755, b"#!/bin/sh\necho tool\n"),
            "etc/passwd": (0o644, b"root:x:0:0:root:/root:/bin/sh\n"),
            "etc/shadow": (0o000, b"root:*:19000:0:99999:7:::\n"),
            "etc/write-only": (0o222, b"Some data"),
            "data/empty": (0o644, b""),
            "data/big": (0o600, bytes(range(256)) * (BIG_SIZE // 256) + b"x" * (BIG_SIZE % 256)),
            "data/hard1": (0o640, b"linked content\n"),
            "ro/inside": (0o444, b"in a read-only dir\n"),
            "a/b/c/d/e/f/g/h/deep": (0o644, b"deep\n"),
            "na\u00efve file \u2603": (0o644, b"unicode name\n"),
            "n" * 255: (0o644, b"long name\n"),
        }
        for rel, (mode, data) in files.items():
            fd = os.open(root / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
        os.link(root / "data/hard1", root / "data/sub/hard2")
        os.symlink("etc/passwd", root / "link-rel")
        os.symlink("/etc/passwd", root / "link-abs")
        os.symlink("../nowhere/at/all", root / "link-dangling")
        os.symlink("a/b/c", root / "link-dir")
        os.mkfifo(root / "fifo", 0o640)
        os.setxattr(root / "bin/tool", "user.origin", b"sample")
        os.setxattr(root / "data", "user.dir-note", b"\x00binary\xff")
        if privileged:
            os.mkdir(root / "dev", 0o755)
            os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            os.mknod(root / "dev/loop7", 0o660 | stat.S_IFBLK, os.makedev(7, 7))
            os.chown(root / "dev/loop7", 0, 6)
            (root / "ping").write_bytes(b"\x7fELF pretend\n")
            os.chmod(root / "ping", 0o755)
            os.setxattr(root / "ping", "security.capability", SAMPLE_CAPABILITY)
            os.setxattr(root / "etc/passwd", "trusted.sample", b"t")
            os.mkdir(root / "home", 0o755)
            os.mkdir(root / "home/user", 0o700)
            os.chown(root / "home/user", 1000, 1000)
            (root / "home/user/notes").write_bytes(b"mine\n")
            os.chmod(root / "home/user/notes", 0o600)
            os.chown(root / "home/user/notes", 1000, 100)
            os.chown(root / "link-rel", 1000, 1000, follow_symlinks=False)
            os.chown(root / "shared", 0, 50)
            os.chmod(root / "shared", 0o2775)
        os.chmod(root / "ro", 0o555)
    finally:
        os.umask(old_umask)
    _set_times_post_order(root, 1_500_000_000_123_456_789)
