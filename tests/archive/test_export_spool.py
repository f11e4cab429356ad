"""open_export writes a short change list into memory before returning the stream (no writer
thread), and streams from a thread when the list is long or its tar outgrows the spool: the bytes
are those of export_changes either way, and a writer's error is still raised by read."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest

from graphdriver.archive import export as export_module
from graphdriver.archive.export import export_changes, open_export
from graphdriver.archive.types import Change, ChangeKind
from graphdriver.errors import InvalidArgument

A = ChangeKind.ADD


def _expected(root: Path, changes: list[Change]) -> bytes:
    out = io.BytesIO()
    export_changes(root, changes, out)
    return out.getvalue()


def _export_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("export ")]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "small").write_bytes(b"small\n")
    (root / "big").write_bytes(bytes(range(256)) * (export_module._SPOOL_LIMIT // 256 + 1))
    return root


def test_a_short_list_is_spooled_without_a_thread(tree: Path) -> None:
    changes = [Change("/small", A)]
    with open_export(tree, changes) as stream:
        assert _export_threads() == []
        assert stream.read() == _expected(tree, changes)


def test_a_tar_over_the_spool_limit_is_streamed_from_a_thread(tree: Path) -> None:
    changes = [Change("/small", A), Change("/big", A)]
    with open_export(tree, changes) as stream:
        assert [t.name for t in _export_threads()] == [f"export {tree}"]
        assert stream.read() == _expected(tree, changes)
    assert _export_threads() == []


def test_a_long_list_is_streamed_from_a_thread(tree: Path) -> None:
    for i in range(export_module._SPOOL_MAX_CHANGES):
        (tree / f"f{i:04}").write_bytes(b"x")
    changes = [Change(f"/f{i:04}", A) for i in range(export_module._SPOOL_MAX_CHANGES)]
    changes.append(Change("/small", A))
    with open_export(tree, changes) as stream:
        assert len(_export_threads()) == 1
        assert stream.read() == _expected(tree, changes)


def test_a_spooled_error_is_raised_by_read_not_on_entry(tree: Path) -> None:
    with (
        open_export(tree, [Change("/small", A), Change("bad", A)]) as stream,
        pytest.raises(InvalidArgument, match="not a clean absolute path"),
    ):
        stream.read()
    with pytest.raises(InvalidArgument), open_export(tree, [Change("/small", A), Change("bad", A)]):
        pass  # not read: raised on leaving
