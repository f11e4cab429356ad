"""apply keeps the previous entry's parent fd only for the next plain entry of the same directory:
every entry that could change how that directory resolves (a replacement of it or of an ancestor,
a whiteout, an opaque marker) makes the next entry resolve its parent afresh (CVE-2025-47290)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from graphdriver.archive.apply import apply_layer
from graphdriver.archive.types import WhiteoutFormat
from graphdriver.testing.tarbuild import TarBuilder


def _apply(root: Path, tar: TarBuilder, fmt: WhiteoutFormat = WhiteoutFormat.OCI) -> None:
    apply_layer(root, io.BytesIO(tar.build()), whiteout_format=fmt)


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = p.read_text()
    return out


def test_a_directory_replaced_by_a_symlink_is_resolved_again(tmp_path: Path) -> None:
    _apply(
        tmp_path,
        TarBuilder()
        .dir("elsewhere")
        .dir("d")
        .file("d/a", b"a")
        .file("d/b", b"b")  # d is kept for this entry
        .symlink("d", "/elsewhere")  # replaces d: the kept fd must not be used again
        .file("d/c", b"c"),  # resolved through the new symlink, clamped in the root
    )
    assert _tree(tmp_path) == {"elsewhere": "dir", "d": "-> /elsewhere", "elsewhere/c": "c"}


def test_an_ancestor_replaced_between_two_entries_of_one_directory(tmp_path: Path) -> None:
    _apply(
        tmp_path,
        TarBuilder()
        .dir("x")
        .dir("x/y")
        .file("x/y/a", b"a")
        .dir("z")
        .symlink("x", "z")  # x/y is gone with x
        .dir("z/y")
        .file("x/y/b", b"b"),  # the same parent path as x/y/a, now z/y
    )
    assert _tree(tmp_path) == {"z": "dir", "x": "-> z", "z/y": "dir", "z/y/b": "b"}


def test_an_opaque_marker_between_entries_of_one_directory(tmp_path: Path) -> None:
    (tmp_path / "d" / "lower").mkdir(parents=True)
    _apply(
        tmp_path,
        TarBuilder()
        .file("d/new1", b"1")
        .file("d/.wh..wh..opq", b"")  # removes lower's children of d, keeps this layer's
        .file("d/new2", b"2"),
    )
    assert _tree(tmp_path) == {"d": "dir", "d/new1": "1", "d/new2": "2"}


def test_an_entry_under_a_symlinked_parent_may_redirect_that_parent(tmp_path: Path) -> None:
    """``x -> n/..`` is the root while ``n`` is a directory; the entry ``x/n`` (the root's ``n``)
    makes ``n`` a symlink to ``d/e``, so the next entry of the same parent path, ``x/b``, lands in
    ``d``. A parent reached through a symlink is never kept: every entry resolves it afresh."""
    _apply(
        tmp_path,
        TarBuilder()
        .dir("d")
        .dir("d/e")
        .dir("n")
        .symlink("x", "n/..")
        .file("x/a", b"a")  # x is the root here
        .symlink("x/n", "d/e")  # replaces the root's n (a dir) with a symlink
        .file("x/b", b"b"),  # x -> n/.. -> d/e/.. = d
    )
    assert _tree(tmp_path) == {
        "d": "dir",
        "d/e": "dir",
        "d/b": "b",
        "n": "-> d/e",
        "x": "-> n/..",
        "a": "a",
    }
