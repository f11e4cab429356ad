"""Exporting images: every format and layer compression round-trips to the same image (config
byte for byte, diff IDs, chain IDs, root filesystem), exports are deterministic, skopeo accepts
them, and a failed export leaves nothing at the destination.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from graphdriver.errors import AlreadyExists, DigestMismatch, InvalidArgument, NotFound
from graphdriver.images.imagestore import ImageStore
from graphdriver.testing.trees import diff_snapshots, snapshot_tree

Kit = Any

CASES = [
    ("oci", "gzip"),
    ("oci", "none"),
    ("oci-archive", "gzip"),
    ("oci-archive", "none"),
    ("docker-archive", "none"),
    ("docker-archive", "gzip"),
]


def rootfs(images: ImageStore, ref: str) -> dict[str, Any]:
    top = images.get(ref).top_layer
    assert top is not None
    with images.layers.mounted(top) as root:
        return snapshot_tree(root)


def imported(images: ImageStore, tmp_path: Path, ikit: Kit) -> Any:
    image = ikit.standard_image(tmp_path)
    layout = ikit.write_layout(tmp_path / "source", [(image, ikit.ref("v1"))])
    return images.import_image(layout, names=["example.com/app:v1"])


def tree_bytes(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_round_trip(
    images: ImageStore, tmp_path: Path, ikit: Kit, driver_name: str, case: tuple[str, str]
) -> None:
    fmt, compression = case
    first = imported(images, tmp_path, ikit)
    dest = tmp_path / f"out.{fmt}"
    result = images.export_image("example.com/app:v1", dest, format=fmt, compression=compression)
    assert result.image == first.id
    assert [la["diff_id"] for la in result.layers] == list(first.diff_ids)
    if compression == "none":
        assert [la["digest"] for la in result.layers] == list(first.diff_ids)
    else:
        assert all(la["mediaType"].endswith("+gzip") for la in result.layers)
    # deterministic: the same image exported again gives the same bytes
    again = tmp_path / f"again.{fmt}"
    images.export_image(first.id, again, format=fmt, compression=compression)
    assert tree_bytes(again) == tree_bytes(dest)

    with ImageStore.open(tmp_path / "other-store", driver_name) as other:
        back = other.import_image(dest)
        assert back.id == first.id
        assert back.config == first.config
        assert back.names == ("example.com/app:v1",)
        assert back.diff_ids == first.diff_ids
        assert [other.layers.get(i).chain_id for i in back.layers] == [
            images.layers.get(i).chain_id for i in first.layers
        ]
        assert diff_snapshots(rootfs(images, first.id), rootfs(other, back.id)) == []
        assert other.check().clean
        ikit.release_mounts(tmp_path / "other-store")


def test_docker_25_form_reads_as_both(
    images: ImageStore, tmp_path: Path, ikit: Kit, driver_name: str
) -> None:
    first = imported(images, tmp_path, ikit)
    dest = tmp_path / "docker25.tar"
    images.export_image(first.id, dest, format="docker-archive", docker_form="oci")
    listing = subprocess.run(
        ["tar", "-tf", str(dest)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert {"manifest.json", "index.json", "oci-layout"} <= set(listing)
    for fmt in ("docker-archive", "oci-archive"):
        with ImageStore.open(tmp_path / f"store-{fmt}", driver_name) as other:
            assert other.import_image(dest, format=fmt).id == first.id
        ikit.release_mounts(tmp_path / f"store-{fmt}")


def test_layers_keep_their_original_bytes(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    """GNU tar's layer (pax headers, its own ordering) comes back byte for byte."""
    image = ikit.standard_image(tmp_path, ("none", "none", "none"))
    images.import_image(ikit.write_layout(tmp_path / "src", [(image, {})]), names=["x:1"])
    dest = tmp_path / "out"
    images.export_image("x:1", dest, compression="none")
    for la in image.layers:
        assert (dest / "blobs" / "sha256" / la.diff_id.partition(":")[2]).read_bytes() == la.tar
    assert (dest / "blobs" / "sha256" / image.config_digest.partition(":")[2]).read_bytes() == image.config


def test_oci_layout_shape(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    first = imported(images, tmp_path, ikit)
    dest = tmp_path / "layout"
    result = images.export_image(first.id, dest, compression="gzip")
    assert json.loads((dest / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((dest / "index.json").read_text())
    (desc,) = index["manifests"]
    assert desc["digest"] == result.manifest_digest
    assert desc["annotations"] == {
        "io.containerd.image.name": "example.com/app:v1",
        "org.opencontainers.image.ref.name": "v1",
    }
    blobs = sorted(os.listdir(dest / "blobs" / "sha256"))
    assert len(blobs) == 5  # three layers, the config, the manifest
    for name in blobs:
        assert hashlib.sha256((dest / "blobs" / "sha256" / name).read_bytes()).hexdigest() == name
    manifest = json.loads((dest / "blobs" / "sha256" / result.manifest_digest.partition(":")[2]).read_text())
    assert manifest["config"]["digest"] == first.id
    # gzip layers decompress to the original tars
    import gzip

    for la, diff_id in zip(manifest["layers"], first.diff_ids, strict=True):
        data = (dest / "blobs" / "sha256" / la["digest"].partition(":")[2]).read_bytes()
        assert "sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest() == diff_id
        assert data[4:8] == b"\0\0\0\0"  # mtime 0: reproducible


def test_skopeo_accepts_exports(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    skopeo = ikit.skopeo()
    first = imported(images, tmp_path, ikit)
    layout = tmp_path / "layout"
    images.export_image(first.id, layout, format="oci")
    info = json.loads(ikit.run(skopeo, "inspect", f"oci:{layout}:v1").stdout)
    assert info["Layers"] == [
        la["digest"]
        for la in json.loads(
            (
                layout
                / "blobs"
                / "sha256"
                / json.loads((layout / "index.json").read_text())["manifests"][0]["digest"].partition(":")[2]
            ).read_text()
        )["layers"]
    ]
    config = json.loads(ikit.run(skopeo, "inspect", "--config", f"oci:{layout}:v1").stdout)
    assert config["rootfs"]["diff_ids"] == list(first.diff_ids)
    for fmt, name in (("oci-archive", "a.tar"), ("docker-archive", "d.tar")):
        archive = tmp_path / name
        images.export_image(first.id, archive, format=fmt)
        out = tmp_path / f"copied-{fmt}"
        ikit.run(skopeo, "copy", "-q", f"{fmt}:{archive}", f"dir:{out}")
        copied = json.loads((out / "manifest.json").read_text())
        config = json.loads((out / copied["config"]["digest"].partition(":")[2]).read_text())
        assert config["rootfs"]["diff_ids"] == list(first.diff_ids)
        assert len(copied["layers"]) == 3
    # Docker 25+ form too
    archive = tmp_path / "d25.tar"
    images.export_image(first.id, archive, format="docker-archive", docker_form="oci")
    ikit.run(skopeo, "copy", "-q", f"docker-archive:{archive}", f"dir:{tmp_path / 'copied-d25'}")


def test_export_errors_leave_nothing(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    first = imported(images, tmp_path, ikit)
    with pytest.raises(NotFound):
        images.export_image("nope:1", tmp_path / "x")
    with pytest.raises(InvalidArgument, match="unknown export format"):
        images.export_image(first.id, tmp_path / "x", format="zip")
    with pytest.raises(InvalidArgument, match="unknown layer compression"):
        images.export_image(first.id, tmp_path / "x", compression="zstd")
    (tmp_path / "taken").write_text("x")
    with pytest.raises(AlreadyExists):
        images.export_image(first.id, tmp_path / "taken")
    with pytest.raises(NotFound, match="does not exist"):
        images.export_image(first.id, tmp_path / "no" / "dir" / "x.tar", format="oci-archive")

    # stored content changed behind the store's back: the export stops, nothing is left
    top = images.layers.get(first.top_layer or "")
    with images.layers.mounted(top.id) as root:
        (root / "srv" / "hello.txt").write_bytes(b"LAYER three\n")
    before = sorted(os.listdir(tmp_path))
    for fmt in ("oci", "oci-archive", "docker-archive"):
        with pytest.raises(DigestMismatch):
            images.export_image(first.id, tmp_path / f"broken.{fmt}", format=fmt)
    assert sorted(os.listdir(tmp_path)) == before
