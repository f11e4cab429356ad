"""Imports whose layers are applied in parallel: LayerStore.import_layers from an OCI layout.

On overlay2 each layer of a stack is applied into its own ``diff/`` in a forked worker, before the
layers below it are complete. A layer that needs them (here ``lib/x`` where only the base layer
has ``lib``, a symlink to ``usr/lib``) is applied again once they are (overlay2 resets its
directory and keeps its link, so the layers above it stay as they were applied). The result must
be what a vfs import (one full tree per layer) gives, to the last field.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from graphdriver.images.imagestore import ImageStore
from graphdriver.images.importer import PARALLEL_MIN_BLOB, _worth_parallel
from graphdriver.layers.store import LayerBlob, LayerStore
from graphdriver.testing.tarbuild import TarBuilder
from graphdriver.testing.trees import diff_snapshots, snapshot_tree

T = 1_700_000_000


def symlinked_stack() -> list[bytes]:
    base = (
        TarBuilder()
        .dir(".", mode=0o755, mtime=T)
        .dir("usr", mode=0o755, mtime=T)
        .dir("usr/lib", mode=0o755, mtime=T)
        .file("usr/lib/a", b"a\n", mtime=T)
        .symlink("lib", "usr/lib", mtime=T)
        .dir("etc", mode=0o755, mtime=T)
        .build()
    )
    through_symlink = TarBuilder().dir(".", mode=0o755, mtime=T + 1)
    through_symlink.file("lib/x", b"x\n", mode=0o640, mtime=T + 1)
    above = (
        TarBuilder()
        .dir(".", mode=0o755, mtime=T + 2)
        .dir("etc", mode=0o700, mtime=T + 2)
        .file("etc/y", b"y" * 100_000, mtime=T + 2)
    )
    return [base, through_symlink.build(), above.build()]


def _store(tmp_path: Path, ikit: Any, name: str, driver: str) -> LayerStore:
    reason = ikit.driver_unsupported(driver, tmp_path)
    if reason is not None:
        pytest.skip(f"driver {driver} does not work here: {reason}")
    return LayerStore.open(tmp_path / name, driver)


def _tree(store: LayerStore, layer: str) -> dict[str, Any]:
    with store.mounted(layer) as root:
        return snapshot_tree(root)


# the directory that receives lib/x (usr/lib, through the symlink): its mtime is the apply's
# time on any driver (overlay2's copy-up of /usr keeps /usr's, as overlayfs does)
APPLY_TIME = ("/usr/lib: mtime ",)


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [d for d in diff_snapshots(a, b) if not d.startswith(APPLY_TIME)]


def test_a_layer_that_needs_its_lowers_is_applied_again(tmp_path: Path, ikit: Any) -> None:
    tars = symlinked_stack()
    diff_ids = [ikit.sha256(t) for t in tars]
    try:
        ref = _store(tmp_path, ikit, "vfs", "vfs")
        parent = None
        for t in tars:
            parent = ref.import_layer(io.BytesIO(t), parent).id
        assert parent is not None
        par = _store(tmp_path, ikit, "overlay2", "overlay2")
        events: list[tuple[int, str]] = []
        blobs = [LayerBlob(io.BytesIO(t), d) for t, d in zip(tars, diff_ids, strict=True)]
        layers = par.import_layers(blobs, workers=2, on_event=lambda k, what: events.append((k, what)))
        # layer 1 needed the base's lib symlink: applied again (reset, same l/ link), alone;
        # layer 2 above it did not need any lower layer and stays as it was applied
        assert [w for k, w in events if k == 1] == ["applying", "applying", "applied"]
        assert [w for k, w in events if k == 2] == ["applying", "applied"]
        assert [la.diff_id for la in layers] == diff_ids
        expected = _tree(ref, parent)
        assert expected["/usr/lib/x"].sha256 == ikit.sha256(b"x\n").partition(":")[2]
        assert expected["/lib"].target == "usr/lib"
        assert differences(expected, _tree(par, layers[-1].id)) == []
        one = _store(tmp_path, ikit, "one", "overlay2")
        below = None
        for t, got in zip(tars, layers, strict=True):
            single = one.import_layer(io.BytesIO(t), below)
            below = single.id
            assert (got.size, got.uncompressed_size) == (single.size, single.uncompressed_size)
            assert differences(_tree(one, single.id), _tree(par, got.id)) == []
        for t, got in zip(tars, layers, strict=True):
            with par.original_tar(got.id) as stream:
                assert stream.read() == t
        assert not par.check().problems
    finally:
        ikit.release_mounts(tmp_path)


def test_oci_import_in_parallel_equals_a_vfs_import(tmp_path: Path, ikit: Any) -> None:
    tars = symlinked_stack()
    tars[2] = (
        TarBuilder()
        .dir(".", mode=0o755, mtime=T + 2)
        .file("big", b"z" * (PARALLEL_MIN_BLOB + 1), mtime=T + 2)
        .build()
    )
    image = ikit.make_image([ikit.layer(tars[0], "gzip"), ikit.layer(tars[1], "zstd"), ikit.layer(tars[2])])
    layout = ikit.write_layout(tmp_path / "layout", [(image, ikit.ref("v1"))])
    trees = {}
    try:
        for driver, parallel in (("vfs", None), ("overlay2", True), ("overlay2", False)):
            if ikit.driver_unsupported(driver, tmp_path) is not None:
                pytest.skip(f"driver {driver} does not work here")
            with ImageStore.open(tmp_path / f"{driver}-{parallel}", driver) as images:
                got = images.import_image(f"oci:{layout}:v1", parallel_apply=parallel)
                assert got.id == image.config_digest
                assert got.top_layer is not None
                stored = [la.chain_id for la in images.layers.layers()]
                assert sorted(stored) == sorted(image.chain_ids)
                trees[(driver, parallel)] = _tree(images.layers, got.top_layer)
                assert not images.layers.check().problems
        assert differences(trees[("vfs", None)], trees[("overlay2", True)]) == []
        assert differences(trees[("vfs", None)], trees[("overlay2", False)]) == []
    finally:
        ikit.release_mounts(tmp_path)


def test_parallel_only_where_it_pays(tmp_path: Path, ikit: Any) -> None:
    big, small = PARALLEL_MIN_BLOB, 4096
    try:
        overlay = _store(tmp_path, ikit, "o", "overlay2")
        vfs = _store(tmp_path, ikit, "v", "vfs")
        assert _worth_parallel(overlay, [big, big, small], None)
        assert not _worth_parallel(overlay, [big] + [small] * 199, None)  # a fork per tiny layer loses
        assert not _worth_parallel(overlay, [big, big], False)
        assert _worth_parallel(overlay, [small, small], True)
        assert not _worth_parallel(overlay, [big], True)
        assert not _worth_parallel(vfs, [big, big], None)
    finally:
        ikit.release_mounts(tmp_path)
