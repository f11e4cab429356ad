"""Round trips: tree -> tar -> applied tree is identical, for whole trees and for change lists.

Identical means the exact snapshot of graphdriver.testing.trees: type, mode with set-id and
sticky bits, owner, size, content, symlink target, nanosecond mtime, xattrs, device numbers and
hard-link groups. Whole trees are applied with our applier and, as an outside check, with GNU tar.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from graphdriver.archive.apply import apply_layer
from graphdriver.archive.changes import changes_dirs
from graphdriver.archive.export import export_changes, open_export, tar_tree
from graphdriver.archive.types import ChangeKind
from graphdriver.testing.trees import Entry, diff_snapshots, make_sample_tree, snapshot_tree

ROOT = os.geteuid() == 0
T1 = 1_750_000_000_987_654_321


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    root = tmp_path / "sample"
    root.mkdir()
    make_sample_tree(root)
    # a few more kinds, to be independent of what the shared sample holds
    fd = os.open(root / "setgid-file", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"sg")
    os.fchmod(fd, 0o2755)
    os.close(fd)
    os.symlink("does/not/exist", root / "dangling")
    os.utime(root / "dangling", ns=(T1, T1), follow_symlinks=False)
    os.link(root / "setgid-file", root / "bin/setgid-link")
    os.utime(root / "setgid-file", ns=(T1, T1))
    os.utime(root / "bin", ns=(T1, T1))
    os.utime(root, ns=(T1, T1))
    return root


def test_sample_holds_every_kind(sample: Path) -> None:
    snap = snapshot_tree(sample)
    kinds = {e.type for e in snap.values()}
    assert {"file", "dir", "symlink", "fifo"} <= kinds
    if ROOT:
        assert {"chr", "blk"} <= kinds
    modes = {e.mode for e in snap.values()}
    assert {0o4755, 0o2755, 0o1777, 0o555} <= modes
    assert any(e.type == "file" and e.size == 0 for e in snap.values())
    assert any(e.type == "file" and e.size > 1 << 20 for e in snap.values())
    assert any(e.link_group for e in snap.values())
    assert any(name.startswith("user.") for e in snap.values() for name, _ in e.xattrs)
    assert any(e.mtime_ns % 1_000_000_000 for e in snap.values())
    ro = [p for p, e in snap.items() if e.type == "dir" and e.mode == 0o555]
    assert any(p.startswith(d + "/") for d in ro for p in snap)


def test_tar_tree_then_apply_gives_the_same_tree(sample: Path, tmp_path: Path) -> None:
    buf = io.BytesIO()
    tar_tree(sample, buf)
    buf.seek(0)
    dest = tmp_path / "dest"
    dest.mkdir()
    apply_layer(dest, buf)
    assert diff_snapshots(snapshot_tree(sample), snapshot_tree(dest)) == []


def test_open_export_then_apply_gives_the_same_tree(sample: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with open_export(sample, None) as stream:
        apply_layer(dest, stream)
    assert diff_snapshots(snapshot_tree(sample), snapshot_tree(dest)) == []


def test_tar_tree_then_gnu_tar_gives_the_same_tree(sample: Path, tmp_path: Path) -> None:
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    archive = tmp_path / "tree.tar"
    with open(archive, "wb") as f:
        tar_tree(sample, f)
    dest = tmp_path / "dest"
    dest.mkdir()
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", str(archive), "-C", str(dest)],
        check=True,
    )
    assert diff_snapshots(snapshot_tree(sample), snapshot_tree(dest)) == []


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    subprocess.run(["cp", "-a", "--preserve=all", f"{src}/.", str(dst)], check=True)
    return dst


def _modify(root: Path) -> None:
    """Every kind of change a layer can make, on a copy of the sample tree."""
    # adds: a new tree, a new hard-link pair, a file in a read-only (0555) directory
    (root / "new/deep/er").mkdir(parents=True)
    (root / "new/deep/er/file").write_bytes(b"new file\n")
    (root / "new/h1").write_bytes(b"pair\n")
    os.link(root / "new/h1", root / "new/h2")
    (root / "ro/added").write_bytes(b"in ro\n")
    # content and size
    with open(root / "etc/passwd", "ab") as f:
        f.write(b"user:x:1000:1000\n")
    (root / "data/big").write_bytes(b"smaller now")
    # deletes: a file, a whole tree, a symlink
    (root / "etc/write-only").unlink()
    shutil.rmtree(root / "a/b/c")
    (root / "link-abs").unlink()
    # metadata only
    os.chmod(root / "bin/tool", 0o755)  # setuid dropped
    os.chmod(root / "tmp", 0o1770)
    os.setxattr(root / "data/empty", "user.added", b"\x00\x01")
    os.removexattr(root / "bin/tool", "user.origin")
    os.utime(root / "etc/shadow", ns=(T1, T1))
    # symlink retarget, type changes
    (root / "link-rel").unlink()
    os.symlink("etc/shadow", root / "link-rel")
    (root / "fifo").unlink()
    (root / "fifo").write_bytes(b"was a fifo\n")
    shutil.rmtree(root / "data/sub")  # drops one name of the hard-link pair too
    (root / "data/sub").write_bytes(b"was a directory\n")
    (root / "etc/passwd-dir").mkdir()
    if ROOT:
        os.chown(root / "home/user/notes", 0, 0)
        os.chmod(root / "home/user/notes", 0o600)
        (root / "dev/null").unlink()
        os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 5))
        os.chmod(root / "dev/null", 0o666)
        os.setxattr(root / "etc", "trusted.added", b"t")


def _root_mtime_free(snap: dict[str, Entry]) -> dict[str, Entry]:
    """The root is never in a change list, so its mtime is not carried: leave it out."""
    return {**snap, "/": dataclasses.replace(snap["/"], mtime_ns=0)}


def test_changes_round_trip(sample: Path, tmp_path: Path) -> None:
    lower = sample
    upper = _copy(lower, tmp_path / "modified")
    _modify(upper)
    changes = changes_dirs(upper, lower)
    kinds = {c.kind for c in changes}
    assert kinds == {ChangeKind.ADD, ChangeKind.MODIFY, ChangeKind.DELETE}

    buf = io.BytesIO()
    export_changes(upper, changes, buf)
    buf.seek(0)
    target = _copy(lower, tmp_path / "target")
    apply_layer(target, buf)

    want, got = snapshot_tree(upper), snapshot_tree(target)
    assert diff_snapshots(_root_mtime_free(want), _root_mtime_free(got)) == []
    assert changes_dirs(target, upper) == []  # and the comparison agrees


def test_changes_round_trip_through_the_stream(sample: Path, tmp_path: Path) -> None:
    upper = _copy(sample, tmp_path / "modified")
    _modify(upper)
    target = _copy(sample, tmp_path / "target")
    with open_export(upper, changes_dirs(upper, sample)) as stream:
        apply_layer(target, stream)
    want, got = snapshot_tree(upper), snapshot_tree(target)
    assert diff_snapshots(_root_mtime_free(want), _root_mtime_free(got)) == []
