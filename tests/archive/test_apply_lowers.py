"""apply_layer with lower layers: an overlay upper dir applied as the merged view resolves paths.

A child layer applied natively into its own upper dir (``WhiteoutFormat.OVERLAY`` with
``lowers``) must give, once mounted over its lowers, exactly the tree that applying every layer
onto one full copy (OCI whiteouts, vfs) gives: paths through a symlink or directory that only a
lower layer holds are resolved in the merged view, and the directories (and hard-link targets)
they need are copied up into the upper dir with their metadata. Each test checks the exact upper
dir, and the merged view against the OCI tree; hostile lowers must keep everything in the root.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from graphdriver.archive.apply import ApplyOptions, ApplyStats, LowerLayersNeeded, apply_layer
from graphdriver.archive.changes import changes_from_upper, changes_size
from graphdriver.archive.types import WhiteoutFormat
from graphdriver.errors import GraphDriverError, InvalidArchive, InvalidArgument
from graphdriver.fs.remove import remove_tree
from graphdriver.testing.tarbuild import TarBuilder, describe_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="overlay apply tests need root (trusted xattrs)")

OVERLAY = WhiteoutFormat.OVERLAY
T1 = 1_600_000_000_111_111_111
T2 = 1_650_000_000_222_222_222
T3 = 1_700_000_000_333_333_333
WHITEOUT = "char 0000 0:0 0:0"
OPAQUE = "xattrs[trusted.overlay.opaque=b'y']"


class Stack:
    """Layer dirs under ``tmp``: ``layers[0]`` the base (a full root), each next one an overlay
    upper dir applied with the ones below as its lowers; ``tars`` what made them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.layers: list[Path] = []
        self.tars: list[bytes] = []
        self.last_stats = ApplyStats()

    def add(self, tar: bytes, **kw: object) -> ApplyStats:
        """Apply ``tar`` as the next layer (on failure no layer is added, and its dir removed)."""
        d = self.tmp / f"layer{len(self.layers)}"
        d.mkdir()
        os.chmod(d, 0o755)
        try:
            if self.layers:
                stats = apply_layer(d, io.BytesIO(tar), whiteout_format=OVERLAY, lowers=self.lowers(), **kw)  # type: ignore[arg-type]
            else:
                stats = apply_layer(d, io.BytesIO(tar), **kw)  # type: ignore[arg-type]
        except BaseException:
            remove_tree(d)
            raise
        self.layers.append(d)
        self.tars.append(tar)
        self.last_stats = stats
        return stats

    def lowers(self) -> list[Path]:
        return list(reversed(self.layers))

    @property
    def top(self) -> Path:
        return self.layers[-1]

    def merged(self) -> dict[str, str]:
        """The stack mounted read-only (top first), described without times."""
        from graphdriver.errors import MountError
        from graphdriver.mount import mount_overlay, unmount

        mnt = self.tmp / "mnt"
        mnt.mkdir(exist_ok=True)
        try:
            mount_overlay(mnt, lowers=self.lowers(), readonly=True)
        except MountError as exc:
            pytest.skip(f"cannot mount overlay here: {exc}")
        try:
            return describe_tree(mnt, mtime=False)
        finally:
            unmount(mnt, detach=True)

    def flat(self) -> dict[str, str]:
        """Every tar applied onto one directory with OCI whiteouts (the vfs view)."""
        d = self.tmp / "flat"
        d.mkdir()
        os.chmod(d, 0o755)
        for tar in self.tars:
            apply_layer(d, io.BytesIO(tar))
        return describe_tree(d, mtime=False)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    yield Stack(tmp_path)


def assert_merged_is_flat(stack: Stack) -> None:
    assert stack.merged() == stack.flat()


def merged_usr() -> TarBuilder:
    return (
        TarBuilder()
        .dir("usr", mode=0o755, mtime_ns=T1)
        .dir("usr/lib", mode=0o750, uid=5, gid=6, mtime_ns=T1, atime_ns=T2, xattrs={"user.tag": b"lib"})
        .dir("usr/bin", mode=0o755, mtime_ns=T1)
        .file("usr/bin/sh", b"sh", mode=0o755, mtime_ns=T1)
        .symlink("lib", "usr/lib")
        .symlink("bin", "usr/bin")
    )


# -- parents through lower symlinks and directories -------------------------------------------------


def test_merged_usr_implied_parents_go_through_the_lower_symlink(stack: Stack) -> None:
    stack.add(merged_usr().build())
    stack.add(
        TarBuilder()
        .file("lib/systemd/system/unit", b"x", mtime_ns=T3)
        .file("bin/ls", b"ls", mode=0o755, mtime_ns=T3)
        .build()
    )
    upper = stack.top
    assert os.stat(upper / "usr/lib").st_atime_ns == T2  # copied up with the lower dir's times
    assert describe_tree(upper, mtime=False) == {
        "usr": "dir 0755 0:0",
        "usr/bin": "dir 0755 0:0",
        "usr/bin/ls": "file 0755 0:0 b'ls'",
        "usr/lib": "dir 0750 5:6 xattrs[user.tag=b'lib']",
        "usr/lib/systemd": "dir 0755 0:0",
        "usr/lib/systemd/system": "dir 0755 0:0",
        "usr/lib/systemd/system/unit": "file 0644 0:0 b'x'",
    }
    assert_merged_is_flat(stack)
    assert stack.merged()["lib"] == "symlink 0:0 -> usr/lib"


def test_copy_up_keeps_the_lower_dirs_metadata_but_not_overlay_xattrs(stack: Stack) -> None:
    stack.add(
        TarBuilder()
        .dir("etc", mode=0o1750, uid=7, gid=8, mtime_ns=T1, atime_ns=T2, xattrs={"user.a": b"1"})
        .symlink("cfg", "/etc")
        .build()
    )
    stack.add(TarBuilder().dir("etc", mode=0o1750, uid=7, gid=8, xattrs={"user.a": b"1"}).build())
    os.setxattr(stack.top / "etc", "trusted.overlay.opaque", b"y")  # a lower made it opaque
    os.utime(stack.top / "etc", ns=(T2, T1))
    stack.add(TarBuilder().file("cfg/new", b"n", mtime_ns=T3).build())
    upper = stack.top
    st = os.stat(upper / "etc")
    assert (st.st_atime_ns, os.stat(upper / "etc/new").st_mtime_ns) == (T2, T3)
    assert describe_tree(upper, mtime=False) == {
        "etc": "dir 1750 7:8 xattrs[user.a=b'1']",
        "etc/new": "file 0644 0:0 b'n'",
    }
    assert_merged_is_flat(stack)


def test_missing_parents_are_still_made_0755_root(stack: Stack) -> None:
    stack.add(merged_usr().build())
    stack.add(TarBuilder().file("opt/app/bin/run", b"r").build())
    assert describe_tree(stack.top, mtime=False) == {
        "opt": "dir 0755 0:0",
        "opt/app": "dir 0755 0:0",
        "opt/app/bin": "dir 0755 0:0",
        "opt/app/bin/run": "file 0644 0:0 b'r'",
    }
    assert_merged_is_flat(stack)


def test_an_entry_named_like_a_lower_symlink_replaces_it(stack: Stack) -> None:
    """A directory entry ``lib/`` itself is a real directory, as on a flat tree."""
    stack.add(merged_usr().build())
    stack.add(TarBuilder().dir("lib", mode=0o700).file("lib/x", b"x").build())
    assert describe_tree(stack.top, mtime=False) == {"lib": "dir 0700 0:0", "lib/x": "file 0644 0:0 b'x'"}
    assert_merged_is_flat(stack)


def test_symlink_chain_across_three_layers(stack: Stack) -> None:
    stack.add(TarBuilder().symlink("a", "b").dir("real", mode=0o711, uid=9, gid=9).build())
    stack.add(TarBuilder().symlink("b", "c/d").dir("c").symlink("c/d", "/real").build())
    stack.add(TarBuilder().file("a/x", b"x").build())
    assert describe_tree(stack.top, mtime=False) == {
        "real": "dir 0711 9:9",
        "real/x": "file 0644 0:0 b'x'",
    }
    assert_merged_is_flat(stack)


def test_dotdot_in_a_lower_symlink_target_walks_the_merged_tree(stack: Stack) -> None:
    stack.add(TarBuilder().dir("a").dir("a/b").dir("t", mode=0o700).symlink("a/b/up", "../../t").build())
    stack.add(TarBuilder().file("a/b/up/f", b"f").build())
    assert describe_tree(stack.top, mtime=False) == {"t": "dir 0700 0:0", "t/f": "file 0644 0:0 b'f'"}
    assert_merged_is_flat(stack)


def test_a_parent_that_is_a_lower_file_is_invalid(stack: Stack) -> None:
    stack.add(TarBuilder().file("f", b"f").symlink("lf", "f").build())
    with pytest.raises(InvalidArchive, match=r"not a directory.*'f/x'"):
        stack.add(TarBuilder().file("f/x", b"x").build())


def test_a_dangling_lower_symlink_on_the_way_is_invalid(stack: Stack) -> None:
    stack.add(TarBuilder().symlink("lib", "usr/lib").build())
    with pytest.raises(InvalidArchive, match=r"dangling symlink.*'lib/x'"):
        stack.add(TarBuilder().file("lib/x", b"x").build())


def test_a_lower_symlink_loop_is_invalid(stack: Stack) -> None:
    stack.add(TarBuilder().symlink("a", "b").build())
    stack.add(TarBuilder().symlink("b", "a").build())
    with pytest.raises(InvalidArchive, match=r"too many levels of symbolic links.*'a/x'"):
        stack.add(TarBuilder().file("a/x", b"x").build())


def test_a_name_whited_out_then_recreated_as_a_parent_is_an_opaque_dir(stack: Stack) -> None:
    stack.add(TarBuilder().dir("d").file("d/old", b"o").build())
    stack.add(TarBuilder().whiteout("d").file("d/new", b"n").build())
    assert describe_tree(stack.top, mtime=False) == {
        "d": f"dir 0755 0:0 {OPAQUE}",
        "d/new": "file 0644 0:0 b'n'",
    }
    assert_merged_is_flat(stack)


# -- whiteouts and opaque markers ------------------------------------------------------------------


def victim_layers(stack: Stack) -> None:
    stack.add(
        TarBuilder()
        .dir("victim", mode=0o750, uid=1, gid=2, xattrs={"user.v": b"1"})
        .file("victim/hello", b"h")
        .file("victim/keep", b"k")
        .symlink("lv", "../victim")
        .build()
    )


def test_whiteout_under_a_lower_symlinked_dir_lands_where_it_resolves(stack: Stack) -> None:
    victim_layers(stack)
    stack.add(TarBuilder().whiteout("lv/hello").build())
    assert describe_tree(stack.top, mtime=False) == {
        "victim": "dir 0750 1:2 xattrs[user.v=b'1']",
        "victim/hello": WHITEOUT,
    }
    assert_merged_is_flat(stack)
    assert "victim/hello" not in stack.merged()


def test_opaque_marker_under_a_lower_symlinked_dir(stack: Stack) -> None:
    victim_layers(stack)
    stack.add(TarBuilder().opaque("lv").file("lv/new", b"n").build())
    assert describe_tree(stack.top, mtime=False) == {
        "victim": "dir 0750 1:2 xattrs[trusted.overlay.opaque=b'y', user.v=b'1']",
        "victim/new": "file 0644 0:0 b'n'",
    }
    assert_merged_is_flat(stack)


def test_whiteout_of_a_copied_up_dir_keeps_what_the_layer_made_in_it(stack: Stack) -> None:
    victim_layers(stack)
    stack.add(TarBuilder().file("lv/new", b"n").whiteout("victim").build())
    assert describe_tree(stack.top, mtime=False) == {
        "victim": "dir 0750 1:2 xattrs[trusted.overlay.opaque=b'y', user.v=b'1']",
        "victim/new": "file 0644 0:0 b'n'",
    }
    assert_merged_is_flat(stack)


def test_whiteouts_and_opaque_markers_where_the_merged_view_has_no_dir_do_nothing(stack: Stack) -> None:
    stack.add(TarBuilder().symlink("abs", "/nowhere/victim").file("f", b"f").build())
    stack.add(TarBuilder().whiteout("abs/hello").whiteout("gone/x").opaque("abs").opaque("f").build())
    assert describe_tree(stack.top, mtime=False) == {}
    assert_merged_is_flat(stack)


# -- hard links --------------------------------------------------------------------------------------


def test_hard_link_to_a_lower_file_copies_it_up(stack: Stack) -> None:
    stack.add(
        TarBuilder()
        .dir("usr")
        .dir("usr/bin", mode=0o755, uid=0, gid=3)
        .file("usr/bin/a", b"data" * 1000, mode=0o4755, uid=3, gid=4, mtime_ns=T2, xattrs={"user.x": b"y"})
        .symlink("usr/bin/s", "a", uid=5, gid=5, mtime_ns=T1)
        .fifo("usr/bin/p", mode=0o640, mtime_ns=T1)
        .build()
    )
    stats = stack.add(
        TarBuilder()
        .hardlink("usr/bin/b", "usr/bin/a")
        .hardlink("s2", "/usr/bin/s")
        .hardlink("usr/bin/p2", "usr/bin/p")
        .build()
    )
    upper = stack.top
    data = b"data" * 1000
    assert describe_tree(upper, mtime=False) == {
        "usr": "dir 0755 0:0",
        "usr/bin": "dir 0755 0:3",
        "usr/bin/a": f"file 4755 3:4 {data!r} links=2 xattrs[user.x=b'y']",
        "usr/bin/b": f"file 4755 3:4 {data!r} links=2 xattrs[user.x=b'y']",
        "usr/bin/s": "symlink 5:5 -> a links=2",
        "s2": "symlink 5:5 -> a links=2",
        "usr/bin/p": "fifo 0640 0:0 links=2",
        "usr/bin/p2": "fifo 0640 0:0 links=2",
    }
    times = {n: os.lstat(upper / "usr/bin" / n).st_mtime_ns for n in ("a", "s", "p")}
    assert times == {"a": T2, "s": T1, "p": T1}
    assert stats.size == 4000 + 1 + 0
    assert_merged_is_flat(stack)


def test_hard_link_to_a_lower_file_through_a_lower_symlink(stack: Stack) -> None:
    stack.add(merged_usr().build())
    stack.add(TarBuilder().hardlink("bin/sh2", "bin/sh").build())
    assert describe_tree(stack.top, mtime=False) == {
        "usr": "dir 0755 0:0",
        "usr/bin": "dir 0755 0:0",
        "usr/bin/sh": "file 0755 0:0 b'sh' links=2",
        "usr/bin/sh2": "file 0755 0:0 b'sh' links=2",
    }
    assert_merged_is_flat(stack)


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (TarBuilder().whiteout("usr/bin/sh").hardlink("x", "usr/bin/sh"), "'usr/bin/sh' not found"),
        (TarBuilder().opaque("usr/bin").hardlink("x", "usr/bin/sh"), "'usr/bin/sh' not found"),
        (TarBuilder().hardlink("x", "usr/bin/none"), "'usr/bin/none' not found"),
        (TarBuilder().hardlink("x", "usr/lib"), "hard link to a directory"),
    ],
)
def test_hard_link_targets_the_merged_view_does_not_show(stack: Stack, layer: TarBuilder, match: str) -> None:
    stack.add(merged_usr().build())
    stack.add(TarBuilder().dir("usr").dir("usr/lib").build())
    with pytest.raises(InvalidArchive, match=match):
        stack.add(layer.build())


def test_hard_link_to_a_symlink_in_a_lower_layer_is_a_second_name_of_the_symlink(stack: Stack) -> None:
    stack.add(merged_usr().build())
    stack.add(TarBuilder().hardlink("l2", "lib").build())
    assert describe_tree(stack.top, mtime=False) == {
        "lib": "symlink 0:0 -> usr/lib links=2",
        "l2": "symlink 0:0 -> usr/lib links=2",
    }
    assert_merged_is_flat(stack)


# -- hostile lowers ------------------------------------------------------------------------------------


def snapshot(paths: Sequence[Path]) -> list[dict[str, str]]:
    return [describe_tree(p, include_root=True) for p in paths]


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A sentinel next to the layer dirs: ``tmp/etc/passwd``, ``tmp/victim/hello``."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_bytes(b"host")
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim/hello").write_bytes(b"host")
    before = describe_tree(tmp_path / "etc"), describe_tree(tmp_path / "victim")
    yield tmp_path
    assert (describe_tree(tmp_path / "etc"), describe_tree(tmp_path / "victim")) == before


def test_lower_symlinks_out_of_the_root_are_clamped_inside_it(stack: Stack, outside: Path) -> None:
    esc = "../" * 30 + str(outside).lstrip("/")
    stack.add(
        TarBuilder()
        .dir("etc", mode=0o700)
        .dir("victim")
        .file("victim/keep", b"k")
        .symlink("abs", "/etc")
        .symlink("rel", "../../../../../../victim")
        .symlink("far", esc + "/victim")
        .symlink("root", "/../..")
        .build()
    )
    lowers = snapshot(stack.layers)
    stack.add(
        TarBuilder()
        .file("abs/passwd", b"pwned")
        .file("rel/hello", b"pwned")
        .whiteout("rel/keep")
        .file("root/top", b"t")
        .build()
    )
    assert snapshot(stack.layers[:1]) == lowers
    assert describe_tree(stack.top, mtime=False) == {
        "etc": "dir 0700 0:0",
        "etc/passwd": "file 0644 0:0 b'pwned'",
        "victim": "dir 0755 0:0",
        "victim/hello": "file 0644 0:0 b'pwned'",
        "victim/keep": WHITEOUT,
        "top": "file 0644 0:0 b't'",
    }
    assert_merged_is_flat(stack)
    with pytest.raises(InvalidArchive, match="dangling symlink"):
        stack.add(TarBuilder().file("far/hello", b"pwned").build())


def test_lower_dirs_are_never_written(stack: Stack) -> None:
    victim_layers(stack)
    stack.add(merged_usr().build())
    lowers = snapshot(stack.layers)
    stack.add(
        TarBuilder()
        .file("lv/hello", b"new")
        .whiteout("lv/keep")
        .opaque("usr/bin")
        .hardlink("lib/l", "victim/hello")
        .build()
    )
    assert snapshot(stack.layers[:-1]) == lowers
    assert_merged_is_flat(stack)


# -- lowers_unavailable --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer",
    [
        TarBuilder().file("lib/systemd/unit", b"x"),
        TarBuilder().dir("a").hardlink("a/l", "usr/bin/sh"),
        TarBuilder().dir("usr").hardlink("usr/l", "usr/bin/sh"),
        TarBuilder().whiteout("usr/bin/sh"),
        TarBuilder().opaque("usr/lib"),
        TarBuilder().opaque(""),
    ],
    ids=["parent", "hardlink-parent", "hardlink-target", "whiteout", "opaque", "opaque-root"],
)
def test_lowers_unavailable_raises_where_the_lowers_are_needed(tmp_path: Path, layer: TarBuilder) -> None:
    with pytest.raises(LowerLayersNeeded, match="needs the lower layers") as info:
        apply_layer(
            tmp_path,
            io.BytesIO(layer.build()),
            whiteout_format=OVERLAY,
            options=ApplyOptions(lowers_unavailable=True),
        )
    assert isinstance(info.value, GraphDriverError)


def test_lowers_unavailable_applies_a_self_contained_layer(tmp_path: Path) -> None:
    tar = (
        TarBuilder()
        .dir("usr")
        .dir("usr/bin")
        .file("usr/bin/a", b"a")
        .hardlink("usr/bin/b", "usr/bin/a")
        .whiteout("usr/bin/old")
        .opaque("usr")
        .symlink("lib", "usr/lib")
        .build()
    )
    options = ApplyOptions(lowers_unavailable=True)
    apply_layer(tmp_path, io.BytesIO(tar), whiteout_format=OVERLAY, options=options)
    assert describe_tree(tmp_path, mtime=False) == {
        "lib": "symlink 0:0 -> usr/lib",
        "usr": f"dir 0755 0:0 {OPAQUE}",
        "usr/bin": "dir 0755 0:0",
        "usr/bin/a": "file 0644 0:0 b'a' links=2",
        "usr/bin/b": "file 0644 0:0 b'a' links=2",
    }


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"lowers": []}, "only with the overlay whiteout format"),
        ({"options": ApplyOptions(lowers_unavailable=True)}, "only with the overlay whiteout format"),
        (
            {"whiteout_format": OVERLAY, "lowers": [], "options": ApplyOptions(lowers_unavailable=True)},
            "lowers given with lowers_unavailable",
        ),
        ({"whiteout_format": OVERLAY, "lowers": ["/nonexistent-lower"]}, "cannot open the lower dir"),
    ],
)
def test_invalid_lower_arguments(tmp_path: Path, kw: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        apply_layer(tmp_path, io.BytesIO(TarBuilder().build()), **kw)  # type: ignore[arg-type]


# -- random stacks: the merged view is the flat tree, the measured size is the walked one ----------------

NAMES = ("a", "b", "lib", "usr")
TIMES = (T1, T2)


def _path(data: st.DataObject) -> str:
    depth = data.draw(st.integers(min_value=1, max_value=3), label="depth")
    return "/".join(data.draw(st.sampled_from(NAMES), label="name") for _ in range(depth))


def _random_tar(data: st.DataObject) -> bytes:
    b = TarBuilder()
    for _ in range(data.draw(st.integers(min_value=1, max_value=8), label="entries")):
        kinds = ("file", "file", "dir", "symlink", "whiteout", "opaque", "hardlink")
        kind = data.draw(st.sampled_from(kinds), label="kind")
        path = _path(data)
        when = data.draw(st.sampled_from(TIMES), label="mtime")
        if kind == "file":
            body = data.draw(st.sampled_from((b"", b"x", b"yy", b"zzz")), label="data")
            b.file(path, body, mtime_ns=when)
        elif kind == "dir":
            b.dir(path, mode=data.draw(st.sampled_from((0o755, 0o700)), label="mode"), mtime_ns=when)
        elif kind == "symlink":
            target = data.draw(st.sampled_from(("a", "usr/lib", "/usr", "../b", "..", "lib/a")), label="to")
            b.symlink(path, target, mtime_ns=when)
        elif kind == "whiteout":
            b.whiteout(path)
        elif kind == "opaque":
            b.opaque(path)
        else:
            b.hardlink(path, _path(data))
    return b.build()


def _outcome(fn: Callable[..., object], *args: object) -> type[BaseException] | None:
    try:
        fn(*args)
    except GraphDriverError as exc:
        return type(exc)
    return None


def _apply_flat(root: Path, tars: list[bytes]) -> None:
    for tar in tars:
        apply_layer(root, io.BytesIO(tar))


@settings(
    max_examples=40,
    derandomize=True,  # the same examples on every run
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_random_stacks_match_the_flat_tree(data: st.DataObject) -> None:
    """Each layer of a random stack is applied (or refused) as on a flat tree; the measured
    ``changes_size`` is the walked one; the mounted stack is the flat tree."""
    tmp = Path(tempfile.mkdtemp(prefix="apply-lowers-", dir="/var/tmp"))
    try:
        stack = Stack(tmp)
        for _ in range(data.draw(st.integers(min_value=2, max_value=4), label="layers")):
            tar = _random_tar(data)
            flat = tmp / "check"
            flat.mkdir()
            try:
                expected = _outcome(_apply_flat, flat, [*stack.tars, tar])
            finally:
                remove_tree(flat)
            got = _outcome(stack.add, tar)
            assert got == expected
            if got is None and len(stack.layers) > 1:
                upper, lowers = stack.top, stack.lowers()[1:]
                walked = changes_size(upper, changes_from_upper(upper, lowers))
                assert stack.last_stats.changes_size == walked
        event(f"{len(stack.layers)} layers applied")
        if len(stack.layers) >= 2:
            # overlay shows a lower file's own link count, even where a name of it was replaced
            # in an upper layer (the flat tree then has fewer links): compare without the counts
            unlinked = re.compile(r" links=\d+")
            merged_tree, flat_tree = stack.merged(), stack.flat()
            assert {k: unlinked.sub("", v) for k, v in merged_tree.items()} == {
                k: unlinked.sub("", v) for k, v in flat_tree.items()
            }
    finally:
        remove_tree(tmp)


def test_no_whiteout_where_no_lower_shows_the_name(stack: Stack) -> None:
    """A whiteout of a name the lowers do not show changes nothing (as OCI); a device there would
    even show up as an entry in a directory that merges nothing."""
    stack.add(TarBuilder().dir("d").file("d/x", b"x").build())
    stack.add(TarBuilder().whiteout("d/x").build())
    stack.add(TarBuilder().whiteout("d/x").whiteout("d/y").file("new/a", b"a").whiteout("new/b").build())
    assert describe_tree(stack.top, mtime=False) == {"new": "dir 0755 0:0", "new/a": "file 0644 0:0 b'a'"}
    assert_merged_is_flat(stack)


@pytest.mark.parametrize("marker", ["", "up"])
def test_opaque_root_hides_every_lower_name(stack: Stack, marker: str) -> None:
    """overlayfs ignores an opaque upper root: the lower root names get whiteouts, and a
    directory of the layer that merges with a lower one is made opaque (also when the marker's
    directory is the root reached through a lower symlink)."""
    stack.add(TarBuilder().dir("etc").file("etc/passwd", b"p").file("f", b"f").symlink("up", "..").build())
    stack.add(TarBuilder().opaque(marker).dir("etc").file("etc/new", b"n").build())
    assert describe_tree(stack.top, mtime=False) == {
        "etc": f"dir 0755 0:0 {OPAQUE}",
        "etc/new": "file 0644 0:0 b'n'",
        "f": WHITEOUT,
        "up": WHITEOUT,
    }
    assert_merged_is_flat(stack)
