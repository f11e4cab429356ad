"""Containers, commit, names, rmi, prune, leases, df, tree and check."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from graphdriver.errors import AlreadyExists, Busy, InvalidArgument, NotFound
from graphdriver.images.imagestore import ImageStore
from graphdriver.images.records import ImageTxn
from graphdriver.testing.trees import diff_snapshots, snapshot_tree

Kit = Any


def rootfs(images: ImageStore, layer_id: str | None) -> dict[str, Any]:
    assert layer_id is not None
    with images.layers.mounted(layer_id) as root:
        return snapshot_tree(root)


def base(images: ImageStore, tmp_path: Path, ikit: Kit, name: str = "app:1") -> Any:
    image = ikit.standard_image(tmp_path)
    return images.import_image(ikit.write_layout(tmp_path / f"src-{name}", [(image, {})]), names=[name])


def test_container_commit_round_trip(images: ImageStore, tmp_path: Path, ikit: Kit, driver_name: str) -> None:
    img = base(images, tmp_path, ikit)
    ctr = images.create_container("app:1", "web")
    assert ctr.image_id == img.id
    assert images.layers.get(ctr.layer_id).parent == img.top_layer
    # the same tree; only the root directory's mtime is the new layer's own (a fresh overlay
    # upper dir, a fresh vfs copy)
    assert diff_snapshots(rootfs(images, img.top_layer), rootfs(images, ctr.layer_id), exclude=("/",)) == []

    path = images.mount_container("web")
    assert images.container("web").mount_count == 1
    (path / "srv" / "hello.txt").write_bytes(b"changed\n")
    (path / "new-file").write_bytes(b"new\n")
    os.chown(path / "new-file", 123, 456)
    os.unlink(path / "etc" / "passwd")
    shutil.rmtree(path / "opt" / "app")
    os.chmod(path / "bin" / "tool", 0o700)
    with pytest.raises(Busy, match="mounted"):
        images.remove_container("web")
    assert images.unmount_container("web") == 0
    view = rootfs(images, ctr.layer_id)

    new = images.commit("web", "app:2", message="my change", author="tester")
    assert new.names == ("docker.io/library/app:2",)
    assert new.diff_ids[:3] == img.diff_ids and len(new.diff_ids) == 4
    assert new.layers[:3] == img.layers
    config = json.loads(new.config)
    assert config["history"][-1]["created_by"] == "graphdriver commit"
    assert config["history"][-1]["comment"] == "my change"
    assert config["author"] == "tester"
    assert len(config["history"]) == 4
    # a layer's changes never list the root directory itself (as Docker's), so the root's mtime
    # is the one the new layer got when it was applied
    assert diff_snapshots(view, rootfs(images, new.top_layer), exclude=("/",)) == []
    layer = images.layers.get(str(new.top_layer))
    assert layer.diff_id == new.diff_ids[-1]

    # the committed image exports and imports elsewhere to the same tree
    out = tmp_path / "committed.tar"
    images.export_image("app:2", out, format="oci-archive")
    with ImageStore.open(tmp_path / "elsewhere", driver_name) as other:
        back = other.import_image(out)
        assert back.id == new.id
        assert diff_snapshots(view, rootfs(other, back.top_layer), exclude=("/",)) == []
    ikit.release_mounts(tmp_path / "elsewhere")
    assert images.check().clean


def test_container_names_and_errors(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    base(images, tmp_path, ikit)
    images.create_container("app:1", "one")
    before = ikit.leftovers(images)
    with pytest.raises(AlreadyExists, match="already in use"):
        images.create_container("app:1", "one")
    with pytest.raises(InvalidArgument, match="invalid container name"):
        images.create_container("app:1", "../one")
    with pytest.raises(NotFound, match="image not known"):
        images.create_container("nothing:1", "two")
    with pytest.raises(NotFound, match="container not known"):
        images.mount_container("ghost")
    with pytest.raises(NotFound):
        images.commit("ghost", "x:1")
    assert ikit.leftovers(images) == before
    assert [c.name for c in images.containers()] == ["one"]


def test_rmi_and_containers(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    img = base(images, tmp_path, ikit)
    images.create_container(img.id, "c1")
    with pytest.raises(Busy, match="used by container"):
        images.rmi("app:1")
    with pytest.raises(Busy, match="used by container 'c1'"):
        images.layers.remove(images.container("c1").layer_id)
    images.remove_container("c1")
    with pytest.raises(Busy, match="used by image"):
        images.layers.remove(img.top_layer)
    assert images.containers() == []
    report = images.rmi("app:1")
    assert report.deleted == img.id and report.untagged == ["docker.io/library/app:1"]
    assert sorted(report.gc.removed) == sorted(img.layers)
    assert images.layers.layers() == [] and images.images() == []
    assert images.check().clean


def test_rmi_keeps_shared_layers_and_untags(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    a = ikit.standard_image(tmp_path)
    b = ikit.make_image([*a.layers[:2], ikit.layer(ikit.small_tar(tmp_path, b"b\n"), "gzip")])
    ia = images.import_image(ikit.write_layout(tmp_path / "a", [(a, {})]), names=["a:1", "a:latest"])
    ib = images.import_image(ikit.write_layout(tmp_path / "b", [(b, {})]), names=["b:1"])
    assert ia.layers[:2] == ib.layers[:2]
    report = images.rmi("a:latest")  # another name remains: only the name goes
    assert report.deleted is None and report.untagged == ["docker.io/library/a:latest"]
    assert images.get("a:1").names == ("docker.io/library/a:1",)
    report = images.rmi("a:1")
    assert report.gc.removed == [ia.layers[2]]
    assert len(images.layers.layers()) == 3
    assert images.get("b:1").layers == ib.layers
    images.rmi(ib.id)
    assert images.layers.layers() == []


def test_tags_move(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    img = base(images, tmp_path, ikit)
    other = ikit.make_image([ikit.layer(ikit.small_tar(tmp_path, b"o\n"))])
    o = images.import_image(ikit.write_layout(tmp_path / "o", [(other, {})]), names=["app:1"])
    assert images.get("app:1").id == o.id
    assert images.get(img.id).names == ()
    images.tag(img.id, "docker.io/library/app:1")
    assert images.get("app:1").id == img.id
    with pytest.raises(InvalidArgument):
        images.tag(img.id, "Bad Name")


def test_lease_protects_layers_from_rmi_and_prune(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    img = base(images, tmp_path, ikit)
    with images.lease(images.chain_of(img)):
        report = images.rmi("app:1")
        assert report.deleted == img.id and report.gc.removed == []
        assert images.prune().removed == []
        assert len(images.layers.layers()) == 3
    assert len(images.prune().removed) == 3


def test_stale_lease_is_cleaned(
    images: ImageStore, store_root: Path, driver_name: str, tmp_path: Path, ikit: Kit
) -> None:
    img = base(images, tmp_path, ikit)
    images.rmi(img.id)
    tars = ikit.standard_image(tmp_path)
    layer = images.layers.import_layer(io.BytesIO(tars.layers[0].tar))
    with images.layers.write() as txn:  # a lease whose process died: its lock is free
        ImageTxn(txn).add_lease("deadbeef" * 4, [str(layer.chain_id)])
    report = images.check()
    assert [p.kind for p in report.problems] == ["stale-lease"]
    fixed = images.check(repair=True)
    assert fixed.problems[0].repaired and layer.id in fixed.problems[0].action
    assert images.layers.layers() == []
    assert images.check().clean


def test_prune_df_tree(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:

    img = base(images, tmp_path, ikit)
    images.create_container("app:1", "c")
    stray = images.layers.import_layer(io.BytesIO(ikit.small_tar(tmp_path, b"stray\n")))
    mounted = images.layers.import_layer(io.BytesIO(ikit.small_tar(tmp_path, b"mounted\n")))
    images.layers.mount(mounted.id)
    df = images.df()
    assert (df.images, df.containers, df.layers.layers, df.unused_layers) == (1, 1, 6, 2)
    assert df.reclaimable == stray.size + mounted.size
    tree = images.tree()
    assert [n.layer.id for n in tree if n.depth == 0] == [img.layers[0], stray.id, mounted.id]
    by_id = {n.layer.id: n for n in tree}
    assert by_id[img.top_layer].images == ("docker.io/library/app:1",)
    assert by_id[images.container("c").layer_id].containers == ("c",)
    assert by_id[images.container("c").layer_id].depth == 3
    result = images.prune()
    assert result.removed == [stray.id]
    assert [k for k, _ in result.kept] == [mounted.id] and "mounted" in result.kept[0][1]
    images.layers.unmount(mounted.id)
    assert images.prune().removed == [mounted.id]
    assert len(images.layers.layers()) == 4


def test_check_finds_and_repairs_broken_records(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    img = base(images, tmp_path, ikit)
    other = ikit.make_image([ikit.layer(ikit.small_tar(tmp_path, b"o\n"))])
    images.import_image(ikit.write_layout(tmp_path / "o", [(other, {})]), names=["o:1"])
    with images.layers.write() as txn:  # the config changed behind the store's back
        txn.conn.execute("UPDATE images SET config = ? WHERE id = ?", (img.config + b" ", img.id))
    report = images.check()
    assert [(p.kind, p.subject) for p in report.problems] == [("image", img.id)]
    assert "hashes to" in report.problems[0].message
    fixed = images.check(repair=True)
    assert fixed.problems[0].repaired
    assert [i.names for i in images.images()] == [("docker.io/library/o:1",)]
    assert len(images.layers.layers()) == 1
    assert images.check().clean
