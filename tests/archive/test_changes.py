"""Change detection: exact change lists of changes_dirs and changes_from_upper, and sizes.

Trees are built with fixed nanosecond times, so that a test controls every field the comparison
reads; a "modified" tree is a ``cp -a`` copy of the base tree with one change made to it.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from graphdriver.archive.changes import changes_dirs, changes_from_upper, changes_size, tree_size
from graphdriver.archive.types import Change, ChangeKind
from graphdriver.errors import InvalidArgument, NotFound

A, C, D = ChangeKind.ADD, ChangeKind.MODIFY, ChangeKind.DELETE
T0 = 1_700_000_000_123_456_789  # a time with nanoseconds
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # v2, effective, CAP_NET_RAW
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (chown, mknod, trusted.* xattrs)")


def changes(*items: tuple[ChangeKind, str]) -> list[Change]:
    return [Change(path, kind) for kind, path in items]


def write(path: Path, data: bytes, mode: int = 0o644, mtime: int = T0) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)
    os.utime(path, ns=(mtime, mtime))


def settle(root: Path, mtime: int = T0) -> None:
    """Give every directory below and including root the same fixed mtime."""
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.utime(p, ns=(mtime, mtime))
    os.utime(root, ns=(mtime, mtime))


def copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", "--preserve=all", f"{src}/.", str(dst)], check=True)
    return dst


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """/etc/{passwd,hosts}, /usr/bin/tool, /var/lib/data/{a,b}, /link -> etc/passwd."""
    root = tmp_path / "base"
    for d in ("etc", "usr/bin", "var/lib/data"):
        (root / d).mkdir(parents=True)
    write(root / "etc/passwd", b"root:x:0:0\n")
    write(root / "etc/hosts", b"127.0.0.1 localhost\n")
    write(root / "usr/bin/tool", b"#!/bin/sh\n", 0o755)
    write(root / "var/lib/data/a", b"a")
    write(root / "var/lib/data/b", b"b")
    os.symlink("etc/passwd", root / "link")
    os.utime(root / "link", ns=(T0, T0), follow_symlinks=False)
    settle(root)
    return root


@pytest.fixture
def new(base: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "new"
    dst.mkdir()
    return copy(base, dst)


def test_identical_trees_have_no_changes(base: Path, new: Path) -> None:
    assert changes_dirs(new, base) == []


def test_add_file_lists_its_directory(base: Path, new: Path) -> None:
    write(new / "etc/new", b"new")
    assert changes_dirs(new, base) == changes((C, "/etc"), (A, "/etc/new"))


def test_added_tree_is_all_adds_and_parent_is_inserted(base: Path, new: Path) -> None:
    (new / "usr/local/app/bin").mkdir(parents=True)
    write(new / "usr/local/app/bin/run", b"run")
    write(new / "usr/local/app/README", b"doc")
    settle(new)  # /usr keeps its mtime: its Modify comes only from the parent rule
    assert changes_dirs(new, base) == changes(
        (C, "/usr"),
        (A, "/usr/local"),
        (A, "/usr/local/app"),
        (A, "/usr/local/app/README"),
        (A, "/usr/local/app/bin"),
        (A, "/usr/local/app/bin/run"),
    )


def test_modified_content_same_size_and_new_mtime(base: Path, new: Path) -> None:
    write(new / "etc/passwd", b"ROOT:x:0:0\n", mtime=T0 + 1_000_000_000)
    assert changes_dirs(new, base) == changes((C, "/etc"), (C, "/etc/passwd"))


def test_modified_size(base: Path, new: Path) -> None:
    write(new / "etc/hosts", b"127.0.0.1 localhost\n::1 localhost\n")  # same mtime, new size
    assert changes_dirs(new, base) == changes((C, "/etc"), (C, "/etc/hosts"))


def test_restored_mtime_hides_a_content_change(base: Path, new: Path) -> None:
    """Documented seed behaviour: content is not compared; size and mtime stand for it."""
    write(new / "etc/passwd", b"ROOT:x:0:0\n")
    assert changes_dirs(new, base) == []


def test_delete_file(base: Path, new: Path) -> None:
    (new / "etc/hosts").unlink()
    assert changes_dirs(new, base) == changes((C, "/etc"), (D, "/etc/hosts"))


def test_delete_directory_is_one_delete(base: Path, new: Path) -> None:
    shutil.rmtree(new / "var/lib/data")
    settle(new)
    assert changes_dirs(new, base) == changes((C, "/var"), (C, "/var/lib"), (D, "/var/lib/data"))


def _chmod(root: Path) -> None:
    os.chmod(root / "etc/passwd", 0o600)


def _setuid(root: Path) -> None:
    os.chmod(root / "usr/bin/tool", 0o4755)


def _chown(root: Path) -> None:
    os.chown(root / "etc/passwd", 1000, 1000)


def _chgrp(root: Path) -> None:
    os.chown(root / "etc/passwd", 0, 42)


def _xattr_set(root: Path) -> None:
    os.setxattr(root / "etc/passwd", "user.note", b"v1")


def _mtime_ns_only(root: Path) -> None:
    os.utime(root / "etc/passwd", ns=(T0, T0 + 1))


def _mtime_seconds(root: Path) -> None:
    os.utime(root / "etc/passwd", ns=(T0, T0 - 1_000_000_000))


@pytest.mark.parametrize(
    "change",
    [
        _chmod,
        _setuid,
        pytest.param(_chown, marks=needs_root),
        pytest.param(_chgrp, marks=needs_root),
        _xattr_set,
        _mtime_ns_only,
        _mtime_seconds,
    ],
)
def test_metadata_only_change(base: Path, new: Path, change: Callable[[Path], None]) -> None:
    change(new)
    if change is _setuid:
        assert changes_dirs(new, base) == changes((C, "/usr"), (C, "/usr/bin"), (C, "/usr/bin/tool"))
    else:
        assert changes_dirs(new, base) == changes((C, "/etc"), (C, "/etc/passwd"))


def test_xattr_changed_and_removed(base: Path, new: Path) -> None:
    os.setxattr(base / "etc/passwd", "user.note", b"v1")
    os.setxattr(base / "etc/hosts", "user.note", b"v1")
    os.setxattr(new / "etc/passwd", "user.note", b"v2")
    os.setxattr(new / "etc/hosts", "user.note", b"v1")
    os.setxattr(new / "etc/hosts", "user.other", b"")
    os.setxattr(base / "usr/bin/tool", "user.gone", b"x")
    assert changes_dirs(new, base) == changes(
        (C, "/etc"), (C, "/etc/hosts"), (C, "/etc/passwd"), (C, "/usr"), (C, "/usr/bin"), (C, "/usr/bin/tool")
    )


@needs_root
def test_security_and_trusted_xattrs_count_but_overlay_ones_do_not(base: Path, new: Path) -> None:
    os.setxattr(new / "usr/bin/tool", "security.capability", CAPABILITY)
    os.setxattr(new / "etc/passwd", "trusted.mark", b"1")
    os.setxattr(new / "var/lib", "trusted.overlay.opaque", b"y")
    os.setxattr(new / "var/lib/data/a", "trusted.overlay.origin", b"\x00")
    assert changes_dirs(new, base) == changes(
        (C, "/etc"), (C, "/etc/passwd"), (C, "/usr"), (C, "/usr/bin"), (C, "/usr/bin/tool")
    )


def test_mtime_nanosecond_wildcard(base: Path, new: Path) -> None:
    """A whole-second copy (nsec 0) of a file is unchanged: the seed's rule for whole-second tars."""
    whole = (T0 // 1_000_000_000) * 1_000_000_000
    os.utime(new / "etc/passwd", ns=(whole, whole))
    os.utime(base / "etc/hosts", ns=(whole, whole))
    assert changes_dirs(new, base) == []


def test_file_replaced_by_directory(base: Path, new: Path) -> None:
    (new / "etc/passwd").unlink()
    (new / "etc/passwd").mkdir()
    write(new / "etc/passwd/entry", b"x")
    settle(new)
    assert changes_dirs(new, base) == changes((C, "/etc"), (C, "/etc/passwd"), (A, "/etc/passwd/entry"))


def test_directory_replaced_by_file_is_one_modify(base: Path, new: Path) -> None:
    shutil.rmtree(new / "var/lib/data")
    write(new / "var/lib/data", b"now a file")
    settle(new)
    assert changes_dirs(new, base) == changes((C, "/var"), (C, "/var/lib"), (C, "/var/lib/data"))


def test_file_replaced_by_symlink(base: Path, new: Path) -> None:
    (new / "etc/hosts").unlink()
    os.symlink("passwd", new / "etc/hosts")
    settle(new)
    assert changes_dirs(new, base) == changes((C, "/etc"), (C, "/etc/hosts"))


def test_symlink_retargeted_with_same_length_and_time(base: Path, new: Path) -> None:
    (new / "link").unlink()
    os.symlink("etc/shadow", new / "link")  # same length as etc/passwd: only readlink tells
    os.utime(new / "link", ns=(T0, T0), follow_symlinks=False)
    settle(new)
    assert changes_dirs(new, base) == changes((C, "/link"))


def test_root_is_never_listed(base: Path, new: Path) -> None:
    os.chmod(new, 0o700)
    os.utime(new, ns=(1, 1))
    assert changes_dirs(new, base) == []
    assert changes_dirs(base, None) == changes(
        (A, "/etc"),
        (A, "/etc/hosts"),
        (A, "/etc/passwd"),
        (A, "/link"),
        (A, "/usr"),
        (A, "/usr/bin"),
        (A, "/usr/bin/tool"),
        (A, "/var"),
        (A, "/var/lib"),
        (A, "/var/lib/data"),
        (A, "/var/lib/data/a"),
        (A, "/var/lib/data/b"),
    )


def test_sorted_by_path_string(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    for d in ("a", "a/x", "b"):
        (new / d).mkdir()
    for f in ("a-b", "a.c", "a/x/y", "A"):
        write(new / f, b"")
    got = changes_dirs(new, old)
    assert [c.path for c in got] == ["/A", "/a", "/a-b", "/a.c", "/a/x", "/a/x/y", "/b"]
    assert got == sorted(got)


def test_symlinks_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    write(outside / "secret", b"s")
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    os.symlink(outside, new / "escape")
    assert changes_dirs(new, old) == changes((A, "/escape"))


def test_missing_or_non_directory_roots(base: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        changes_dirs(tmp_path / "absent", base)
    with pytest.raises(NotFound):
        changes_dirs(base, tmp_path / "absent")
    with pytest.raises(InvalidArgument):
        changes_dirs(base / "etc/passwd", None)


# -- changes_from_upper --------------------------------------------------------------------------


def whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def opaque(path: Path, prefix: str = "trusted.") -> None:
    os.setxattr(path, prefix + "overlay.opaque", b"y")


@pytest.fixture
def layers(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two lower dirs (l1 bottom, l2 top) and an empty upper.

    l1: /etc/{passwd,hosts}, /usr/bin/tool, /opt/d/{x,y}, /srv/f, /keep/k
    l2: /usr/bin/tool whited out, /opt/d/z added, /var/old added
    """
    l1, l2, up = tmp_path / "l1", tmp_path / "l2", tmp_path / "upper"
    for d in ("etc", "usr/bin", "opt/d", "srv", "keep"):
        (l1 / d).mkdir(parents=True)
    write(l1 / "etc/passwd", b"root\n")
    write(l1 / "etc/hosts", b"hosts\n")
    write(l1 / "usr/bin/tool", b"tool\n", 0o755)
    write(l1 / "opt/d/x", b"x")
    write(l1 / "opt/d/y", b"y")
    write(l1 / "srv/f", b"f")
    write(l1 / "keep/k", b"k")
    for d in ("usr/bin", "opt/d", "var"):
        (l2 / d).mkdir(parents=True)
    whiteout(l2 / "usr/bin/tool")
    write(l2 / "opt/d/z", b"z")
    write(l2 / "var/old", b"old")
    up.mkdir()
    for root in (l1, l2, up):
        settle(root)
    return l1, l2, up


def mkdirs_like(upper: Path, lower: Path, *rels: str) -> None:
    """Create directories in upper with the lower's metadata, as overlayfs's copy-up does."""
    for rel in rels:
        (upper / rel).mkdir(parents=True, exist_ok=True)
        st = os.stat(lower / rel)
        os.chmod(upper / rel, stat.S_IMODE(st.st_mode))
        os.utime(upper / rel, ns=(st.st_mtime_ns, st.st_mtime_ns))


@needs_root
def test_upper_empty_means_no_changes(layers: tuple[Path, Path, Path]) -> None:
    l1, l2, up = layers
    assert changes_from_upper(up, [l2, l1]) == []


@needs_root
def test_upper_add_modify_delete(layers: tuple[Path, Path, Path]) -> None:
    l1, l2, up = layers
    mkdirs_like(up, l1, "etc")
    write(up / "etc/new", b"new")  # Add
    write(up / "etc/passwd", b"ROOT\n", mtime=T0 + 5)  # Modify (copied up and written)
    whiteout(up / "etc/hosts")  # Delete
    settle(up)
    assert changes_from_upper(up, [l2, l1]) == changes(
        (C, "/etc"), (D, "/etc/hosts"), (A, "/etc/new"), (C, "/etc/passwd")
    )


@needs_root
def test_upper_copy_up_without_change_is_not_listed(layers: tuple[Path, Path, Path]) -> None:
    l1, l2, up = layers
    mkdirs_like(up, l1, "etc")
    copy(l1 / "etc", up / "etc")
    assert changes_from_upper(up, [l2, l1]) == []


@needs_root
def test_upper_whiteout_of_a_name_the_lowers_hide_changes_nothing(layers: tuple[Path, Path, Path]) -> None:
    l1, l2, up = layers
    mkdirs_like(up, l2, "usr/bin")
    whiteout(up / "usr/bin/tool")  # already whited out in l2
    whiteout(up / "usr/bin/never")  # in no lower at all
    settle(up)
    assert changes_from_upper(up, [l2, l1]) == []


@needs_root
def test_upper_whiteout_of_a_directory_is_one_delete(layers: tuple[Path, Path, Path]) -> None:
    l1, l2, up = layers
    mkdirs_like(up, l1, "opt")
    whiteout(up / "opt/d")  # /opt/d merges l2 and l1
    settle(up)
    assert changes_from_upper(up, [l2, l1]) == changes((C, "/opt"), (D, "/opt/d"))


@needs_root
@pytest.mark.parametrize("prefix", ["trusted.", "user."])
def test_upper_opaque_directory(layers: tuple[Path, Path, Path], prefix: str) -> None:
    l1, l2, up = layers
    mkdirs_like(up, l2, "opt/d")
    opaque(up / "opt/d", prefix)
    write(up / "opt/d/new", b"n")
    write(up / "opt/d/x", b"x")  # same as l1's x: present in both views, unchanged
    settle(up)
    assert changes_from_upper(up, [l2, l1], xattr_prefix=prefix) == changes(
        (C, "/opt"), (C, "/opt/d"), (A, "/opt/d/new"), (D, "/opt/d/y"), (D, "/opt/d/z")
    )


@needs_root
def test_upper_opaque_marker_of_the_other_prefix_is_ignored(layers: tuple[Path, Path, Path]) -> None:
    l1, l2, up = layers
    mkdirs_like(up, l2, "opt/d")
    opaque(up / "opt/d", "user.")
    write(up / "opt/d/new", b"n")
    settle(up)
    assert changes_from_upper(up, [l2, l1]) == changes((C, "/opt"), (C, "/opt/d"), (A, "/opt/d/new"))


@needs_root
def test_upper_directory_over_lower_file_and_file_over_lower_directory(
    layers: tuple[Path, Path, Path],
) -> None:
    l1, l2, up = layers
    mkdirs_like(up, l1, "srv", "opt")
    (up / "srv/f").mkdir()
    write(up / "srv/f/inner", b"i")
    write(up / "opt/d", b"file over a merged dir")
    settle(up)
    assert changes_from_upper(up, [l2, l1]) == changes(
        (C, "/opt"), (C, "/opt/d"), (C, "/srv"), (C, "/srv/f"), (A, "/srv/f/inner")
    )


@needs_root
def test_upper_new_directory_subtree_is_all_adds(layers: tuple[Path, Path, Path]) -> None:
    l1, l2, up = layers
    (up / "new/sub").mkdir(parents=True)
    write(up / "new/sub/f", b"f")
    whiteout(up / "new/sub/ghost")  # nothing below a new dir to delete
    settle(up)
    assert changes_from_upper(up, [l2, l1]) == changes((A, "/new"), (A, "/new/sub"), (A, "/new/sub/f"))


@needs_root
def test_lower_opaque_and_lower_whiteouts_shape_the_parent_view(tmp_path: Path) -> None:
    """l2's opaque /g hides l1's /g/one; l2's whiteout hides l1's /w: the upper sees l2's view."""
    l1, l2, up = tmp_path / "l1", tmp_path / "l2", tmp_path / "upper"
    for d in (l1 / "g", l2 / "g", up / "g"):
        d.mkdir(parents=True)
    write(l1 / "g/one", b"1")
    write(l1 / "w", b"w")
    write(l2 / "g/two", b"2")
    opaque(l2 / "g")
    whiteout(l2 / "w")
    opaque(up / "g")  # the layer empties /g again and adds one file
    write(up / "g/three", b"3")
    write(up / "w", b"back")  # /w is new: l2 deleted it
    for root in (l1, l2, up):
        settle(root)
    assert changes_from_upper(up, [l2, l1]) == changes((C, "/g"), (A, "/g/three"), (D, "/g/two"), (A, "/w"))


@needs_root
def test_lower_merge_stops_at_a_non_directory(tmp_path: Path) -> None:
    """l3 dir /d, l2 file /d, l1 dir /d: overlayfs merges only l3's /d; so does the lookup."""
    l1, l2, l3, up = (tmp_path / n for n in ("l1", "l2", "l3", "upper"))
    for d in (l1 / "d", l2, l3 / "d", up / "d"):
        d.mkdir(parents=True)
    write(l1 / "d/x", b"x")
    write(l2 / "d", b"file")
    write(l3 / "d/p", b"p")
    opaque(up / "d")
    for root in (l1, l2, l3, up):
        settle(root)
    assert changes_from_upper(up, [l3, l2, l1]) == changes((C, "/d"), (D, "/d/p"))


@needs_root
def test_root_opaque_markers_are_ignored_like_overlayfs_does(layers: tuple[Path, Path, Path]) -> None:
    l1, l2, up = layers
    opaque(up)
    opaque(l2)
    write(up / "new", b"n")
    settle(up)
    assert changes_from_upper(up, [l2, l1]) == changes((A, "/new"))


def test_upper_and_lowers_must_exist(tmp_path: Path) -> None:
    (tmp_path / "up").mkdir()
    with pytest.raises(NotFound):
        changes_from_upper(tmp_path / "up", [tmp_path / "absent"])
    with pytest.raises(NotFound):
        changes_from_upper(tmp_path / "absent", [])


# -- sizes ---------------------------------------------------------------------------------------


@pytest.fixture
def sized(tmp_path: Path) -> Path:
    root = tmp_path / "sized"
    (root / "dir").mkdir(parents=True)
    write(root / "dir/file", b"0123456789")  # 10
    os.link(root / "dir/file", root / "hard")  # same inode: counted once by tree_size
    os.symlink("abc", root / "sym")  # 3: the target's length
    write(root / "empty", b"")
    os.mkfifo(root / "fifo")
    if ROOT:
        os.mknod(root / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    return root


def test_tree_size_counts_hard_links_once(sized: Path) -> None:
    assert tree_size(sized) == 13


def test_changes_size(sized: Path) -> None:
    listed = changes(
        (A, "/dir"),  # directory: 0
        (A, "/dir/file"),  # 10
        (A, "/hard"),  # 10: hard links are not de-duplicated (seed)
        (C, "/sym"),  # 3
        (A, "/fifo"),  # 0
        (A, "/dev"),  # 0 (absent without root: ignored)
        (D, "/gone"),  # 0
        (A, "/missing"),  # cannot be stat'ed: 0
    )
    assert changes_size(sized, listed) == 23
    assert changes_size(sized, []) == 0


# -- against a real overlay mount ----------------------------------------------------------------


def _mount_overlay(
    target: Path, lowers: list[Path], upper: Path | None = None, work: Path | None = None
) -> None:
    opts = "lowerdir=" + ":".join(map(str, lowers))
    if upper is not None:
        opts += f",upperdir={upper},workdir={work}"
    opts += ",redirect_dir=off,metacopy=off"
    done = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(target)], check=False, capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount overlay here: {done.stderr.decode().strip()}")


@needs_root
def test_changes_from_upper_equals_changes_dirs_of_a_real_overlay(
    layers: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    l1, l2, up = layers
    work, merged, parent = tmp_path / "work", tmp_path / "merged", tmp_path / "parent"
    for d in (work, merged, parent):
        d.mkdir()
    _mount_overlay(parent, [l2, l1])
    try:
        _mount_overlay(merged, [l2, l1], up, work)
        try:
            m = merged
            write(m / "etc/new", b"new")
            with open(m / "etc/passwd", "ab") as f:
                f.write(b"more\n")
            (m / "etc/hosts").unlink()
            shutil.rmtree(m / "opt/d")  # the kernel whites out d; mkdir makes it opaque
            (m / "opt/d").mkdir()
            write(m / "opt/d/x", b"x")
            os.chmod(m / "usr", 0o700)
            os.setxattr(m / "keep/k", "user.note", b"n")
            os.link(m / "keep/k", m / "keep/k2")
            (m / "srv/f").unlink()
            (m / "srv/f").mkdir()
            os.symlink("/etc/passwd", m / "lnk")
            os.chmod(m / "var", 0o755)  # copy-up with no change: not listed by either
            (m / "var/old").unlink()
            naive = changes_dirs(merged, parent)
        finally:
            subprocess.run(["umount", str(merged)], check=True)
    finally:
        subprocess.run(["umount", str(parent)], check=True)
    assert naive, "the operations made no change"
    assert changes_from_upper(up, [l2, l1]) == naive
