"""Importing images: OCI layouts, oci-archives and docker-archives (both forms, and skopeo's),
gzip/zstd/plain layers, indexes and platforms, names; and hostile or broken inputs, each a typed
error that leaves the store exactly as it was.

The mounted root filesystem of an imported image is compared, entry by entry, with the tree the
same layers give when applied one after another onto a plain directory by the library's applier
(itself compared with GNU tar and umoci elsewhere).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from graphdriver.archive.apply import apply_layer
from graphdriver.errors import (
    BreakoutError,
    CorruptStream,
    DigestMismatch,
    InvalidArchive,
    InvalidArgument,
    NotFound,
)
from graphdriver.images.imagestore import ImageStore
from graphdriver.testing.trees import diff_snapshots, snapshot_tree

Kit = Any


def expected_tree(tmp: Path, image: Any) -> dict[str, Any]:
    """Apply the image's layers in order onto an empty directory, snapshot it."""
    import io

    root = tmp / "expected-rootfs"
    if not root.exists():
        root.mkdir()
        for la in image.layers:
            apply_layer(root, io.BytesIO(la.tar))
    return snapshot_tree(root)


def assert_rootfs(images: ImageStore, image_id: str, expected: dict[str, Any]) -> None:
    top = images.get(image_id).top_layer
    assert top is not None
    with images.layers.mounted(top) as root:
        got = snapshot_tree(root)
    assert diff_snapshots(expected, got) == []


def assert_clean(images: ImageStore) -> None:
    report = images.check()
    assert report.clean, report.lines()


# -- the happy paths -------------------------------------------------------------------------------


def test_import_oci_layout(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    image = ikit.standard_image(tmp_path)
    layout = ikit.write_layout(tmp_path / "layout", [(image, ikit.ref("v1"))])
    got = images.import_image(layout, names=["example.com/app:v1"])
    assert got.id == image.config_digest
    assert got.names == ("example.com/app:v1",)
    assert got.diff_ids == tuple(image.diff_ids)
    assert got.manifest_digests == (image.manifest_digest,)
    assert [images.layers.get(lid).chain_id for lid in got.layers] == image.chain_ids
    assert [images.layers.get(lid).compressed_digest for lid in got.layers] == [
        la.digest for la in image.layers
    ]
    assert got.created == "2024-01-02T03:04:05Z"
    assert_rootfs(images, got.id, expected_tree(tmp_path, image))
    # found by every handle
    for handle in (
        got.id,
        got.id.partition(":")[2],
        got.short_id,
        image.manifest_digest,
        "example.com/app:v1",
        f"example.com/app@{image.manifest_digest}",
    ):
        assert images.get(handle).id == got.id
    assert_clean(images)


def test_reimport_stores_nothing_new_and_adds_names(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    image = ikit.standard_image(tmp_path)
    layout = ikit.write_layout(tmp_path / "layout", [(image, ikit.ref("v1"))])
    first = images.import_image(layout, names=["app:1"])
    before = ikit.leftovers(images)
    again = images.import_image(f"oci:{layout}:v1", names=["app:2"])
    assert again.id == first.id and again.layers == first.layers
    assert again.names == ("docker.io/library/app:1", "docker.io/library/app:2")
    after = ikit.leftovers(images)
    assert after["layers"] == before["layers"] and after["driver"] == before["driver"]


@pytest.mark.parametrize("form", ["legacy", "oci"])
def test_import_docker_archive(images: ImageStore, tmp_path: Path, ikit: Kit, form: str) -> None:
    image = ikit.standard_image(tmp_path, ("none", "none", "none"))
    archive = ikit.write_docker_archive(
        tmp_path, image, tmp_path / "saved.tar", ("test:1", "quay.io/x/y:2"), form=form
    )
    got = images.import_image(archive)
    assert got.id == image.config_digest
    assert got.names == ("docker.io/library/test:1", "quay.io/x/y:2")
    assert [images.layers.get(lid).chain_id for lid in got.layers] == image.chain_ids
    assert_rootfs(images, got.id, expected_tree(tmp_path, image))
    assert images.get("test:1").id == got.id
    assert_clean(images)


def test_import_oci_archive(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    image = ikit.standard_image(tmp_path, ("zstd", "gzip", "gzip"))
    archive = ikit.write_oci_archive(tmp_path, image, tmp_path / "image.oci.tar", "v3")
    got = images.import_image(f"oci-archive:{archive}:v3", names=["app:v3"])
    assert got.id == image.config_digest
    assert_rootfs(images, got.id, expected_tree(tmp_path, image))
    assert_clean(images)
    # auto-detected, and compressed as a whole (docker save | gzip)
    packed = tmp_path / "image.oci.tar.gz"
    packed.write_bytes(gzip.compress(archive.read_bytes(), mtime=0))
    assert images.import_image(packed).id == got.id


def test_import_skopeo_docker_archive(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    """skopeo writes <diff-hex>.tar members and <id>/layer.tar symlinks to them."""
    skopeo = ikit.skopeo()
    image = ikit.standard_image(tmp_path, ("gzip", "none", "gzip"))  # skopeo refuses zstd here
    layout = ikit.write_layout(tmp_path / "layout", [(image, ikit.ref("v1"))])
    archive = tmp_path / "skopeo.tar"
    ikit.run(skopeo, "copy", "-q", f"oci:{layout}:v1", f"docker-archive:{archive}:example.com/sk:1")
    got = images.import_image(archive)
    assert got.names == ("example.com/sk:1",)
    assert got.diff_ids == tuple(image.diff_ids)
    assert_rootfs(images, got.id, expected_tree(tmp_path, image))


def test_members_out_of_order_are_spooled(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    """Layers stored top first in the archive: the early ones go through the staging area."""
    image = ikit.standard_image(tmp_path, ("none", "none", "none"))
    ikit.write_docker_archive(tmp_path, image, tmp_path / "plain.tar")
    work = tmp_path / "docker-plain.tar"  # the directory the archive was made from
    entry = json.loads((work / "manifest.json").read_text())[0]
    members = ["manifest.json", *reversed(entry["Layers"]), entry["Config"]]
    reordered = tmp_path / "reversed.tar"
    subprocess.run(["tar", "--format=pax", "-C", str(work), "-cf", str(reordered), *members], check=True)
    got = images.import_image(reordered)
    assert got.diff_ids == tuple(image.diff_ids)
    assert_rootfs(images, got.id, expected_tree(tmp_path, image))
    assert os.listdir(images.layers.staging_root) == []


def test_layers_already_stored_are_not_read(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    base = ikit.standard_image(tmp_path)
    images.import_image(ikit.write_layout(tmp_path / "a", [(base, {})]))
    child = ikit.make_image([*base.layers, ikit.layer(ikit.small_tar(tmp_path, b"four\n"), "gzip")])
    layout = ikit.write_layout(tmp_path / "b", [(child, {})])
    for la in base.layers:  # the shared blobs are not even needed
        (layout / "blobs" / "sha256" / la.digest.partition(":")[2]).unlink()
    got = images.import_image(layout)
    assert got.layers[:3] == images.get(base.config_digest).layers
    assert len(images.layers.layers()) == 4


# -- indexes and platforms -------------------------------------------------------------------------


def _multi(tmp_path: Path, ikit: Kit) -> tuple[Any, Any, Path]:
    from graphdriver.images.manifests import host_platform

    here = host_platform().architecture
    other = "s390x" if here != "s390x" else "amd64"
    mine = ikit.make_image([ikit.layer(ikit.small_tar(tmp_path, b"mine\n"), "gzip")], arch=here)
    theirs = ikit.make_image([ikit.layer(ikit.small_tar(tmp_path, b"theirs\n"), "gzip")], arch=other)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": theirs.manifest_digest,
                    "size": len(theirs.manifest),
                    "platform": {"os": "linux", "architecture": other},
                },
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": mine.manifest_digest,
                    "size": len(mine.manifest),
                    "platform": {"os": "linux", "architecture": here},
                },
            ],
        }
    ).encode()
    mine.extra_blobs[ikit.sha256(index)] = index
    mine.extra_blobs.update(theirs.blobs())
    layout = tmp_path / "multi"
    ikit.write_layout(layout, [])
    for digest, data in mine.blobs().items():
        (layout / "blobs" / "sha256" / digest.partition(":")[2]).write_bytes(data)
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.index.v1+json",
                        "digest": ikit.sha256(index),
                        "size": len(index),
                        "annotations": {"org.opencontainers.image.ref.name": "multi"},
                    }
                ],
            }
        )
    )
    return mine, theirs, layout


def test_index_picks_this_platform_or_the_one_asked(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    mine, theirs, layout = _multi(tmp_path, ikit)
    assert images.import_image(layout).id == mine.config_digest
    other = json.loads(theirs.config)["architecture"]
    assert images.import_image(f"oci:{layout}:multi", platform=f"linux/{other}").id == theirs.config_digest
    with pytest.raises(NotFound, match="no image for platform linux/mips"):
        images.import_image(layout, platform="linux/mips")


def test_several_images_need_a_choice(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    a = ikit.make_image([ikit.layer(ikit.small_tar(tmp_path, b"a\n"))])
    b = ikit.make_image([ikit.layer(ikit.small_tar(tmp_path, b"b\n"))])
    layout = ikit.write_layout(tmp_path / "two", [(a, ikit.ref("a")), (b, ikit.ref("b"))])
    with pytest.raises(InvalidArgument, match=r"holds 2 images \(a; b\): choose one"):
        images.import_image(layout)
    assert images.import_image(f"oci:{layout}:b").id == b.config_digest
    assert images.import_image(layout, ref=a.manifest_digest).id == a.config_digest
    with pytest.raises(NotFound, match=r"no image 'c' in index\.json"):
        images.import_image(layout, ref="c")


# -- hostile and broken inputs ---------------------------------------------------------------------


def _layout(tmp_path: Path, ikit: Kit) -> tuple[Any, Path]:
    image = ikit.standard_image(tmp_path)
    return image, ikit.write_layout(tmp_path / "layout", [(image, ikit.ref("v1"))])


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.partition(":")[2]


def _rewrite_index(layout: Path, mutate: Any) -> None:
    index = json.loads((layout / "index.json").read_text())
    mutate(index)
    (layout / "index.json").write_text(json.dumps(index))


def _set_manifest(image: Any, layout: Path, manifest: dict[str, Any], ikit: Kit) -> None:
    data = json.dumps(manifest).encode()
    _blob(layout, ikit.sha256(data)).write_bytes(data)

    def point(index: dict[str, Any]) -> None:
        index["manifests"][0]["digest"] = ikit.sha256(data)
        index["manifests"][0]["size"] = len(data)

    _rewrite_index(layout, point)


def _break(case: str, image: Any, layout: Path, ikit: Kit) -> None:
    manifest = json.loads(image.manifest)
    top = image.layers[2]
    if case == "wrong-layer-content":
        data = _blob(layout, top.digest).read_bytes()
        at = data.index(b"layer three")
        _blob(layout, top.digest).write_bytes(data[:at] + b"LAYER" + data[at + 5 :])
    elif case == "wrong-layer-digest":
        # the right content under the name of another digest
        other = ikit.sha256(b"another blob")
        _blob(layout, top.digest).rename(_blob(layout, other))
        manifest["layers"][2]["digest"] = other
        _set_manifest(image, layout, manifest, ikit)
    elif case == "wrong-layer-size":
        manifest["layers"][2]["size"] += 1
        _set_manifest(image, layout, manifest, ikit)
    elif case == "truncated-layer":
        data = _blob(layout, top.digest).read_bytes()
        _blob(layout, top.digest).write_bytes(data[: len(data) // 2])
    elif case == "truncated-gzip-layer":
        middle = image.layers[1]
        data = _blob(layout, middle.digest).read_bytes()
        _blob(layout, middle.digest).write_bytes(data[:-4])
    elif case == "missing-layer":
        _blob(layout, top.digest).unlink()
    elif case == "wrong-diff-id":
        config = json.loads(image.config)
        config["rootfs"]["diff_ids"][2] = ikit.sha256(b"something else")
        data = json.dumps(config).encode()
        _blob(layout, ikit.sha256(data)).write_bytes(data)
        manifest["config"].update(digest=ikit.sha256(data), size=len(data))
        _set_manifest(image, layout, manifest, ikit)
    elif case == "wrong-config-digest":
        _blob(layout, image.config_digest).write_bytes(image.config.replace(b"/bin/sh", b"/bin/xx"))
    elif case == "wrong-manifest-digest":
        _blob(layout, image.manifest_digest).write_bytes(image.manifest + b" ")
        _rewrite_index(layout, lambda ix: ix["manifests"][0].update(size=len(image.manifest) + 1))
    elif case == "bad-digest-string":
        manifest["layers"][1]["digest"] = "sha256:../../../../etc/passwd"
        _set_manifest(image, layout, manifest, ikit)
    elif case == "bad-index-digest":
        _rewrite_index(layout, lambda ix: ix["manifests"][0].update(digest="sha256:../../x"))
    elif case == "uppercase-digest":
        manifest["layers"][0]["digest"] = manifest["layers"][0]["digest"].upper().replace("SHA256", "sha256")
        _set_manifest(image, layout, manifest, ikit)
    elif case == "diff-id-count":
        manifest["layers"] = manifest["layers"][:2]
        _set_manifest(image, layout, manifest, ikit)
    elif case == "symlinked-blob":
        path = _blob(layout, top.digest)
        moved = layout.parent / "elsewhere"
        path.rename(moved)
        path.symlink_to(moved)
    elif case == "duplicate-json-key":
        (layout / "index.json").write_text('{"schemaVersion": 2, "schemaVersion": 2, "manifests": []}')
    else:
        raise AssertionError(case)


BROKEN = {
    "wrong-layer-content": (DigestMismatch, "diff ID mismatch"),
    "wrong-layer-digest": (DigestMismatch, "blob digest mismatch"),
    "wrong-layer-size": (DigestMismatch, "its descriptor says"),
    "truncated-layer": (DigestMismatch, r"\(truncated\)"),
    "truncated-gzip-layer": (DigestMismatch, r"\(truncated\)"),
    "missing-layer": (NotFound, "is missing"),
    "wrong-diff-id": (DigestMismatch, "diff ID mismatch"),
    "wrong-config-digest": (DigestMismatch, "config .* hashes to"),
    "wrong-manifest-digest": (DigestMismatch, "manifest .* hashes to"),
    "bad-digest-string": (InvalidArchive, r"invalid digest in manifest .*layers\[1\]"),
    "bad-index-digest": (InvalidArchive, "invalid digest in index.json"),
    "uppercase-digest": (InvalidArchive, "invalid digest"),
    "diff-id-count": (InvalidArchive, "has 2 layers but its config lists 3 diff IDs"),
    "symlinked-blob": (InvalidArchive, "not a regular file"),
    "duplicate-json-key": (InvalidArchive, "duplicate key"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_layout_leaves_nothing(images: ImageStore, tmp_path: Path, ikit: Kit, case: str) -> None:
    # an image sharing the bottom layer is already there: it must survive untouched
    image, layout = _layout(tmp_path, ikit)
    keep = ikit.make_image(image.layers[:1])
    images.import_image(ikit.write_layout(tmp_path / "keep", [(keep, {})]), names=["keep:1"])
    before = ikit.leftovers(images)
    _break(case, image, layout, ikit)
    error, message = BROKEN[case]
    with pytest.raises(error, match=message):
        images.import_image(layout)
    assert ikit.leftovers(images) == before
    assert [i.id for i in images.images()] == [keep.config_digest]
    assert_clean(images)


def _docker_dir(tmp_path: Path, ikit: Kit, form: str = "legacy") -> tuple[Any, Path]:
    image = ikit.standard_image(tmp_path, ("none", "none", "none"))
    archive = ikit.write_docker_archive(tmp_path, image, tmp_path / "saved.tar", form=form)
    work = tmp_path / "docker-dir"
    work.mkdir()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(work)], check=True)
    return image, work


def _manifest_json(work: Path, mutate: Any) -> None:
    doc = json.loads((work / "manifest.json").read_text())
    mutate(doc[0])
    (work / "manifest.json").write_text(json.dumps(doc))


def test_docker_archive_member_names_with_dotdot(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    from graphdriver.testing.tarbuild import TarBuilder

    before = ikit.leftovers(images)
    _image, work = _docker_dir(tmp_path, ikit)
    for name in ("../evil", "a/../../evil", "/etc/evil"):
        tb = TarBuilder()
        for p in sorted(work.rglob("*")):
            if p.is_file():
                tb.file(str(p.relative_to(work)), p.read_bytes())
        tb.file(name, b"x")
        bad = tmp_path / "dotdot.tar"
        bad.write_bytes(tb.build())
        with pytest.raises(BreakoutError, match="member name"):
            images.import_image(bad)
    assert ikit.leftovers(images) == before
    assert_clean(images)


@pytest.mark.parametrize("path", ["../outside.tar", "/etc/passwd", "a/../../x.tar"])
def test_docker_manifest_path_outside(images: ImageStore, tmp_path: Path, ikit: Kit, path: str) -> None:
    before = ikit.leftovers(images)
    _image, work = _docker_dir(tmp_path, ikit)
    _manifest_json(work, lambda e: e["Layers"].__setitem__(1, path))
    with pytest.raises(BreakoutError):
        images.import_image(ikit.tar_dir(work, tmp_path / "bad.tar"))
    assert ikit.leftovers(images) == before
    assert_clean(images)


def test_docker_member_symlink_outside(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    before = ikit.leftovers(images)
    _image, work = _docker_dir(tmp_path, ikit)
    layer_path = json.loads((work / "manifest.json").read_text())[0]["Layers"][2]
    (work / layer_path).unlink()
    (work / layer_path).symlink_to("../../../etc/passwd")
    with pytest.raises(BreakoutError, match="leading out of the archive"):
        images.import_image(ikit.tar_dir(work, tmp_path / "bad.tar"))
    (work / layer_path).unlink()
    (work / layer_path).symlink_to("/etc/passwd")
    with pytest.raises(BreakoutError, match="absolute target"):
        images.import_image(ikit.tar_dir(work, tmp_path / "bad2.tar"))
    assert ikit.leftovers(images) == before
    assert_clean(images)


@pytest.mark.parametrize(
    "case", ["wrong-layer", "wrong-config-name", "truncated-archive", "oci-form-wrong-blob"]
)
def test_broken_docker_archive_leaves_nothing(
    images: ImageStore, tmp_path: Path, ikit: Kit, case: str
) -> None:
    before = ikit.leftovers(images)
    _image, work = _docker_dir(tmp_path, ikit, "oci" if case.startswith("oci") else "legacy")
    layers = json.loads((work / "manifest.json").read_text())[0]["Layers"]
    error: type[Exception]
    if case == "wrong-layer":
        (work / layers[2]).write_bytes(ikit.small_tar(tmp_path, b"not the one\n"))
        error, message = DigestMismatch, "diff ID mismatch"
    elif case == "wrong-config-name":
        config = json.loads((work / "manifest.json").read_text())[0]["Config"]
        (work / config).write_bytes((work / config).read_bytes() + b"\n")
        error, message = DigestMismatch, "hashes to"
    elif case == "oci-form-wrong-blob":
        (work / layers[2]).write_bytes((work / layers[2]).read_bytes()[:-1024] + bytes(1024 * 3))
        error, message = DigestMismatch, "mismatch"
    else:
        error, message = CorruptStream, "unexpected end"
    archive = ikit.tar_dir(work, tmp_path / "bad.tar")
    if case == "truncated-archive":
        data = archive.read_bytes()
        archive.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(error, match=message):
        images.import_image(archive)
    assert ikit.leftovers(images) == before
    assert_clean(images)
    assert images.images() == []


def test_not_an_image(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArchive, match="not an OCI image layout"):
        images.import_image(tmp_path / "empty")
    plain = tmp_path / "plain.tar"
    plain.write_bytes(ikit.small_tar(tmp_path))
    with pytest.raises(InvalidArchive, match="neither a docker-archive"):
        images.import_image(plain)
    with pytest.raises(NotFound):
        images.import_image(tmp_path / "nothing-here")
    assert images.images() == []


def test_crashed_import_is_cleaned_up_on_open(
    store_root: Path, driver_name: str, tmp_path: Path, ikit: Kit
) -> None:
    """A process killed after its first layers: the next open removes what its lease claimed."""
    import sys

    image = ikit.standard_image(tmp_path)
    layout = ikit.write_layout(tmp_path / "layout", [(image, {})])
    script = (
        "import os, signal, sys\n"
        "from graphdriver.images.imagestore import ImageStore\n"
        "from graphdriver.layers.store import LayerStore\n"
        "orig = LayerStore.import_layer\n"
        "n = [0]\n"
        "def killer(self, *a, **kw):\n"
        "    n[0] += 1\n"
        "    if n[0] == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return orig(self, *a, **kw)\n"
        "LayerStore.import_layer = killer\n"
        "s = ImageStore.open(sys.argv[1], sys.argv[2])\n"
        "s.import_image(sys.argv[3])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(store_root), driver_name, str(layout)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == -9, proc.stderr
    raw = ImageStore.open(store_root, driver_name, recover=False)
    try:
        assert len(raw.layers.layers()) == 2
    finally:
        raw.close()
    with ImageStore.open(store_root, driver_name) as again:
        left = ikit.leftovers(again)
        assert left["layers"] == [] and left["rows"]["leases"] == 0
        assert_clean(again)
        assert again.import_image(layout).id == image.config_digest


def test_staging_is_empty_after_archive_import(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    image = ikit.standard_image(tmp_path, ("none", "none", "none"))
    images.import_image(ikit.write_docker_archive(tmp_path, image, tmp_path / "a.tar"))
    assert os.listdir(images.layers.staging_root) == []
    shutil.rmtree(tmp_path / "expected-rootfs", ignore_errors=True)
