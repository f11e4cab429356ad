"""copy_tree: exact copies of layer trees (every file kind, owners, modes, ns times, xattrs, hard
links), hard-link farms, reflinks, symlinks never followed, and what happens without root."""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

import graphdriver.fs.copy as copy_module
from graphdriver.errors import InvalidArgument
from graphdriver.fs.copy import copy_tree, supports_reflink
from graphdriver.testing.plugin import NOBODY, Unprivileged
from graphdriver.testing.trees import diff_snapshots, make_sample_tree, snapshot_tree

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (owners, device nodes, trusted.* xattrs)")


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    make_sample_tree(src)
    return src


def _same(a: Path, b: Path) -> list[str]:
    return diff_snapshots(snapshot_tree(a, overlay_xattrs=True), snapshot_tree(b, overlay_xattrs=True))


@pytest.mark.parametrize("threads", [0, 2], ids=["no-workers", "workers"])
def test_sample_tree_is_copied_exactly(tmp_path: Path, threads: int) -> None:
    src = _tree(tmp_path)
    stats = copy_tree(src, tmp_path / "dst", threads=threads)
    assert _same(src, tmp_path / "dst") == []
    snap = snapshot_tree(src)
    assert stats.files == sum(1 for e in snap.values() if e.type == "file") - 1  # hard2 is a link
    assert stats.hardlinks == 1
    assert stats.dirs == sum(1 for e in snap.values() if e.type == "dir")
    assert stats.symlinks == 4
    assert stats.specials == (3 if ROOT else 1)
    assert stats.bytes == sum(e.size for p, e in snap.items() if e.type == "file" and p != "/data/sub/hard2")


@needs_root
def test_overlay_upper_dir_survives_a_copy(tmp_path: Path) -> None:
    """The seed's Case B: an -init upper with a whiteout and an opaque dir, copied as root."""
    src = tmp_path / "upper"
    (src / "etc" / "app").mkdir(parents=True)
    os.mknod(src / "etc" / "motd", stat.S_IFCHR, os.makedev(0, 0))  # a kernel whiteout
    os.setxattr(src / "etc" / "app", "trusted.overlay.opaque", b"y")
    os.setxattr(src / "etc", "trusted.overlay.origin", b"\x00\xfb\x21")
    (src / "etc" / "app" / "new").write_text("new\n")
    copy_tree(src, tmp_path / "copy")
    assert _same(src, tmp_path / "copy") == []
    assert os.getxattr(tmp_path / "copy" / "etc" / "app", "trusted.overlay.opaque") == b"y"
    st = os.lstat(tmp_path / "copy" / "etc" / "motd")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_root_metadata_goes_onto_dst(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    os.chmod(src, 0o751)
    os.setxattr(src, "user.root-note", b"r")
    if ROOT:
        os.chown(src, 5, 6)
    os.utime(src, ns=(1, 1_234_567_890_987_654_321))
    dst = tmp_path / "dst"
    dst.mkdir()  # an existing empty directory is filled
    copy_tree(src, dst)
    st = os.lstat(dst)
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o751, 1_234_567_890_987_654_321)
    assert (st.st_uid, st.st_gid) == ((5, 6) if ROOT else (os.geteuid(), os.getegid()))
    assert os.getxattr(dst, "user.root-note") == b"r"
    assert _same(src, dst) == []


def test_destination_must_be_new_or_empty(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(InvalidArgument, match="not an empty directory"):
        copy_tree(src, full)
    assert os.listdir(full) == ["x"]
    with pytest.raises(FileNotFoundError):
        copy_tree(src, tmp_path / "missing-parent" / "dst")
    with pytest.raises(InvalidArgument, match="into itself"):
        copy_tree(src, src / "data" / "copy")
    assert not (src / "data" / "copy").exists()


def test_directory_times_are_set_after_the_children(tmp_path: Path) -> None:
    """The seed set them first, so every copied directory looked modified (moby 77a2bc3e5b)."""
    src = tmp_path / "src"
    crowded = src / "a" / "crowded"
    crowded.mkdir(parents=True)
    for i in range(300):
        (crowded / f"f{i}").write_text(str(i))
        (crowded / f"d{i}").mkdir()
    for p in (crowded, crowded.parent, src):
        os.utime(p, ns=(5, 1_000_000_000_000_000_007))
    copy_tree(src, tmp_path / "dst")
    for rel in ("a/crowded", "a", "."):
        assert os.lstat(tmp_path / "dst" / rel).st_mtime_ns == 1_000_000_000_000_000_007, rel


def test_hard_links_within_the_tree(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    (src / "a" / "one").write_text("shared\n")
    os.link(src / "a" / "one", src / "b" / "two")
    os.link(src / "a" / "one", src / "three")
    outside = tmp_path / "outside"
    outside.write_text("half in, half out\n")
    os.link(outside, src / "b" / "linked-from-outside")
    os.mkfifo(src / "fifo")
    os.link(src / "fifo", src / "a" / "fifo-too")
    stats = copy_tree(src, tmp_path / "dst")
    dst = tmp_path / "dst"
    inode = os.lstat(dst / "a" / "one").st_ino
    assert {os.lstat(dst / p).st_ino for p in ("a/one", "b/two", "three")} == {inode}
    assert os.lstat(dst / "a" / "one").st_nlink == 3
    assert inode != os.lstat(src / "a" / "one").st_ino
    assert os.lstat(dst / "b" / "linked-from-outside").st_nlink == 1
    assert os.lstat(dst / "fifo").st_ino == os.lstat(dst / "a" / "fifo-too").st_ino
    assert (stats.files, stats.hardlinks, stats.specials) == (2, 3, 1)
    assert _same(src, dst) == []


def test_hardlink_files_farm(tmp_path: Path) -> None:
    """hardlink_files=True: every regular file is the source inode; everything else is made anew."""
    src = _tree(tmp_path)
    before = snapshot_tree(src)
    stats = copy_tree(src, tmp_path / "farm", hardlink_files=True)
    farm = tmp_path / "farm"
    for path, entry in before.items():
        s, f = os.lstat(f"{src}{path}"), os.lstat(f"{farm}{path}")
        if entry.type == "file":
            assert s.st_ino == f.st_ino, path
        else:
            assert s.st_ino != f.st_ino, path
    after = snapshot_tree(src)
    # the shared inodes' metadata was not rewritten (link counts aside, nothing changed)
    assert diff_snapshots(before, after, ignore=("link",)) == []
    assert stats.bytes == 0 and stats.reflinked == 0
    assert stats.files == sum(1 for e in before.values() if e.type == "file")
    assert diff_snapshots(after, snapshot_tree(farm)) == []


def test_symlinks_are_copied_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("do not copy me\n")
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(str(outside), src / "abs-dir")
    os.symlink("../outside", src / "rel-dir")
    os.symlink("../outside/secret", src / "file-link")
    os.symlink("/", src / "slash")
    copy_tree(src, tmp_path / "dst")
    dst = tmp_path / "dst"
    assert sorted(os.listdir(dst)) == ["abs-dir", "file-link", "rel-dir", "slash"]
    for name in os.listdir(dst):
        assert stat.S_ISLNK(os.lstat(dst / name).st_mode)
        assert os.readlink(dst / name) == os.readlink(src / name)
    assert _same(src, dst) == []
    with pytest.raises(OSError):
        copy_tree(src / "abs-dir", tmp_path / "via-link")  # a symlinked source is refused
    assert not (tmp_path / "via-link" / "secret").exists()


def test_sockets_are_skipped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_text("f")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(src / "sock"))
        stats = copy_tree(src, tmp_path / "dst")
    finally:
        sock.close()
    assert stats.skipped_sockets == 1
    assert os.listdir(tmp_path / "dst") == ["file"]


def test_names_that_are_not_utf8(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    raw = os.fsencode(src) + b"/caf\xe9-\xff"
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"latin-1 name\n")
    os.close(fd)
    os.mkdir(os.fsencode(src) + b"/dir-\x80")
    os.symlink(b"caf\xe9-\xff", os.fsencode(src) + b"/dir-\x80/../link-\xfe")
    copy_tree(src, tmp_path / "dst")
    assert sorted(os.listdir(os.fsencode(tmp_path / "dst"))) == [b"caf\xe9-\xff", b"dir-\x80", b"link-\xfe"]
    assert _same(src, tmp_path / "dst") == []


@needs_root
def test_setgid_destination_does_not_leak_its_group(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("root's\n")
    os.symlink("f", src / "sub" / "l")
    dst = tmp_path / "dst"
    dst.mkdir()
    os.chown(dst, 0, 50)
    os.chmod(dst, 0o2775)
    copy_tree(src, dst)
    for rel in ("sub", "sub/f", "sub/l"):
        st = os.lstat(dst / rel)
        assert (st.st_uid, st.st_gid) == (0, 0), rel
    assert _same(src, dst) == []


# -- reflinks ---------------------------------------------------------------------------------------


def test_no_reflink_here_is_asked_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if supports_reflink(tmp_path):
        pytest.skip(f"{tmp_path} supports reflinks")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(b"x" * (i + 1))
    calls: list[int] = []
    real_ioctl = fcntl.ioctl

    def counting_ioctl(fd: int, request: int, arg: int = 0) -> object:
        calls.append(request)
        return real_ioctl(fd, request, arg)

    monkeypatch.setattr(fcntl, "ioctl", counting_ioctl)
    stats = copy_tree(src, tmp_path / "dst", threads=0)
    assert calls == [copy_module.FICLONE]
    assert (stats.reflinked, stats.bytes) == (0, sum(range(1, 21)))
    assert _same(src, tmp_path / "dst") == []


def test_supports_reflink_leaves_nothing(tmp_path: Path) -> None:
    supports_reflink(tmp_path)
    assert os.listdir(tmp_path) == []


@needs_root
def test_reflinks_on_xfs(tmp_path: Path) -> None:
    from graphdriver.testing.loopfs import loop_filesystem

    with loop_filesystem("xfs", "1G", mkfs_options=["-m", "reflink=1"]) as fs:
        assert supports_reflink(fs.path)
        src = fs.path / "src"
        src.mkdir()
        make_sample_tree(src)
        stats = copy_tree(src, fs.path / "dst")
        files = [
            e for p, e in snapshot_tree(src).items() if e.type == "file" and e.size and p != "/data/sub/hard2"
        ]
        assert stats.reflinked == len(files)
        assert _same(src, fs.path / "dst") == []
        if subprocess.run(["filefrag", "-V"], capture_output=True, check=False).returncode == 0:
            out = subprocess.run(
                ["filefrag", "-v", str(fs.path / "dst" / "data" / "big")],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert "shared" in out, out


# -- without root ---------------------------------------------------------------------------------


@needs_root
def test_unprivileged_copy(gd_unprivileged: Unprivileged) -> None:
    work = gd_unprivileged.scratch / "work"
    work.mkdir()
    os.chown(work, NOBODY, NOBODY)
    dev_tree = gd_unprivileged.scratch / "with-device"
    (dev_tree / "dev").mkdir(parents=True)
    os.mknod(dev_tree / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    for p in (dev_tree, dev_tree / "dev", dev_tree / "dev" / "null"):
        os.chown(p, NOBODY, NOBODY)
    code = textwrap.dedent(
        """
        import os, sys
        from pathlib import Path
        from graphdriver.errors import PermissionDenied
        from graphdriver.fs.copy import copy_tree
        from graphdriver.testing.trees import diff_snapshots, make_sample_tree, snapshot_tree
        work, dev_tree = Path(sys.argv[1]), Path(sys.argv[2])
        src = work / "src"
        src.mkdir()
        make_sample_tree(src)
        (src / "locked").mkdir()
        (src / "locked" / "inner").write_text("inner")
        os.chmod(src / "locked", 0)
        before = snapshot_tree(src)
        stats = copy_tree(src, work / "dst")
        print("differences:", diff_snapshots(before, snapshot_tree(work / "dst")))
        print("source unchanged:", diff_snapshots(before, snapshot_tree(src)))
        print("locked mode:", oct(os.lstat(src / "locked").st_mode & 0o7777))
        try:
            copy_tree(dev_tree, work / "devcopy")
        except PermissionDenied as exc:
            print("PermissionDenied:", exc)
        """
    )
    proc = gd_unprivileged.run(["-c", code, str(work), str(dev_tree)], python=True)
    assert proc.returncode == 0, proc.stdout
    assert "differences: []" in proc.stdout
    assert "source unchanged: []" in proc.stdout
    assert "locked mode: 0o0\n" in proc.stdout
    assert f"PermissionDenied: cannot create character device {dev_tree}/dev/null" in proc.stdout


# -- the xattr helpers ------------------------------------------------------------------------------


def test_xattr_helpers(tmp_path: Path) -> None:
    from graphdriver.fs import xattrs

    f = tmp_path / "f"
    f.write_text("x")
    os.symlink("f", tmp_path / "link")
    xattrs.set_xattr(f, "user.b", b"2")
    xattrs.set_xattr(f, "user.a", b"\x00\xff")
    assert xattrs.list_xattrs(f) == ["user.a", "user.b"]
    assert xattrs.get_all_xattrs(f) == {"user.a": b"\x00\xff", "user.b": b"2"}
    assert xattrs.get_xattr(f, "user.missing") is None
    assert xattrs.get_xattr("/proc/self/status", "user.a") is None  # ENOTSUP reads as absent
    xattrs.remove_xattr(f, "user.b")
    xattrs.remove_xattr(f, "user.b")  # absent is fine
    with pytest.raises(OSError):
        xattrs.remove_xattr(f, "user.b", missing_ok=False)
    with pytest.raises(FileExistsError):
        xattrs.set_xattr(f, "user.a", b"again", flags=os.XATTR_CREATE)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # through a directory fd, the symlink itself, not its target
        assert xattrs.list_xattrs(xattrs.at(fd, "link")) == []
        assert xattrs.get_xattr(xattrs.at(fd, "f"), "user.a") == b"\x00\xff"
        if ROOT:
            xattrs.set_xattr(xattrs.at(fd, "link"), "trusted.on-link", b"l")
            assert xattrs.get_all_xattrs(xattrs.at(fd, "link")) == {"trusted.on-link": b"l"}
            assert "trusted.on-link" not in xattrs.list_xattrs(f)
        ffd = os.open(f, os.O_RDONLY)
        try:
            assert xattrs.list_xattrs(ffd) == ["user.a"]
        finally:
            os.close(ffd)
    finally:
        os.close(fd)
    assert xattrs.is_overlay_xattr("trusted.overlay.opaque")
    assert xattrs.is_overlay_xattr("user.overlay.redirect")
    assert not xattrs.is_overlay_xattr("trusted.overlayfoo")
    assert not xattrs.is_overlay_xattr("security.capability")
