"""snapshot_tree and diff_snapshots: what a snapshot records, and how differences read."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from pathlib import Path

import pytest

from graphdriver.testing.trees import (
    BIG_SIZE,
    FIELDS,
    Entry,
    diff_snapshots,
    format_entry,
    make_sample_tree,
    snapshot_tree,
)

ROOT = os.geteuid() == 0


def test_every_field_is_recorded(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    (root / "dir").mkdir(mode=0o750)
    os.chmod(root / "dir", 0o1750)
    (root / "dir" / "file").write_bytes(b"hello\n")
    os.chmod(root / "dir" / "file", 0o4640)
    os.link(root / "dir" / "file", root / "a-link")
    os.symlink("dir/file", root / "sym")
    os.mkfifo(root / "fifo", 0o600)
    os.setxattr(root / "dir" / "file", "user.b", b"2")
    os.setxattr(root / "dir" / "file", "user.a", b"1")
    os.setxattr(root / "dir", "user.overlay.opaque", b"y")
    os.utime(root / "dir" / "file", ns=(1, 1_600_000_000_123_456_789))
    if ROOT:
        os.mknod(root / "tty", 0o620 | stat.S_IFCHR, os.makedev(4, 1))
        os.chown(root / "dir" / "file", 12, 34)
        os.chmod(root / "dir" / "file", 0o4640)

    snap = snapshot_tree(root)
    assert list(snap) == sorted(snap) and snap["/"].type == "dir"
    me = (os.geteuid(), os.getegid())
    file = snap["/dir/file"]
    assert file == Entry(
        type="file",
        mode=0o4640,
        uid=12 if ROOT else me[0],
        gid=34 if ROOT else me[1],
        size=6,
        mtime_ns=1_600_000_000_123_456_789,
        xattrs=(("user.a", b"1"), ("user.b", b"2")),
        sha256=hashlib.sha256(b"hello\n").hexdigest(),
        link_group="/a-link",
    )
    assert snap["/a-link"].link_group == "/a-link"
    assert (snap["/dir"].mode, snap["/dir"].size, snap["/dir"].xattrs) == (0o1750, 0, ())
    assert snapshot_tree(root, overlay_xattrs=True)["/dir"].xattrs == (("user.overlay.opaque", b"y"),)
    assert (snap["/sym"].type, snap["/sym"].target, snap["/sym"].size) == ("symlink", "dir/file", 8)
    assert snap["/fifo"].type == "fifo" and snap["/fifo"].rdev is None
    if ROOT:
        assert (snap["/tty"].type, snap["/tty"].rdev) == ("chr", (4, 1))
    assert snapshot_tree(root, content=False)["/dir/file"].sha256 is None


def test_sample_tree(tmp_path: Path) -> None:
    make_sample_tree(tmp_path)
    snap = snapshot_tree(tmp_path)
    types = {e.type for e in snap.values()}
    assert types == (
        {"dir", "file", "symlink", "fifo", "chr", "blk"} if ROOT else {"dir", "file", "symlink", "fifo"}
    )
    assert snap["/data/big"].size == BIG_SIZE
    assert snap["/etc/shadow"].mode == 0o000 and snap["/bin/tool"].mode == 0o4755
    assert snap["/tmp"].mode == 0o1777 and snap["/shared"].mode == 0o2775
    assert snap["/data/hard1"].link_group == snap["/data/sub/hard2"].link_group == "/data/hard1"
    # distinct, with nanoseconds (the two names of the hard-linked inode share one)
    assert len({e.mtime_ns for e in snap.values()}) == len(snap) - 1
    if ROOT:
        assert dict(snap["/ping"].xattrs)["security.capability"][:4] == b"\x01\x00\x00\x02"


def _entry(**kw: object) -> Entry:
    base = Entry(type="file", mode=0o644, uid=0, gid=0, size=3, mtime_ns=1_000_000_000, sha256="ab" * 32)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_differences_read_as_words() -> None:
    a = {
        "/": _entry(type="dir", mode=0o755, size=0, sha256=None),
        "/etc/passwd": _entry(),
        "/gone": _entry(),
        "/kind": _entry(),
        "/meta": _entry(uid=1, gid=2, xattrs=(("user.a", b"1"),)),
        "/dev/x": _entry(type="chr", size=0, sha256=None, rdev=(1, 3)),
        "/l": _entry(type="symlink", target="a", sha256=None),
        "/h": _entry(link_group="/h"),
    }
    b = {
        "/": a["/"],
        "/etc/passwd": _entry(mode=0o600, mtime_ns=1_000_000_001),
        "/kind": _entry(type="dir", mode=0o755),
        "/meta": _entry(uid=3, gid=4, xattrs=(("user.a", b"2"), ("user.b", b"x"))),
        "/dev/x": _entry(type="chr", size=0, sha256=None, rdev=(1, 5)),
        "/l": _entry(type="symlink", target="b", sha256=None),
        "/h": _entry(size=4, sha256="cd" * 32),
        "/new": _entry(),
    }
    assert diff_snapshots(a, b) == [
        "/dev/x: rdev (1, 3) != (1, 5)",
        "/etc/passwd: mode 0644 != 0600",
        "/etc/passwd: mtime 1.000000000 != 1.000000001",
        "/gone: only in a",
        "/h: size 3 != 4",
        "/h: content sha256 abababababab != cdcdcdcdcdcd",
        "/h: hard-link group /h != None",
        "/kind: type file != dir",
        "/l: target 'a' != 'b'",
        "/meta: uid 1 != 3",
        "/meta: gid 2 != 4",
        "/meta: xattr user.a b'1' != b'2'",
        "/meta: xattr user.b (absent) != b'x'",
        "/new: only in b",
    ]
    assert diff_snapshots(a, a) == []


def test_ignoring_and_excluding() -> None:
    a = {"/": _entry(type="dir"), "/d": _entry(type="dir"), "/d/f": _entry(), "/proc": _entry(type="dir")}
    b = {
        "/": _entry(type="dir", mtime_ns=5),
        "/d": _entry(type="dir", mtime_ns=5),
        "/d/f": _entry(uid=9, mtime_ns=5),
        "/proc/1": _entry(),
    }
    assert diff_snapshots(a, b, ignore_mtime_dirs=True, ignore=("uid", "mtime"), exclude=("/proc",)) == []
    assert diff_snapshots(a, b, ignore_mtime_dirs=True, exclude=("/proc",)) == [
        "/d/f: uid 0 != 9",
        "/d/f: mtime 1.000000000 != 0.000000005",
    ]
    assert diff_snapshots(a, b, exclude=("/d*", "/proc")) == ["/: mtime 1.000000000 != 0.000000005"]
    with pytest.raises(ValueError, match="unknown snapshot fields"):
        diff_snapshots(a, b, ignore=("colour",))
    assert set(FIELDS) >= {"mode", "uid", "gid", "mtime", "xattrs", "content", "link"}


def test_format_entry() -> None:
    e = _entry(mode=0o4755, xattrs=(("user.a", b"1"),), link_group="/x")
    assert (
        format_entry(e) == "file 4755 0:0 size=3 mtime=1.000000000 xattrs=user.a sha256=abababababab link=/x"
    )


def test_symlinked_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "link")
    with pytest.raises(OSError):
        snapshot_tree(tmp_path / "link")
