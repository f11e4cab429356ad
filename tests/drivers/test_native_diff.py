"""overlay2's native diff equals the naive one, on randomly generated layer stacks.

Hypothesis builds a few layers, each by random operations through the layer's mounted view
(adds, rewrites, deletes, chmod/chown, xattrs, utimes, renames, hard links, symlinks, a directory
replaced by a new one (opaque), type changes). For every layer and its parent it checks:

- ``changes`` read from ``diff/`` == ``changes_dirs(merged, parent merged)``;
- ``diff_size`` native == the size of the naive change list;
- the native diff tar applied (OCI whiteouts) onto a copy of the parent's merged tree gives
  exactly the layer's merged tree;
- the same tar applied natively (``apply_diff`` into a new layer's ``diff/``) gives a layer
  whose merged tree and change list are the original's.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphdriver.archive.apply import apply_layer
from graphdriver.archive.changes import changes_dirs, changes_size
from graphdriver.archive.export import open_export
from graphdriver.archive.types import WhiteoutFormat
from graphdriver.drivers.overlay2 import Overlay2Driver
from graphdriver.fs.copy import copy_tree
from graphdriver.fs.remove import remove_tree
from graphdriver.testing.trees import Entry, diff_snapshots, snapshot_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="overlay2 needs root")

NAMES = ("a", "b", "c", "d")
MODES = (0o755, 0o700, 0o644, 0o600, 0o4755, 0o1777)
OWNERS = ((0, 0), (1000, 1000), (0, 1000))
OPS = (
    "write",
    "write",
    "mkdir",
    "mkdir",
    "delete",
    "chmod",
    "chown",
    "xattr",
    "utime",
    "symlink",
    "opaque",
    "retype",
    "rename",
    "hardlink",
)


def _entries(root: Path) -> tuple[list[str], list[str]]:
    """(all paths below root except root, real directories including root ""), relative, sorted."""
    paths, dirs = [], [""]
    for cur, dnames, fnames in os.walk(root):
        rel = os.path.relpath(cur, root)
        rel = "" if rel == "." else rel
        for n in dnames:
            paths.append(os.path.join(rel, n))
            if not os.path.islink(os.path.join(cur, n)):  # never write through a symlink
                dirs.append(os.path.join(rel, n))
        for n in fnames:
            paths.append(os.path.join(rel, n))
    return sorted(paths), sorted(dirs)


def _rm(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def _apply_op(root: Path, data: st.DataObject) -> None:
    paths, dirs = _entries(root)
    op = data.draw(st.sampled_from(OPS), label="op")
    if op in ("write", "mkdir", "symlink"):
        parent = root / data.draw(st.sampled_from(dirs), label="dir")
        name = data.draw(st.sampled_from(NAMES), label="name")
        p = parent / name
        if op == "write" and (not os.path.lexists(p) or (p.is_file() and not p.is_symlink())):
            p.write_bytes(data.draw(st.binary(max_size=3000), label="content"))
        elif op == "mkdir" and not os.path.lexists(p):
            p.mkdir(mode=0o755)
            (p / "f").write_bytes(data.draw(st.binary(max_size=100), label="content"))
        elif op == "symlink" and not os.path.lexists(p):
            p.symlink_to(data.draw(st.sampled_from(["a", "../b", "/etc/passwd", "x" * 200])))
        return
    if not paths:
        return
    rel = data.draw(st.sampled_from(paths), label="path")
    p = root / rel
    is_link = p.is_symlink()
    if op == "delete":
        _rm(p)
    elif op == "chmod" and not is_link:
        os.chmod(p, data.draw(st.sampled_from(MODES), label="mode"))
    elif op == "chown":
        uid, gid = data.draw(st.sampled_from(OWNERS), label="owner")
        os.lchown(p, uid, gid)
    elif op == "xattr" and not is_link:
        os.setxattr(p, "user.k", data.draw(st.binary(min_size=1, max_size=20), label="xattr"))
    elif op == "utime":
        ns = data.draw(st.integers(min_value=0, max_value=2_000_000_000 * 10**9), label="ns")
        os.utime(p, ns=(ns, ns), follow_symlinks=False)
    elif op == "opaque" and p.is_dir() and not is_link:
        shutil.rmtree(p)
        p.mkdir(mode=data.draw(st.sampled_from((0o755, 0o700)), label="mode"))
        (p / data.draw(st.sampled_from(NAMES), label="name")).write_bytes(b"new")
    elif op == "retype":
        if p.is_dir() and not is_link:
            shutil.rmtree(p)
            p.write_bytes(b"was a dir")
        else:
            p.unlink()
            p.mkdir()
    elif op == "rename" and p.is_file() and not is_link:
        dest = p.parent / (data.draw(st.sampled_from(NAMES), label="name") + "r")
        if not os.path.lexists(dest):
            os.rename(p, dest)
    elif op == "hardlink" and p.is_file() and not is_link:
        dest = p.parent / (data.draw(st.sampled_from(NAMES), label="name") + "h")
        if not os.path.lexists(dest):
            os.link(p, dest)


def _applied(old: Path, tar: bytes, dest: Path) -> dict[str, Entry]:
    """The tree of ``tar`` applied (OCI whiteouts) onto a copy of ``old``, without its root."""
    copy_tree(old, dest)
    apply_layer(dest, io.BytesIO(tar), whiteout_format=WhiteoutFormat.OCI)
    snap = snapshot_tree(dest)
    del snap["/"]  # the layer root's own attributes are in no change list
    return snap


def _check_layer(d: Overlay2Driver, id: str, parent: str, scratch: Path) -> None:
    native = d.changes(id, parent)
    assert d.native_diff_reason(id, parent) is None
    with d.mounted(id) as new, d.mounted(parent) as old:
        naive = changes_dirs(new, old)
        assert [str(c) for c in native] == [str(c) for c in naive]
        assert d.diff_size(id, parent) == changes_size(new, naive)
        with d.diff(id, parent) as stream:
            tar = stream.read()
        with open_export(new, naive) as stream:
            naive_tar = stream.read()
        want = snapshot_tree(new)
        del want["/"]
        got = _applied(old, tar, scratch / f"native-{id}")
        assert diff_snapshots(got, _applied(old, naive_tar, scratch / f"naive-{id}")) == []
        # A hard link made in this layer to a file of a lower layer becomes a copy in any layer
        # tar (the unchanged file is in no change list): the one difference the format allows.
        assert diff_snapshots(got, want, ignore=("link",)) == []
    again = f"{id}-again"
    d.create(again, parent)
    d.apply_diff(again, parent, io.BytesIO(tar))
    assert [str(c) for c in d.changes(again, parent)] == [str(c) for c in native]
    with d.mounted(again) as root:
        snap = snapshot_tree(root)
        del snap["/"]
        assert diff_snapshots(snap, want, ignore=("link",)) == []


@settings(
    max_examples=25,
    derandomize=True,  # the same examples on every run: CI stays reproducible
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data(), depth=st.integers(min_value=2, max_value=4))
def test_native_diff_equals_naive_diff(data: st.DataObject, depth: int) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="native-diff-", dir="/var/tmp"))
    d = Overlay2Driver(scratch / "overlay2")
    try:
        ids = [f"l{i}" for i in range(depth)]
        for i, id in enumerate(ids):
            d.create(id, ids[i - 1] if i else None)
            with d.mounted(id) as root:
                for _ in range(data.draw(st.integers(min_value=1, max_value=12), label="ops")):
                    _apply_op(root, data)
        for i in range(1, depth):
            _check_layer(d, ids[i], ids[i - 1], scratch)
    finally:
        d.cleanup()
        remove_tree(scratch)


def test_whiteout_below_a_directory_made_opaque_by_the_same_layer(tmp_path: Path) -> None:
    """Found by the random stacks: a layer replaces /d (opaque) and makes /d/b a new directory
    where the parent had a directory /d/b holding f. The change list is right (``C /d/b``,
    ``D /d/b/f``), and so is the tar (``d/.wh..wh..opq``, ``d/b/``, ``d/b/.wh.f``); but applied
    natively, ``d/b/.wh.f`` must not become a 0/0 device: /d/b lies under a directory this layer
    made opaque, so overlay does not merge it and would list the whiteout as an entry ``f`` that
    cannot be stat'ed."""
    d = Overlay2Driver(tmp_path / "overlay2")
    try:
        d.create("l0")
        with d.mounted("l0") as root:
            (root / "d" / "b").mkdir(parents=True)
            (root / "d" / "b" / "f").write_bytes(b"f")
        d.create("l1", "l0")
        with d.mounted("l1") as root:
            shutil.rmtree(root / "d")
            (root / "d").mkdir()
            (root / "d" / "b").mkdir()
        assert [str(c) for c in d.changes("l1", "l0")] == ["C /d", "C /d/b", "D /d/b/f"]
        _check_layer(d, "l1", "l0", tmp_path)
    finally:
        d.cleanup()
