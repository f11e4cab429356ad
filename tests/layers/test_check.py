"""``check`` finds each inconsistency, constructed on purpose, and ``repair=True`` fixes it.

Every case breaks one thing behind the store's back (the driver's data, the database, the mount
table, the staging area), asserts the exact problem reported, repairs, and asserts that a second
check is clean and that what the repair removed is exactly what it said.
"""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from graphdriver import mount as kmount
from graphdriver.layers import ProblemKind
from graphdriver.layers.metadata import LayerKind, LayerState
from graphdriver.layers.store import LayerStore
from graphdriver.testing.tarbuild import TarBuilder

T = 1_700_000_000


def _base_tar() -> bytes:
    return (
        TarBuilder()
        .dir("etc", mode=0o755, mtime=T)
        .file("etc/hostname", b"base\n", mode=0o644, mtime=T)
        .file("etc/motd", b"hello\n", mode=0o644, mtime=T)
        .build()
    )


def _child_tar() -> bytes:
    return TarBuilder().file("child", b"child\n", mode=0o644, mtime=T).build()


def _stack(store: LayerStore) -> tuple[str, str, str]:
    """base <- child <- container; returns their ids."""
    base = store.import_layer(io.BytesIO(_base_tar()), names=["base"])
    child = store.import_layer(io.BytesIO(_child_tar()), base.id, names=["child"])
    ctr = store.create_layer(child.id, id="ctr")
    return base.id, child.id, ctr.id


def _kinds(report: Any) -> list[tuple[str, str | None]]:
    return [(str(p.kind), p.layer) for p in report.problems]


def _repair_and_recheck(store: LayerStore, **kw: Any) -> Any:
    fixed = store.check(repair=True, **kw)
    assert fixed.problems and all(p.repaired for p in fixed.problems), [str(p) for p in fixed.problems]
    again = store.check(**kw)
    assert again.clean, [str(p) for p in again.problems]
    return fixed


def test_clean_store_is_clean(store: LayerStore) -> None:
    _stack(store)
    report = store.check(verify_content=True)
    assert report.clean
    assert report.layers_checked == 3
    assert report.notes == []


def test_missing_driver_data(store: LayerStore) -> None:
    base, child, ctr = _stack(store)
    store.driver.remove(child)  # the data vanishes behind the store's back
    assert _kinds(store.check()) == [("missing-data", child)]
    with pytest.raises(Exception, match="no data"):
        store.mount("child")
    fixed = _repair_and_recheck(store)
    assert sorted(fixed.removed) == sorted([child, ctr])  # the child and everything on it
    assert [la.id for la in store.layers()] == [base]


def test_orphan_driver_data(store: LayerStore) -> None:
    base, _, _ = _stack(store)
    store.driver.create("orphan", base)
    assert _kinds(store.check()) == [("orphan-data", "orphan")]
    fixed = _repair_and_recheck(store)
    assert fixed.removed == ["orphan"]
    assert not store.driver.exists("orphan")
    assert len(store.layers()) == 3


def test_incomplete_and_removing_records(store: LayerStore) -> None:
    base, child, ctr = _stack(store)
    with store.write() as txn:  # an import that died after recording itself
        txn.insert("f" * 64, base, LayerKind.IMAGE)
        txn.set_state(ctr, LayerState.REMOVING)  # a removal that died half way
    store.driver.create("f" * 64, base)
    report = store.check()
    assert sorted(_kinds(report)) == sorted([("incomplete", "f" * 64), ("removing", ctr)])
    assert ctr not in {la.id for la in store.layers()}
    fixed = _repair_and_recheck(store)
    assert sorted(fixed.removed) == sorted(["f" * 64, ctr])
    assert not store.driver.exists("f" * 64) and not store.driver.exists(ctr)
    assert [la.id for la in store.layers()] == [base, child]


def test_dangling_parent(store: LayerStore, store_root: Path) -> None:
    base, child, ctr = _stack(store)
    conn = sqlite3.connect(store_root / "layers.db")  # break the database with its guard off
    try:
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("UPDATE layers SET parent = ? WHERE id = ?", ("gone" * 16, child))
        conn.commit()
    finally:
        conn.close()
    assert _kinds(store.check()) == [("dangling-parent", child)]
    fixed = _repair_and_recheck(store)
    assert sorted(fixed.removed) == sorted([child, ctr])
    assert [la.id for la in store.layers()] == [base]


def test_wrong_chain_id(store: LayerStore) -> None:
    _base, child, ctr = _stack(store)
    with store.write() as txn:
        txn.conn.execute("UPDATE layers SET chain_id = ? WHERE id = ?", ("sha256:" + "e" * 64, child))
    assert _kinds(store.check()) == [("chain-id", child)]
    fixed = _repair_and_recheck(store)
    assert sorted(fixed.removed) == sorted([child, ctr])


def test_stale_mount_counts(store: LayerStore, tmp_path: Path) -> None:
    base, child, ctr = _stack(store)
    store.driver.get(base)  # a mount that died after the driver's get, before its count
    with store.write() as txn:
        txn.set_mount(ctr, 2, str(tmp_path / "nowhere"), "mount", store_boot())  # not in the mount table
        txn.set_mount(child, 1, str(tmp_path / "x"), "plain", "an-earlier-boot")
        txn.set_mount_pending(base, "get")
    assert sorted(_kinds(store.check())) == sorted(
        [("bad-mount-count", ctr), ("bad-mount-count", child), ("bad-mount-count", base)]
    )
    _repair_and_recheck(store)
    assert [store.get(i).mount_count for i in (base, child, ctr)] == [0, 0, 0]
    assert store.get(base).mount_pending is None
    store.remove(ctr)  # no longer refused as "mounted"
    store.remove(child)
    store.remove(base)  # the driver's own count of the dead get was released too


def store_boot() -> str:
    from graphdriver.layers.mountstate import boot_id

    return boot_id()


def test_leaked_mount(store: LayerStore) -> None:
    _base, _child, ctr = _stack(store)
    # a mount of the layer's data the store does not count (a process died between the two)
    path = store.driver.get(ctr)
    if not kmount.is_mountpoint(path):
        kmount.mount(str(path), path, None, kmount.MS_BIND)
    assert _kinds(store.check()) == [("leaked-mount", ctr)]
    _repair_and_recheck(store)
    assert not kmount.is_mountpoint(path)


def test_changed_content(store: LayerStore) -> None:
    base, child, ctr = _stack(store)
    # change the stored content in the driver's own data (as bit rot or a stray writer would)
    data = store.driver.get(base)
    try:
        (data / "etc/hostname").write_bytes(b"tampered\n")
    finally:
        store.driver.put(base)
    assert store.check().clean  # only a content check reads the data
    report = store.check(verify_content=True)
    assert _kinds(report) == [("content", base)]
    assert "diff ID" in report.problems[0].message
    fixed = _repair_and_recheck(store, verify_content=True)
    assert sorted(fixed.removed) == sorted([base, child, ctr])
    assert store.layers() == []


def test_staging_leftover(store: LayerStore) -> None:
    (store.staging_root / "stage-crashed").mkdir()
    (store.staging_root / "stage-crashed" / "partial").write_bytes(b"x")
    with store.staging() as live:  # one in use: not a problem
        report = store.check()
        assert _kinds(report) == [("staging", None)]
        assert "stage-crashed" in report.problems[0].message
        _repair_and_recheck(store)
        assert live.is_dir()
    assert not live.exists()


def test_problems_in_use_are_not_repaired(store: LayerStore) -> None:
    _base, child, ctr = _stack(store)
    store.mount(ctr)
    with store.write() as txn:
        txn.conn.execute("UPDATE layers SET chain_id = ? WHERE id = ?", ("sha256:" + "e" * 64, child))
    report = store.check(repair=True)
    assert _kinds(report) == [("chain-id", child)]
    assert not report.problems[0].repaired
    assert "mounted" in report.problems[0].action
    assert store.get(ctr).mount_count == 1
    store.unmount(ctr)
    assert ProblemKind.CHAIN_ID in {p.kind for p in store.check(repair=True).problems}
    assert store.check().clean


def test_orphan_tarsplit_and_dangling_name(store: LayerStore, store_root: Path) -> None:
    base, child, _ = _stack(store)
    (store.tarsplit_root / f"{'9' * 64}.tsplit.zst").write_bytes(b"left over")
    conn = sqlite3.connect(store_root / "layers.db")
    try:
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("INSERT INTO names (name, layer_id) VALUES ('ghost', ?)", ("8" * 64,))
        conn.commit()
    finally:
        conn.close()
    report = store.check()
    assert sorted(_kinds(report)) == [("database", None), ("orphan-data", None)]
    _repair_and_recheck(store)
    assert not (store.tarsplit_root / f"{'9' * 64}.tsplit.zst").exists()
    assert store.get("base").id == base and store.get("child").id == child


def test_original_tar_refuses_changed_content(store: LayerStore) -> None:
    from graphdriver.errors import DigestMismatch, NotFound

    base, _, ctr = _stack(store)
    with store.original_tar(base) as stream:
        assert stream.read() == _base_tar()
    data = store.driver.get(base)
    try:
        (data / "etc/motd").write_bytes(b"HELLO\n")  # same size, other bytes
    finally:
        store.driver.put(base)
    with store.original_tar(base) as stream, pytest.raises(DigestMismatch):
        stream.read()
    with pytest.raises(NotFound, match="not imported"):
        store.original_tar(ctr).__enter__()
