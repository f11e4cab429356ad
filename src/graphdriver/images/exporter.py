"""Export an image to an OCI layout directory, an oci-archive or a docker-archive.

Each layer is written from :meth:`LayerStore.original_tar`: the exact tar the layer was imported
from, rebuilt from its tar-split and verified against its diff ID as it is read, so an exported
image has the same diff IDs, the same config (byte for byte: the same image id) and the same
chain IDs as the imported one. Layers are written uncompressed (their blob digest is then the
diff ID) or gzip-compressed (deterministic: no name, mtime 0), so the same image exported twice
gives the same bytes.

Formats::

    oci             a directory: oci-layout, index.json, blobs/sha256/<hex>; index.json names the
                    manifest with org.opencontainers.image.ref.name (the tag) and
                    io.containerd.image.name (the full name), as Docker 25+ does
    oci-archive     the same layout as a tar
    docker-archive  docker_form="legacy" (default, what every docker load and skopeo read):
                    manifest.json, <config-hex>.json, <chain-hex>/layer.tar (+ json, VERSION),
                    repositories; docker_form="oci": the Docker 25+ form, an oci-archive with a
                    manifest.json whose Config and Layers name blobs/sha256/<hex>

The destination appears complete or not at all: a directory is written under a temporary name
beside it and renamed; an archive is written to a temporary file, synced, and renamed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from graphdriver.errors import AlreadyExists, InvalidArgument, NotFound
from graphdriver.images.archives import TarSink
from graphdriver.images.manifests import (
    ANNOTATION_IMAGE_NAME,
    ANNOTATION_REF_NAME,
    MT_OCI_CONFIG,
    MT_OCI_INDEX,
    MT_OCI_LAYER,
    MT_OCI_LAYER_GZIP,
    MT_OCI_MANIFEST,
    canonical_json,
)
from graphdriver.images.ocilayout import LAYOUT_FILE, LAYOUT_VERSION, LayoutDirSink
from graphdriver.images.references import parse_reference, try_parse_reference

if TYPE_CHECKING:
    from graphdriver.images.imagestore import Image, ImageStore

__all__ = ["COMPRESSIONS", "EXPORT_FORMATS", "ExportProgress", "ExportResult", "export_image"]

EXPORT_FORMATS = ("oci", "oci-archive", "docker-archive")
COMPRESSIONS = ("none", "gzip")
_CHUNK = 1 << 20


class _Sink(Protocol):
    def blob(self, data: bytes) -> tuple[str, int]: ...

    def blob_stream(
        self, fill: Callable[[BinaryIO], None], known: tuple[str, int] | None = None
    ) -> tuple[str, int]: ...

    def finish(self) -> None: ...


@dataclass
class ExportProgress:
    """Uncompressed layer bytes written so far, of ``total``."""

    total: int = 0
    done: int = 0

    def poll(self) -> tuple[int, int | None]:
        return self.done, self.total or None


@dataclass
class ExportResult:
    dest: str
    format: str
    compression: str
    image: str
    manifest_digest: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    """per layer: digest and size of the blob written, its diff ID"""
    names: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "dest": self.dest,
            "format": self.format,
            "compression": self.compression,
            "image": self.image,
            "manifest_digest": self.manifest_digest,
            "layers": self.layers,
            "names": self.names,
        }


def _copy(src: BinaryIO, dst: BinaryIO, progress: ExportProgress) -> None:
    while chunk := src.read(_CHUNK):
        dst.write(chunk)
        progress.done += len(chunk)


def _layer_filler(
    images: ImageStore, layer_id: str, compression: str, progress: ExportProgress
) -> Callable[[BinaryIO], None]:
    def fill(out: BinaryIO) -> None:
        with images.layers.original_tar(layer_id) as tar:
            if compression == "none":
                _copy(tar, out, progress)
            else:
                from graphdriver.archive.compression import open_compressed

                with open_compressed(out, compression) as packed:
                    _copy(tar, packed, progress)

    return fill


@dataclass
class _Job:
    """One export: the image, how to write its layers, the names to give it."""

    images: ImageStore
    image: Image
    compression: str
    names: list[str]
    progress: ExportProgress


def _write_layers(job: _Job, sink: _Sink) -> list[dict[str, Any]]:
    images, image, compression, progress = job.images, job.image, job.compression, job.progress
    out = []
    with images.layers.db.read() as txn:
        records = [txn.get(lid) for lid in image.layers]
    for layer in records:
        assert layer is not None
        if layer.diff_id is None:
            raise NotFound(f"layer {layer.id} of image {image.id} has no diff ID (not an image layer)")
        known = None
        if compression == "none" and layer.uncompressed_size is not None:
            known = (layer.diff_id, layer.uncompressed_size)
        digest, size = sink.blob_stream(_layer_filler(images, layer.id, compression, progress), known)
        out.append(
            {
                "mediaType": MT_OCI_LAYER if compression == "none" else MT_OCI_LAYER_GZIP,
                "digest": digest,
                "size": size,
                "diff_id": layer.diff_id,
            }
        )
    return out


def _manifest(config_digest: str, config_size: int, layers: Sequence[dict[str, Any]]) -> bytes:
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": MT_OCI_CONFIG, "digest": config_digest, "size": config_size},
            "layers": [{k: v for k, v in la.items() if k != "diff_id"} for la in layers],
        }
    )


def _index(manifest_digest: str, manifest_size: int, name: str | None) -> bytes:
    desc: dict[str, Any] = {"mediaType": MT_OCI_MANIFEST, "digest": manifest_digest, "size": manifest_size}
    if name is not None:
        ref = parse_reference(name)
        desc["annotations"] = {ANNOTATION_IMAGE_NAME: str(ref), ANNOTATION_REF_NAME: ref.tag or "latest"}
    return canonical_json({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": [desc]})


def _write_oci(job: _Job, sink: _Sink) -> tuple[str, list[dict[str, Any]], bytes]:
    layers = _write_layers(job, sink)
    config_digest, config_size = sink.blob(job.image.config)
    assert config_digest == job.image.id
    manifest = _manifest(config_digest, config_size, layers)
    manifest_digest, manifest_size = sink.blob(manifest)
    name = job.names[0] if job.names else None
    return manifest_digest, layers, _index(manifest_digest, manifest_size, name)


def _docker_manifest(config: str, layers: Sequence[str], names: Sequence[str]) -> bytes:
    return canonical_json([{"Config": config, "Layers": list(layers), "RepoTags": list(names) or None}])


def _repositories(names: Sequence[str], top: str) -> bytes | None:
    repos: dict[str, dict[str, str]] = {}
    for n in names:
        ref = parse_reference(n)
        if ref.tag is not None:
            repos.setdefault(ref.name, {})[ref.tag] = top
    return canonical_json(repos) if repos else None


def _write_docker_legacy(job: _Job, sink: TarSink) -> tuple[str, list[dict[str, Any]]]:
    images, image, compression, progress, names = (
        job.images,
        job.image,
        job.compression,
        job.progress,
        job.names,
    )
    chain = images.chain_of(image)
    config_hex = image.id.partition(":")[2]
    layer_paths: list[str] = []
    out: list[dict[str, Any]] = []
    with images.layers.db.read() as txn:
        records = [txn.get(lid) for lid in image.layers]
    parent_v1: str | None = None
    for layer, chain_id in zip(records, chain, strict=True):
        assert layer is not None and layer.diff_id is not None
        v1 = chain_id.partition(":")[2]
        known = None
        if compression == "none" and layer.uncompressed_size is not None:
            known = (layer.diff_id, layer.uncompressed_size)
        sink.file(f"{v1}/VERSION", b"1.0")
        v1json: dict[str, Any] = {"id": v1}
        if parent_v1 is not None:
            v1json["parent"] = parent_v1
        sink.file(f"{v1}/json", canonical_json(v1json))
        digest, size = sink.member_stream(
            f"{v1}/layer.tar", _layer_filler(images, layer.id, compression, progress), known
        )
        layer_paths.append(f"{v1}/layer.tar")
        out.append(
            {
                "mediaType": MT_OCI_LAYER if compression == "none" else MT_OCI_LAYER_GZIP,
                "digest": digest,
                "size": size,
                "diff_id": layer.diff_id,
            }
        )
        parent_v1 = v1
    sink.file(f"{config_hex}.json", image.config)
    sink.file("manifest.json", _docker_manifest(f"{config_hex}.json", layer_paths, names))
    repos = _repositories(names, parent_v1 or config_hex)
    if repos is not None:
        sink.file("repositories", repos)
    manifest = _manifest(image.id, len(image.config), out)
    from graphdriver.images.sources import sha256_digest

    return sha256_digest(manifest), out


def _names_for(image: Image, ref: str) -> list[str]:
    parsed = try_parse_reference(ref)
    if parsed is not None and parsed.digest is None and str(parsed) in image.names:
        return [str(parsed)]
    return list(image.names)


def export_image(
    images: ImageStore,
    ref: str,
    dest: str | Path,
    *,
    format: str = "oci",
    compression: str | None = None,
    docker_form: str = "legacy",
    progress: ExportProgress | None = None,
) -> ExportResult:
    """Write image ``ref`` to ``dest`` as ``format`` (see the module docstring).

    ``compression``: ``none`` or ``gzip`` (default: gzip for oci and oci-archive, none for
    docker-archive, as ``docker save`` writes). ``dest`` must not exist (an empty directory is
    accepted for ``oci``).
    """
    if format not in EXPORT_FORMATS:
        raise InvalidArgument(f"unknown export format {format!r} (use {', '.join(EXPORT_FORMATS)})")
    if compression is None:
        compression = "none" if format == "docker-archive" else "gzip"
    if compression not in COMPRESSIONS:
        raise InvalidArgument(f"unknown layer compression {compression!r} (use {', '.join(COMPRESSIONS)})")
    if docker_form not in ("legacy", "oci"):
        raise InvalidArgument(f"unknown docker-archive form {docker_form!r} (use legacy or oci)")
    image = images.get(ref)
    names = _names_for(image, ref)
    progress = progress or ExportProgress()
    with images.layers.db.read() as txn:
        progress.total = sum(int(getattr(txn.get(lid), "uncompressed_size", 0) or 0) for lid in image.layers)
    target = Path(os.path.abspath(dest))
    if not target.parent.is_dir():
        raise NotFound(f"{dest}: directory {target.parent} does not exist")
    result = ExportResult(str(dest), format, compression, image.id, "", names=names)
    job = _Job(images, image, compression, names, progress)
    with images.lease(image.layers):  # an rmi meanwhile leaves the layers until we are done
        if format == "oci":
            result.manifest_digest, result.layers = _export_dir(job, target)
        else:
            result.manifest_digest, result.layers = _export_archive(job, target, format, docker_form)
    return result


def _export_dir(job: _Job, target: Path) -> tuple[str, list[dict[str, Any]]]:
    from graphdriver.fs.remove import remove_tree

    if target.exists() and not (target.is_dir() and not target.is_symlink() and not any(target.iterdir())):
        raise AlreadyExists(f"{target} exists (give a new path or an empty directory)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)
        sink = LayoutDirSink(tmp)
        digest, layers, index = _write_oci(job, sink)
        sink.file(LAYOUT_FILE, canonical_json({"imageLayoutVersion": LAYOUT_VERSION}))
        sink.file("index.json", index)
        sink.finish()
        if target.exists():
            target.rmdir()
        os.rename(tmp, target)
    except BaseException:
        remove_tree(tmp)
        raise
    return digest, layers


def _export_archive(job: _Job, target: Path, fmt: str, docker_form: str) -> tuple[str, list[dict[str, Any]]]:
    if target.is_dir():
        raise AlreadyExists(f"{target} is a directory")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w+b") as out:
            sink = TarSink(out)
            if fmt == "docker-archive" and docker_form == "legacy":
                digest, layers = _write_docker_legacy(job, sink)
            else:
                digest, layers, index = _write_oci(job, sink)
                sink.file(LAYOUT_FILE, canonical_json({"imageLayoutVersion": LAYOUT_VERSION}))
                sink.file("index.json", index)
                if fmt == "docker-archive":
                    image_hex = job.image.id.partition(":")[2]
                    paths = ["blobs/sha256/" + la["digest"].partition(":")[2] for la in layers]
                    sink.file(
                        "manifest.json", _docker_manifest(f"blobs/sha256/{image_hex}", paths, job.names)
                    )
                    repos = _repositories(job.names, image_hex)
                    if repos is not None:
                        sink.file("repositories", repos)
            sink.finish()
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return digest, layers
