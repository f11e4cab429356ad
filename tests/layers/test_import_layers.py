"""LayerStore.import_layers: a stack imported at once (in parallel workers on overlay2) gives the same
layers as import_layer one by one, and a failure anywhere leaves nothing behind."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from graphdriver.errors import CorruptStream, DigestMismatch
from graphdriver.layers.metadata import LayerState
from graphdriver.layers.store import LayerBlob, LayerStore
from graphdriver.testing.tarbuild import TarBuilder, describe_tree


def _stack(kit: Any) -> list[Any]:
    """Three layers: a base, one that deletes, replaces and makes a dir opaque, and a small top."""
    base = (
        TarBuilder()
        .dir("etc", mode=0o755, mtime=1_700_000_000)
        .file("etc/motd", b"hello\n", mode=0o644, mtime=1_700_000_001)
        .file("etc/hostname", b"base\n", mode=0o644, mtime=1_700_000_002)
        .dir("opt", mode=0o755, mtime=1_700_000_003)
        .file("opt/a", b"a" * 5000, mode=0o600, uid=1, gid=2, mtime=1_700_000_004)
        .symlink("opt/link", "a", mtime=1_700_000_005)
        .build()
    )
    middle = (
        TarBuilder()
        .dir("etc", mode=0o755, mtime=1_700_000_010)
        .whiteout("etc/motd")
        .file("etc/hostname", b"middle\n", mode=0o644, mtime=1_700_000_011)
        .dir("opt", mode=0o755, mtime=1_700_000_012)
        .opaque("opt")
        .file("opt/b", b"b" * 100, mode=0o644, mtime=1_700_000_013)
        .dir("srv", mode=0o700, mtime=1_700_000_014)
        .file("srv/data", b"data\n", mode=0o4755, mtime=1_700_000_015)
        .build()
    )
    top = TarBuilder().dir("srv", mode=0o755, mtime=1_700_000_020).file("srv/new", b"new\n").build()
    return [kit.blob(base), kit.blob(middle, "gzip"), kit.blob(top, "zstd")]


def _specs(blobs: list[Any]) -> list[LayerBlob]:
    return [LayerBlob(io.BytesIO(b.data), b.diff_id, b.digest, b.size) for b in blobs]


def _summary(store: LayerStore) -> list[tuple[Any, ...]]:
    by_id = {la.id: la for la in store.layers()}
    out = []
    for la in store.layers():
        with store.mounted(la.id) as root:
            tree = describe_tree(root)
        parent_chain = None if la.parent is None else by_id[la.parent].chain_id
        out.append(
            (
                la.chain_id,
                parent_chain,
                la.diff_id,
                la.size,
                la.compressed_digest,
                la.compressed_size,
                la.uncompressed_size,
                tree,
            )
        )
    return sorted(out, key=lambda t: str(t[0]))


def test_import_layers_equals_import_layer_one_by_one(
    store_root: Path, driver_name: str, tmp_path: Path, kit: Any
) -> None:
    blobs = _stack(kit)
    with LayerStore.open(tmp_path / "one-by-one", driver_name) as ref:
        parent = None
        for b in blobs:
            parent = ref.import_layer(
                io.BytesIO(b.data),
                parent,
                expected_diff_id=b.diff_id,
                expected_digest=b.digest,
                expected_size=b.size,
            ).id
        want = _summary(ref)
    try:
        with LayerStore.open(store_root, driver_name) as store:
            layers = store.import_layers(_specs(blobs), workers=3)
            assert [la.diff_id for la in layers] == [b.diff_id for b in blobs]
            assert [la.parent for la in layers] == [None, layers[0].id, layers[1].id]
            assert _summary(store) == want
            # again: every chain is stored, nothing is read or added
            again = store.import_layers([LayerBlob(io.BytesIO(b""), b.diff_id) for b in blobs])
            assert [la.id for la in again] == [la.id for la in layers]
            assert store.check().problems == []
    finally:
        kit.release_mounts(tmp_path)


@pytest.mark.parametrize("broken", [0, 1, 2])
def test_import_layers_failure_leaves_nothing(
    store: LayerStore, tmp_path: Path, kit: Any, broken: int
) -> None:
    specs = _specs(_stack(kit))
    bad = specs[broken]
    specs[broken] = LayerBlob(bad.blob, "sha256:" + "0" * 64, bad.digest, bad.size)
    with pytest.raises(DigestMismatch):
        store.import_layers(specs, workers=2)
    assert store.layers() == []
    with store.db.read() as txn:
        assert [la for la in txn.all() if la.state is not LayerState.COMPLETE] == []
    assert store.check().problems == []


def test_import_layers_corrupt_blob_raises_its_error(store: LayerStore, kit: Any) -> None:
    blobs = _stack(kit)
    specs = _specs(blobs)
    truncated = blobs[1].data[: len(blobs[1].data) // 2]
    specs[1] = LayerBlob(io.BytesIO(truncated), blobs[1].diff_id)
    with pytest.raises(CorruptStream):
        store.import_layers(specs, workers=3)
    assert store.layers() == []


def test_import_layers_without_native_diff_applies_one_by_one(
    mounting_driver: str, tmp_path: Path, kit: Any
) -> None:
    """overlay2 with ``native_diff=false`` applies nothing on its own (``applies_alone`` is
    false for a child): the stack is applied bottom-up with ``apply_diff``, equal to import_layer."""
    blobs = _stack(kit)
    opts = {"native_diff": "false"}
    try:
        with LayerStore.open(tmp_path / "one-by-one", mounting_driver, opts) as ref:
            parent = None
            for b in blobs:
                parent = ref.import_layer(io.BytesIO(b.data), parent, expected_diff_id=b.diff_id).id
            want = _summary(ref)
        with LayerStore.open(tmp_path / "stack", mounting_driver, opts) as store:
            layers = store.import_layers(_specs(blobs), workers=3)
            assert [la.diff_id for la in layers] == [b.diff_id for b in blobs]
            assert _summary(store) == want
            assert store.check().problems == []
    finally:
        kit.release_mounts(tmp_path)
