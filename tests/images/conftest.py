"""Fixtures of the image tests: an image store on every driver that works here, and test images.

Test images are built here from real files, with no network: trees made on disk and packed by
GNU tar (``--format=pax``, xattrs), by the library's exporter, or written entry by entry with
:class:`~graphdriver.testing.tarbuild.TarBuilder` (whiteouts, opaque directories); compressed
with gzip, zstd or not at all; written into OCI layouts, oci-archives (GNU tar of a layout) and
docker-archives in both forms (legacy ``<id>/layer.tar`` and Docker 25+ ``blobs/sha256``).
Test modules cannot import this file (``--import-mode=importlib``): they get the helpers through
the ``ikit`` fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from graphdriver.images.imagestore import ImageStore
from graphdriver.images.manifests import host_platform
from graphdriver.layers import chain_ids
from graphdriver.testing.blobs import MEDIA_TYPES, Blob, blob, gnu_tar, library_tar, sha256
from graphdriver.testing.storestate import driver_unsupported, release_mounts, require_driver
from graphdriver.testing.tarbuild import TarBuilder
from graphdriver.testing.trees import make_sample_tree

DRIVERS = ("vfs", "overlay2")
T0 = 1_700_000_000
MEDIA = MEDIA_TYPES
LayerBlob = Blob
layer = blob

@pytest.fixture(params=DRIVERS)
def driver_name(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    return require_driver(request.param, tmp_path_factory.getbasetemp())


@pytest.fixture
def store_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "store"
    yield root
    release_mounts(tmp_path)


@pytest.fixture
def images(store_root: Path, driver_name: str) -> Iterator[ImageStore]:
    s = ImageStore.open(store_root, driver_name)
    try:
        yield s
    finally:
        s.close()


# -- layers and images ---------------------------------------------------------------------------


@dataclass
class TestImage:
    """An image as a registry would serve it: layer blobs, a config, a manifest."""

    layers: list[LayerBlob]
    config: bytes
    manifest: bytes
    extra_blobs: dict[str, bytes] = field(default_factory=dict)

    @property
    def config_digest(self) -> str:
        return sha256(self.config)

    @property
    def manifest_digest(self) -> str:
        return sha256(self.manifest)

    @property
    def diff_ids(self) -> list[str]:
        return [la.diff_id for la in self.layers]

    @property
    def chain_ids(self) -> list[str]:
        return chain_ids(self.diff_ids)

    def blobs(self) -> dict[str, bytes]:
        out = {la.digest: la.data for la in self.layers}
        out[self.config_digest] = self.config
        out[self.manifest_digest] = self.manifest
        out.update(self.extra_blobs)
        return out


def make_config(
    diff_ids: Sequence[str], *, arch: str | None = None, created: str = "2024-01-02T03:04:05Z"
) -> bytes:
    doc = {
        "architecture": arch or host_platform().architecture,
        "os": "linux",
        "created": created,
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": created, "created_by": f"test layer {i}"} for i in range(len(diff_ids))],
    }
    return json.dumps(doc, indent=2).encode()


def make_image(layers: Sequence[LayerBlob], **config_kw: Any) -> TestImage:
    config = make_config([la.diff_id for la in layers], **config_kw)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [la.descriptor() for la in layers],
        },
        indent=1,
    ).encode()
    return TestImage(list(layers), config, manifest)


def base_tar(scratch: Path) -> bytes:
    """Layer 1: the sample tree (every kind of entry), packed by GNU tar."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="base-tree-", dir=scratch))
    os.chmod(root, 0o755)
    make_sample_tree(root)
    return gnu_tar(root)


def change_tar(*, keep_dir_xattrs: bool = True) -> bytes:
    """Layer 2: modifications, a whiteout, an opaque directory, new files and a hard link.

    ``/data`` is declared again (it is made opaque); with ``keep_dir_xattrs`` its entry carries
    the xattr the base layer gave it, so that applying onto a flat tree (which keeps a
    directory's old xattrs) and stacking layers (where the upper directory's xattrs are the
    ones seen, as umoci also gives) agree.
    """
    data_xattrs = {"user.dir-note": b"\x00binary\xff"} if keep_dir_xattrs else None
    return (
        TarBuilder()
        .dir("etc", mode=0o755, mtime=T0)
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/sh\n",
            mode=0o644,
            mtime=T0,
        )
        .whiteout("etc/write-only")
        .dir("data", mode=0o750, mtime=T0, xattrs=data_xattrs)
        .opaque("data")
        .file("data/fresh", b"replaces the old content\n", mode=0o600, uid=1000, gid=1000, mtime=T0)
        .dir("opt", mode=0o755, mtime=T0)
        .dir("opt/app", mode=0o755, mtime=T0)
        .file("opt/app/run", b"#!/bin/sh\nexec app\n", mode=0o755, mtime=T0)
        .hardlink("opt/app/run-again", "opt/app/run")
        .symlink("opt/current", "app", mtime=T0)
        .build()
    )


def small_tar(scratch: Path, text: bytes = b"layer three\n") -> bytes:
    """Layer 3: a small tree packed by the library's exporter."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="small-tree-", dir=scratch))
    os.chmod(root, 0o755)
    (root / "srv").mkdir(mode=0o755)
    (root / "srv/hello.txt").write_bytes(text)
    os.utime(root / "srv/hello.txt", ns=(T0 * 10**9 + 5, T0 * 10**9 + 5))
    os.utime(root / "srv", ns=(T0 * 10**9, T0 * 10**9))
    os.utime(root, ns=(T0 * 10**9, T0 * 10**9))
    return library_tar(root)


def standard_image(
    scratch: Path, compressions: Sequence[str] = ("gzip", "zstd", "none"), *, keep_dir_xattrs: bool = True
) -> TestImage:
    """The three-layer test image, each layer with its own compression."""
    tars = [base_tar(scratch), change_tar(keep_dir_xattrs=keep_dir_xattrs), small_tar(scratch)]
    return make_image([layer(t, c) for t, c in zip(tars, compressions, strict=True)])


# -- writing sources -----------------------------------------------------------------------------


def write_layout(
    path: Path,
    entries: Sequence[tuple[TestImage, dict[str, Any]]],
    *,
    index_extra: dict[str, Any] | None = None,
) -> Path:
    """An OCI layout with ``entries``: (image, extra fields of its index descriptor)."""
    (path / "blobs" / "sha256").mkdir(parents=True)
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    manifests = []
    for image, extra in entries:
        for digest, data in image.blobs().items():
            (path / "blobs" / "sha256" / digest.partition(":")[2]).write_bytes(data)
        desc = {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": image.manifest_digest,
            "size": len(image.manifest),
            **extra,
        }
        manifests.append(desc)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }
    index.update(index_extra or {})
    (path / "index.json").write_text(json.dumps(index, indent=2))
    return path


def ref(name: str) -> dict[str, Any]:
    return {"annotations": {"org.opencontainers.image.ref.name": name}}


def tar_dir(src: Path, dest: Path, *members: str) -> Path:
    """GNU tar of ``src``'s ``members`` (default: everything), as image tools write archives."""
    subprocess.run(
        [
            "tar",
            "--format=pax",
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-C",
            str(src),
            "-cf",
            str(dest),
            *(members or (".",)),
        ],
        check=True,
    )
    return dest


def write_oci_archive(scratch: Path, image: TestImage, dest: Path, ref_name: str = "latest") -> Path:
    layout = write_layout(scratch / f"layout-for-{dest.name}", [(image, ref(ref_name))])
    return tar_dir(layout, dest, "oci-layout", "index.json", "blobs")


def write_docker_archive(
    scratch: Path,
    image: TestImage,
    dest: Path,
    tags: Sequence[str] = ("docker.io/library/test:1",),
    *,
    form: str = "legacy",
) -> Path:
    """A ``docker save`` archive: ``legacy`` (``<id>/layer.tar``, uncompressed) or ``oci``
    (Docker 25+: blobs/sha256 plus manifest.json)."""
    work = scratch / f"docker-{dest.name}"
    work.mkdir()
    chain = image.chain_ids
    if form == "legacy":
        paths = []
        parent = None
        for la, c in zip(image.layers, chain, strict=True):
            v1 = c.partition(":")[2]
            (work / v1).mkdir()
            (work / v1 / "layer.tar").write_bytes(la.tar)
            (work / v1 / "VERSION").write_text("1.0")
            (work / v1 / "json").write_text(json.dumps({"id": v1, **({"parent": parent} if parent else {})}))
            paths.append(f"{v1}/layer.tar")
            parent = v1
        config_name = image.config_digest.partition(":")[2] + ".json"
        (work / config_name).write_bytes(image.config)
        (work / "repositories").write_text(
            json.dumps({t.rpartition(":")[0]: {t.rpartition(":")[2]: parent} for t in tags})
        )
    else:
        blobs = work / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        paths = []
        for la in image.layers:
            (blobs / la.diff_id.partition(":")[2]).write_bytes(la.tar)
            paths.append("blobs/sha256/" + la.diff_id.partition(":")[2])
        (blobs / image.config_digest.partition(":")[2]).write_bytes(image.config)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": image.config_digest,
                    "size": len(image.config),
                },
                "layers": [
                    {"mediaType": MEDIA["none"], "digest": la.diff_id, "size": len(la.tar)}
                    for la in image.layers
                ],
            }
        ).encode()
        (blobs / sha256(manifest).partition(":")[2]).write_bytes(manifest)
        (work / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        (work / "index.json").write_text(
            json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": [
                        {
                            "mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "digest": sha256(manifest),
                            "size": len(manifest),
                            "annotations": {
                                "io.containerd.image.name": tags[0],
                                "org.opencontainers.image.ref.name": tags[0].rpartition(":")[2],
                            },
                        }
                    ],
                }
            )
        )
        config_name = "blobs/sha256/" + image.config_digest.partition(":")[2]
    (work / "manifest.json").write_text(
        json.dumps([{"Config": config_name, "RepoTags": list(tags), "Layers": paths}])
    )
    return tar_dir(work, dest)


def skopeo() -> str:
    path = shutil.which("skopeo")
    if path is None:
        pytest.skip("skopeo is not installed")
    return path


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def leftovers(images: ImageStore) -> dict[str, Any]:
    """Everything the store holds, to compare before and after a failed import."""
    from graphdriver.layers.check import driver_layer_ids

    store = images.layers
    with store.db.read() as txn:
        rows = {
            t: txn.conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("layers", "names", "images", "image_names", "image_manifests", "containers", "leases")
        }
    return {
        "layers": sorted(la.id for la in store.layers()),
        "rows": rows,
        "staging": sorted(os.listdir(store.staging_root)),
        "tarsplit": sorted(os.listdir(store.tarsplit_root)),
        "driver": driver_layer_ids(store),
    }


class Kit:
    """The helpers above, for test modules."""

    T0 = T0
    LayerBlob = LayerBlob
    TestImage = TestImage
    layer = staticmethod(layer)
    sha256 = staticmethod(sha256)
    make_config = staticmethod(make_config)
    make_image = staticmethod(make_image)
    gnu_tar = staticmethod(gnu_tar)
    library_tar = staticmethod(library_tar)
    base_tar = staticmethod(base_tar)
    change_tar = staticmethod(change_tar)
    small_tar = staticmethod(small_tar)
    standard_image = staticmethod(standard_image)
    write_layout = staticmethod(write_layout)
    ref = staticmethod(ref)
    tar_dir = staticmethod(tar_dir)
    write_oci_archive = staticmethod(write_oci_archive)
    write_docker_archive = staticmethod(write_docker_archive)
    skopeo = staticmethod(skopeo)
    run = staticmethod(run)
    leftovers = staticmethod(leftovers)
    release_mounts = staticmethod(release_mounts)
    driver_unsupported = staticmethod(driver_unsupported)


@pytest.fixture
def ikit() -> Kit:
    return Kit()
