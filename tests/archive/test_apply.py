"""apply_layer: exact resulting trees for every entry type, whiteout format and compression."""

from __future__ import annotations

import io
import os
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver.archive.apply import ApplyOptions, ApplyStats, apply_layer
from graphdriver.archive.types import Limits, WhiteoutFormat
from graphdriver.errors import InvalidArchive, LimitExceeded
from graphdriver.fs.inroot import force_fallback
from graphdriver.testing.tarbuild import TarBuilder, compress, describe_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="apply tests need root (ownership, devices)")

T1 = 1_600_000_000_111_111_111
T2 = 1_650_000_000_222_222_222
T3 = 1_700_000_000_333_333_333
CAP_NET_RAW = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)  # vfs_cap_data v2, effective


def apply(root: Path, tar: bytes, **kw: object) -> ApplyStats:
    return apply_layer(root, io.BytesIO(tar), **kw)  # type: ignore[arg-type]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


def full_layer() -> bytes:
    return (
        TarBuilder()
        .dir("./", mode=0o755, mtime_ns=T1)
        .dir("bin", mode=0o755, mtime_ns=T1)
        .file("bin/su", b"#!su", mode=0o4755, uid=0, gid=0, mtime_ns=T2)
        .file("bin/wall", b"wall", mode=0o2755, uid=0, gid=5, mtime_ns=T2)
        .file("bin/ping", b"ping", mode=0o755, mtime_ns=T2, xattrs={"security.capability": CAP_NET_RAW})
        .dir("tmp", mode=0o1777, mtime_ns=T3)
        .dir("home/user", mode=0o700, uid=1000, gid=1000, mtime_ns=T3)
        .file("home/user/.profile", b"PS1=$\n", mode=0o600, uid=1000, gid=1000, mtime_ns=T3)
        .file(
            "home/user/notes",
            b"n",
            mode=0o640,
            uid=1000,
            gid=100,
            mtime_ns=T3,
            xattrs={"user.tag": b"\x00\xff"},
        )
        .symlink("home/user/link", "../../bin/su", uid=1000, gid=1000, mtime_ns=T2)
        .symlink("etc-abs", "/etc/passwd", mtime_ns=T1)
        .hardlink("bin/su-again", "bin/su", uid=99, gid=99, mode=0o777, mtime_ns=T3)  # metadata ignored
        .char("dev/null", 1, 3, mode=0o666, mtime_ns=T1)
        .block("dev/loop7", 7, 7, mode=0o660, gid=6, mtime_ns=T1)
        .fifo("run/initctl", mode=0o600, mtime_ns=T2)
        .file("nobody", b"", mode=0o444, uid=65534, gid=65534, mtime_ns=T1)
        .build()
    )


FULL_TREE = {
    "bin": f"dir 0755 0:0 m={T1}",
    "bin/ping": f"file 0755 0:0 m={T2} b'ping' xattrs[security.capability={CAP_NET_RAW!r}]",
    "bin/su": f"file 4755 0:0 m={T2} b'#!su' links=2",
    "bin/su-again": f"file 4755 0:0 m={T2} b'#!su' links=2",
    "bin/wall": f"file 2755 0:5 m={T2} b'wall'",
    "dev": "dir 0755 0:0",
    "dev/loop7": f"block 0660 0:6 m={T1} 7:7",
    "dev/null": f"char 0666 0:0 m={T1} 1:3",
    "etc-abs": f"symlink 0:0 m={T1} -> /etc/passwd",
    "home": "dir 0755 0:0",
    "home/user": f"dir 0700 1000:1000 m={T3}",
    "home/user/.profile": f"file 0600 1000:1000 m={T3} b'PS1=$\\n'",
    "home/user/link": f"symlink 1000:1000 m={T2} -> ../../bin/su",
    "home/user/notes": f"file 0640 1000:100 m={T3} b'n' xattrs[user.tag=b'\\x00\\xff']",
    "nobody": f"file 0444 65534:65534 m={T1} b''",
    "run": "dir 0755 0:0",
    "run/initctl": f"fifo 0600 0:0 m={T2}",
    "tmp": f"dir 1777 0:0 m={T3}",
}


def without_implied_times(tree: dict[str, str]) -> dict[str, str]:
    """Implied parents get the time of their creation: drop it for the comparison."""
    return {
        k: (v.split(" m=")[0] if v.startswith("dir") and " m=" in v and k in ("dev", "home", "run") else v)
        for k, v in tree.items()
    }


def test_full_tree_exact(root: Path) -> None:
    stats = apply(root, full_layer())
    assert without_implied_times(describe_tree(root)) == FULL_TREE
    assert os.stat(root).st_mtime_ns == T1
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o755
    assert os.stat(root / "bin/su").st_ino == os.stat(root / "bin/su-again").st_ino
    assert stats == ApplyStats(
        size=4 + 4 + 4 + 6 + 1 + len("../../bin/su") + len("/etc/passwd") + 4,
        entries=16,
        tar_bytes=len(full_layer()),
        whiteouts=0,
    )


def test_same_tree_with_the_fallback_resolver(root: Path, tmp_path: Path) -> None:
    with force_fallback():
        apply(root, full_layer())
    other = tmp_path / "other"
    other.mkdir()
    apply(other, full_layer())
    assert without_implied_times(describe_tree(root)) == without_implied_times(describe_tree(other))


def test_same_tree_as_gnu_tar(root: Path, tmp_path: Path) -> None:
    tar = tmp_path / "layer.tar"
    tar.write_bytes(full_layer())
    gnu = tmp_path / "gnu"
    gnu.mkdir()
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", str(tar), "-C", str(gnu)],
        check=True,
    )
    apply(root, full_layer())
    ours, theirs = describe_tree(root), describe_tree(gnu)
    for implied in ("dev", "home", "run"):  # no header: both tools give them "now" and their own mode
        ours.pop(implied)
        theirs.pop(implied)
    # GNU tar restores a directory's times when the archive leaves it; the later hard link
    # bin/su-again then bumps bin's mtime. We restore directory times after the last entry.
    assert ours.pop("bin") == f"dir 0755 0:0 m={T1}"
    assert theirs.pop("bin").startswith("dir 0755 0:0 m=")
    assert ours == theirs


def test_atime_from_pax_else_mtime(root: Path) -> None:
    apply(root, TarBuilder().file("a", b"", mtime_ns=T2, atime_ns=T1).file("b", b"", mtime_ns=T3).build())
    assert (os.stat(root / "a").st_atime_ns, os.stat(root / "a").st_mtime_ns) == (T1, T2)
    assert (os.stat(root / "b").st_atime_ns, os.stat(root / "b").st_mtime_ns) == (T3, T3)


def test_names_are_cleaned(root: Path) -> None:
    tar = (
        TarBuilder()
        .file("/abs", b"1")
        .file("///multi//slash", b"2")
        .file("./dot/./x", b"3")
        .file("a/b/../c", b"4")
        .file("..gitme", b"5")
        .file("...", b"6")
        .build()
    )
    apply(root, tar)
    assert describe_tree(root, mtime=False) == {
        "...": "file 0644 0:0 b'6'",
        "..gitme": "file 0644 0:0 b'5'",
        "a": "dir 0755 0:0",
        "a/c": "file 0644 0:0 b'4'",
        "abs": "file 0644 0:0 b'1'",
        "dot": "dir 0755 0:0",
        "dot/x": "file 0644 0:0 b'3'",
        "multi": "dir 0755 0:0",
        "multi/slash": "file 0644 0:0 b'2'",
    }


def test_implied_parents_are_0755_root_whatever_the_umask(root: Path) -> None:
    old = os.umask(0o077)
    try:
        apply(root, TarBuilder().file("a/b/c/file", b"x", mode=0o644, uid=7).build())
    finally:
        os.umask(old)
    assert describe_tree(root, mtime=False) == {
        "a": "dir 0755 0:0",
        "a/b": "dir 0755 0:0",
        "a/b/c": "dir 0755 0:0",
        "a/b/c/file": "file 0644 7:0 b'x'",
    }


def test_umask_never_alters_modes(root: Path) -> None:
    old = os.umask(0o077)
    try:
        apply(
            root,
            TarBuilder().dir("d", mode=0o775).file("d/f", b"", mode=0o666).fifo("d/p", mode=0o666).build(),
        )
    finally:
        os.umask(old)
    assert describe_tree(root, mtime=False) == {
        "d": "dir 0775 0:0",
        "d/f": "file 0666 0:0 b''",
        "d/p": "fifo 0666 0:0",
    }


def test_setuid_kept_after_chown_to_another_owner(root: Path) -> None:
    tar = (
        TarBuilder()
        .dir("sg", mode=0o2775, gid=50)
        .file("sg/f", b"x", mode=0o6755, uid=1000, gid=1000)
        .file("sg/g", b"y", mode=0o644, uid=0, gid=0)  # inherits nothing: the entry's gid is applied
        .build()
    )
    apply(root, tar)
    assert describe_tree(root, mtime=False) == {
        "sg": "dir 2775 0:50",
        "sg/f": "file 6755 1000:1000 b'x'",
        "sg/g": "file 0644 0:0 b'y'",
    }


def test_directory_times_and_modes_restored_after_children(root: Path) -> None:
    tar = (
        TarBuilder()
        .dir("d", mode=0o755, mtime_ns=T1)
        .dir("ro", mode=0o555, mtime_ns=T2)
        .dir("none", mode=0o000, mtime_ns=T3)
        .file("d/late", b"1", mtime_ns=T3)
        .file("ro/f", b"2", mtime_ns=T3)
        .dir("none/sub", mode=0o555, mtime_ns=T1)
        .file("none/sub/f", b"3", mtime_ns=T2)
        .build()
    )
    apply(root, tar)
    assert describe_tree(root) == {
        "d": f"dir 0755 0:0 m={T1}",
        "d/late": f"file 0644 0:0 m={T3} b'1'",
        "none": f"dir 0000 0:0 m={T3}",
        "none/sub": f"dir 0555 0:0 m={T1}",
        "none/sub/f": f"file 0644 0:0 m={T2} b'3'",
        "ro": f"dir 0555 0:0 m={T2}",
        "ro/f": f"file 0644 0:0 m={T3} b'2'",
    }


def test_duplicates_last_wins(root: Path) -> None:
    tar = (
        TarBuilder()
        .file("f", b"first", mode=0o600)
        .file("f", b"second", mode=0o640)
        .dir("d", mode=0o700, mtime_ns=T1)
        .file("d/child", b"c")
        .dir("d", mode=0o750, mtime_ns=T2)  # dir onto dir: merged, the last metadata wins
        .dir("was-dir")
        .file("was-dir/x", b"x")
        .file("was-dir", b"now a file")  # the tree goes
        .file("was-file", b"f")
        .dir("was-file", mode=0o711)
        .symlink("was-file/../s", "t1")
        .symlink("s", "t2")
        .build()
    )
    apply(root, tar)
    assert describe_tree(root, mtime=False) == {
        "d": "dir 0750 0:0",
        "d/child": "file 0644 0:0 b'c'",
        "f": "file 0640 0:0 b'second'",
        "s": "symlink 0:0 -> t2",
        "was-dir": "file 0644 0:0 b'now a file'",
        "was-file": "dir 0711 0:0",
    }
    assert os.stat(root / "d").st_mtime_ns == T2


def test_hard_link_to_a_lower_layer_file(root: Path) -> None:
    apply(root, TarBuilder().file("usr/bin/perl", b"perl", mode=0o755).build())
    stats = apply(root, TarBuilder().hardlink("usr/bin/perl5", "/usr/bin/perl").build())
    a, b = os.stat(root / "usr/bin/perl"), os.stat(root / "usr/bin/perl5")
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 2)
    assert stats.size == 4


def test_hard_link_onto_itself_and_replacing_a_file(root: Path) -> None:
    tar = TarBuilder().file("a", b"A").file("b", b"B").hardlink("b", "a").hardlink("a", "a").build()
    apply(root, tar)
    assert describe_tree(root, mtime=False) == {
        "a": "file 0644 0:0 b'A' links=2",
        "b": "file 0644 0:0 b'A' links=2",
    }


def test_hard_link_to_missing_target_is_invalid(root: Path) -> None:
    with pytest.raises(InvalidArchive, match="hard link target 'nope' not found: 'h'"):
        apply(root, TarBuilder().hardlink("h", "nope").build())
    with pytest.raises(InvalidArchive, match="hard link target"):
        apply(root, TarBuilder().hardlink("h2", "later").file("later", b"").build())


def test_symlinked_parent_from_a_lower_layer_is_followed_inside(root: Path) -> None:
    apply(
        root, TarBuilder().dir("usr").dir("usr/lib").symlink("lib", "usr/lib").symlink("abs", "/usr").build()
    )
    apply(root, TarBuilder().file("lib/systemd/system/x.service", b"unit").file("abs/share/y", b"y").build())
    tree = describe_tree(root, mtime=False)
    assert tree["lib"] == "symlink 0:0 -> usr/lib"
    assert tree["usr/lib/systemd/system/x.service"] == "file 0644 0:0 b'unit'"
    assert tree["usr/share/y"] == "file 0644 0:0 b'y'"


def test_devices_fifos_and_ownership(root: Path) -> None:
    tar = (
        TarBuilder()
        .char("dev/tty", 5, 0, mode=0o666, uid=0, gid=5)
        .block("dev/big", 4095, (1 << 20) - 1, mode=0o600)
        .fifo("dev/fifo", mode=0o620, uid=12, gid=34)
        .build()
    )
    apply(root, tar)
    tree = describe_tree(root, mtime=False)
    assert tree["dev/tty"] == "char 0666 0:5 5:0"
    assert tree["dev/big"] == "block 0600 0:0 4095:1048575"
    assert tree["dev/fifo"] == "fifo 0620 12:34"
    with pytest.raises(InvalidArchive, match="device number 4096:0 out of range"):
        apply(root, TarBuilder().char("dev/x", 4096, 0).build())
    with pytest.raises(InvalidArchive, match="character device entries are not allowed"):
        apply(root, TarBuilder().char("dev/y", 1, 3).build(), options=ApplyOptions(devices="error"))


def test_xattrs_unsupported_or_overlay_are_skipped_and_counted(root: Path) -> None:
    tar = (
        TarBuilder()
        .dir("d", xattrs={"trusted.overlay.opaque": b"y", "user.ok": b"1"})
        .file("f", b"", xattrs={"user.overlay.redirect": b"/x", "nonamespace.x": b"v"})
        .symlink("s", "f", xattrs={"user.onlink": b"v"})
        .build()
    )
    stats = apply(root, tar)
    assert (stats.xattrs_dropped, stats.xattrs_skipped) == (2, 2)
    assert os.listxattr(root / "d") == ["user.ok"]
    assert os.listxattr(root / "f") == []


# ---------------------------------------------------------------------------------------------
# OCI whiteouts


def test_whiteouts_remove_files_links_and_trees(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    apply(
        root,
        TarBuilder()
        .file("etc/motd", b"hi")
        .symlink("etc/link", str(outside))
        .file("usr/share/doc/a/b", b"doc")
        .file("usr/share/doc/c", b"doc")
        .file("keep", b"k")
        .build(),
    )
    stats = apply(
        root,
        TarBuilder()
        .whiteout("etc/motd")
        .whiteout("etc/link")
        .whiteout("usr/share/doc")
        .whiteout("never/existed")
        .whiteout("missing-here")
        .build(),
    )
    assert describe_tree(root, mtime=False) == {
        "etc": "dir 0755 0:0",
        "keep": "file 0644 0:0 b'k'",
        "usr": "dir 0755 0:0",
        "usr/share": "dir 0755 0:0",
    }
    assert (outside / "keep").read_bytes() == b"keep"
    assert stats.whiteouts == 5


def lower_foo(root: Path) -> None:
    apply(root, TarBuilder().file("foo/lower1", b"1").file("foo/sub/lower2", b"2").file("bar", b"b").build())


@pytest.mark.parametrize("marker_first", [True, False])
def test_opaque_dir_keeps_only_this_layers_children(root: Path, marker_first: bool) -> None:
    lower_foo(root)
    b = TarBuilder().dir("foo")
    if marker_first:
        b.opaque("foo")
    b.file("foo/new", b"n").dir("foo/sub").file("foo/sub/new2", b"n2")
    if not marker_first:
        b.opaque("foo")
    apply(root, b.build())
    assert describe_tree(root, mtime=False) == {
        "bar": "file 0644 0:0 b'b'",
        "foo": "dir 0755 0:0",
        "foo/new": "file 0644 0:0 b'n'",
        "foo/sub": "dir 0755 0:0",
        "foo/sub/new2": "file 0644 0:0 b'n2'",
    }


def test_opaque_keeps_children_of_implied_dirs_of_the_layer(root: Path) -> None:
    lower_foo(root)
    apply(root, TarBuilder().file("foo/sub/new", b"n").opaque("foo").build())
    assert describe_tree(root, mtime=False) == {
        "bar": "file 0644 0:0 b'b'",
        "foo": "dir 0755 0:0",
        "foo/sub": "dir 0755 0:0",
        "foo/sub/new": "file 0644 0:0 b'n'",
    }


@pytest.mark.parametrize("whiteout_first", [True, False])
def test_delete_and_re_add_in_one_layer(root: Path, whiteout_first: bool) -> None:
    lower_foo(root)
    b = TarBuilder()
    if whiteout_first:
        b.whiteout("bar").whiteout("foo")
    b.file("bar", b"new bar").dir("foo").file("foo/only", b"o")
    if not whiteout_first:
        b.whiteout("bar").whiteout("foo")
    apply(root, b.build())
    assert describe_tree(root, mtime=False) == {
        "bar": "file 0644 0:0 b'new bar'",
        "foo": "dir 0755 0:0",
        "foo/only": "file 0644 0:0 b'o'",
    }


def test_invalid_whiteout_names(root: Path) -> None:
    for name in (".wh.", "etc/.wh.", ".wh..", ".wh...", "etc/.wh..", "etc/.wh..."):
        with pytest.raises(InvalidArchive, match="invalid whiteout entry"):
            apply(root, TarBuilder().file(name).build())
    with pytest.raises(InvalidArchive, match="named like a whiteout"):
        apply(root, TarBuilder().file(".wh.etc/somefile").build())


MOBY_BASE = [
    ".baz",
    "bar/",
    "bar/bax",
    "bar/bay/",
    "baz",
    "foo/",
    "foo/.abc",
    "foo/.bcd/",
    "foo/.bcd/a",
    "foo/cde/",
    "foo/cde/def",
    "foo/cde/efg",
    "foo/fgh",
    "foobar",
]
MOBY_LAYERS = [
    (MOBY_BASE, MOBY_BASE),
    (
        [".bay", ".wh.baz", "foo/", "foo/.bce", "foo/.wh..wh..opq", "foo/cde/", "foo/cde/efg"],
        [
            ".bay",
            ".baz",
            "bar/",
            "bar/bax",
            "bar/bay/",
            "foo/",
            "foo/.bce",
            "foo/cde/",
            "foo/cde/efg",
            "foobar",
        ],
    ),
    (
        [".bay", ".wh..baz", ".wh.foobar", "foo/", "foo/.wh.cde", "bar/"],
        [".bay", "bar/", "bar/bax", "bar/bay/", "foo/", "foo/.bce"],
    ),
    ([".abc", ".wh..wh..opq", "foobar"], [".abc", "foobar"]),
]


def test_moby_apply_layer_whiteouts(root: Path) -> None:
    """moby go-archive diff_test.go TestApplyLayerWhiteouts: four layers, exact trees."""
    for change, expected in MOBY_LAYERS:
        b = TarBuilder()
        for name in change:
            if name.endswith("/"):
                b.dir(name)
            else:
                b.file(name, name.encode())
        apply(root, b.build())
        found = sorted(p + "/" if (root / p).is_dir() else p for p in describe_tree(root))
        assert found == sorted(expected)


# ---------------------------------------------------------------------------------------------
# aufs


def test_aufs_hardlink_pool(root: Path) -> None:
    before = set(os.listdir(tempfile.gettempdir()))
    tar = (
        TarBuilder()
        .dir(".wh..wh.plnk")
        .file(".wh..wh.plnk/1234.5678", b"shared data", mode=0o751, uid=3, gid=4, mtime_ns=T1)
        .file(".wh..wh.aufs", b"meta")
        .dir(".wh..wh.orph")
        .file(".wh..wh.orph/x", b"orphan")
        .hardlink("usr/bin/a", "/.wh..wh.plnk/1234.5678")
        .hardlink("usr/bin/b", ".wh..wh.plnk/1234.5678")
        .build()
    )
    apply(root, tar)
    assert describe_tree(root, mtime=False) == {
        "usr": "dir 0755 0:0",
        "usr/bin": "dir 0755 0:0",
        "usr/bin/a": "file 0751 3:4 b'shared data'",
        "usr/bin/b": "file 0751 3:4 b'shared data'",
    }
    assert os.stat(root / "usr/bin/a").st_mtime_ns == T1
    assert set(os.listdir(tempfile.gettempdir())) == before  # the private pool is gone
    with pytest.raises(InvalidArchive, match="invalid aufs hard link"):
        apply(root, TarBuilder().hardlink("c", "/.wh..wh.plnk/missing").build())


# ---------------------------------------------------------------------------------------------
# overlay format


def test_overlay_whiteouts_are_char_devices_even_for_missing_targets(root: Path) -> None:
    tar = (
        TarBuilder()
        .dir("etc", mtime_ns=T1)
        .whiteout("etc/motd", uid=0, gid=0)
        .whiteout("gone/deeper/x", uid=12, gid=34)  # parents live in a lower layer
        .file("etc/new", b"n")
        .build()
    )
    stats = apply(root, tar, whiteout_format=WhiteoutFormat.OVERLAY)
    tree = describe_tree(root, mtime=False)
    assert tree == {
        "etc": "dir 0755 0:0",
        "etc/motd": "char 0000 0:0 0:0",
        "etc/new": "file 0644 0:0 b'n'",
        "gone": "dir 0755 0:0",
        "gone/deeper": "dir 0755 0:0",
        "gone/deeper/x": "char 0000 12:34 0:0",
    }
    assert os.stat(root / "etc").st_mtime_ns == T1
    assert stats.whiteouts == 2


@pytest.mark.parametrize("userxattr", [False, True])
@pytest.mark.parametrize("marker_first", [True, False])
def test_overlay_opaque_xattr_and_dropped_inner_whiteouts(
    root: Path, userxattr: bool, marker_first: bool
) -> None:
    b = TarBuilder().dir("d", mtime_ns=T2)
    if marker_first:
        b.opaque("d")
    b.whiteout("d/lowerfile").file("d/kept", b"k")
    if not marker_first:
        b.opaque("d")
    b.opaque("implied/dir")
    apply(root, b.build(), whiteout_format=WhiteoutFormat.OVERLAY, options=ApplyOptions(userxattr=userxattr))
    name = "user.overlay.opaque" if userxattr else "trusted.overlay.opaque"
    assert describe_tree(root, mtime=False) == {
        "d": f"dir 0755 0:0 xattrs[{name}=b'y']",
        "d/kept": "file 0644 0:0 b'k'",
        "implied": "dir 0755 0:0",
        "implied/dir": f"dir 0755 0:0 xattrs[{name}=b'y']",
    }


def test_overlay_same_layer_rules(root: Path) -> None:
    tar = (
        TarBuilder()
        .whiteout("redo")  # a whiteout, then the layer re-creates the name as a directory: opaque
        .dir("redo")
        .file("redo/x", b"x")
        .file("mine", b"m")
        .whiteout("mine")  # the layer's own file survives its whiteout
        .dir("mydir")
        .whiteout("mydir")  # ...and a directory becomes opaque
        .whiteout("was-file")
        .file("was-file", b"back")  # a file replaces the whiteout device
        .build()
    )
    apply(root, tar, whiteout_format=WhiteoutFormat.OVERLAY)
    assert describe_tree(root, mtime=False) == {
        "mine": "file 0644 0:0 b'm'",
        "mydir": "dir 0755 0:0 xattrs[trusted.overlay.opaque=b'y']",
        "redo": "dir 0755 0:0 xattrs[trusted.overlay.opaque=b'y']",
        "redo/x": "file 0644 0:0 b'x'",
        "was-file": "file 0644 0:0 b'back'",
    }


def test_overlay_layer_xattrs_never_applied(root: Path) -> None:
    tar = (
        TarBuilder()
        .dir("d", xattrs={"trusted.overlay.opaque": b"y", "trusted.overlay.redirect": b"/e"})
        .build()
    )
    stats = apply(root, tar, whiteout_format=WhiteoutFormat.OVERLAY)
    assert describe_tree(root, mtime=False) == {"d": "dir 0755 0:0"}
    assert stats.xattrs_dropped == 2


# ---------------------------------------------------------------------------------------------
# compression


@pytest.mark.parametrize("kind", ["gzip", "zstd", "bzip2", "xz"])
def test_compressed_layers_give_the_same_tree(root: Path, tmp_path: Path, kind: str) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    apply(plain, full_layer())
    stats = apply(root, compress(full_layer(), kind))  # type: ignore[arg-type]
    assert without_implied_times(describe_tree(root)) == without_implied_times(describe_tree(plain))
    assert stats.tar_bytes == len(full_layer())


def test_limits_are_enforced_while_applying(root: Path) -> None:
    with pytest.raises(LimitExceeded, match="deeper than 3"):
        apply(root, TarBuilder().file("a/b/c/d", b"").build(), limits=Limits(max_path_depth=3))
    with pytest.raises(LimitExceeded, match="more than 1 entries"):
        apply(root, TarBuilder().file("x").file("y").build(), limits=Limits(max_entries=1))


# ---------------------------------------------------------------------------------------------
# unprivileged


UNPRIVILEGED = """
import io, sys
from graphdriver.archive.apply import apply_layer, ApplyOptions
from graphdriver.errors import GraphDriverError
tar = open(sys.argv[2], "rb").read()
try:
    stats = apply_layer(sys.argv[1], io.BytesIO(tar), options=ApplyOptions(devices=sys.argv[3]))
    print("ok", stats.devices_skipped)
except GraphDriverError as exc:
    print(type(exc).__name__, exc)
"""


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    if not os.path.exists("/usr/bin/setpriv"):
        pytest.skip("setpriv (util-linux) is not installed")
    base = Path(tempfile.mkdtemp(prefix="gd-unpriv-", dir="/tmp"))
    os.chmod(base, 0o755)
    dest = base / "dest"
    dest.mkdir()
    os.chown(dest, 65534, 65534)
    yield dest
    subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=True)


def run_as_nobody(dest: Path, tar: bytes, devices: str = "create") -> str:
    layer = dest.parent / "layer.tar"
    layer.write_bytes(tar)
    os.chmod(layer, 0o644)
    src = str(Path(__file__).resolve().parents[2] / "src")
    command = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable, "-c"]
    proc = subprocess.run(
        [*command, UNPRIVILEGED, str(dest), str(layer), devices],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": src},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_unprivileged_apply_skips_ownership(nobody_dir: Path) -> None:
    tar = (
        TarBuilder()
        .dir("d", mode=0o555, uid=0, gid=0, mtime_ns=T1)
        .file("d/f", b"x", mode=0o4755, uid=1000, gid=1000, mtime_ns=T2)
        .symlink("d/s", "f", uid=5)
        .fifo("p", mode=0o640)
        .build()
    )
    assert run_as_nobody(nobody_dir, tar) == "ok 0"
    assert describe_tree(nobody_dir) == {
        "d": f"dir 0555 65534:65534 m={T1}",
        "d/f": f"file 4755 65534:65534 m={T2} b'x'",
        "d/s": f"symlink 65534:65534 m={0} -> f",
        "p": "fifo 0640 65534:65534 m=0",
    }


def test_unprivileged_device_is_permission_denied_naming_it(nobody_dir: Path) -> None:
    tar = TarBuilder().file("a", b"").char("dev/console", 5, 1).build()
    out = run_as_nobody(nobody_dir, tar)
    assert out.startswith("PermissionDenied ")
    assert "'dev/console'" in out
    assert run_as_nobody(nobody_dir, tar, devices="skip") == "ok 1"


def test_default_acl_from_a_layer_does_not_alter_later_modes(root: Path) -> None:
    # system.posix_acl_default "user::rwx group::--- other::---": new files would get 0600/0700
    acl = struct.pack("<I", 2) + struct.pack("<HHI", 0x01, 7, 0xFFFFFFFF)
    acl += struct.pack("<HHI", 0x04, 0, 0xFFFFFFFF) + struct.pack("<HHI", 0x20, 0, 0xFFFFFFFF)
    tar = (
        TarBuilder()
        .dir("acl", mode=0o755, xattrs={"system.posix_acl_default": acl})
        .file("acl/f", b"f", mode=0o644)
        .dir("acl/d", mode=0o755)
        .symlink("acl/s", "f")
        .fifo("acl/p", mode=0o666)
        .build()
    )
    apply(root, tar)
    modes = {p: v.split(" xattrs")[0] for p, v in describe_tree(root, mtime=False).items()}
    assert modes == {
        "acl": "dir 0755 0:0",
        "acl/d": "dir 0755 0:0",
        "acl/f": "file 0644 0:0 b'f'",
        "acl/p": "fifo 0666 0:0",
        "acl/s": "symlink 0:0 -> f",
    }


def test_non_directory_parent_is_invalid_naming_the_entry(root: Path) -> None:
    with pytest.raises(InvalidArchive, match=r"not a directory.*: 'a/b/c'"):
        apply(root, TarBuilder().file("a", b"file").file("a/b/c", b"x").build())
    with pytest.raises(InvalidArchive, match=r"not a directory.*: 'link/x'"):
        apply(root, TarBuilder().symlink("link", "a").file("link/x", b"x").build())


def test_trailing_bytes_after_the_end_marker_are_read_and_counted(root: Path) -> None:
    tar = TarBuilder().file("f", b"x").build() + bytes(10240 - 2048)  # tar(1) pads to 10 KiB records
    stats = apply(root, compress(tar, "gzip"))
    assert (stats.tar_bytes, stats.entries, stats.size) == (10240, 1, 1)


def test_directory_entry_over_existing_directory_drops_unnamed_xattrs(tmp_path: Path) -> None:
    """A directory entry carries the directory's whole metadata: an xattr it no longer names is gone."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "c").mkdir()
    os.setxattr(root / "c", "user.k", b"v")
    os.setxattr(root / "c", "user.keep", b"old")
    layer = TarBuilder().dir("c", mode=0o755, xattrs={"user.keep": b"new"}).build()
    apply_layer(root, io.BytesIO(layer))
    assert sorted(os.listxattr(root / "c")) == ["user.keep"]
    assert os.getxattr(root / "c", "user.keep") == b"new"
