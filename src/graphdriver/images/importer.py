"""Import an image from an OCI layout directory, an oci-archive or a docker-archive.

Sources (``source`` argument; the prefixes are skopeo's transports)::

    DIR                          an OCI layout directory (it has an oci-layout file)
    FILE                         an archive: docker-archive if it has manifest.json, else
                                 oci-archive (Docker 25+ archives have both: read as docker-archive)
    oci:DIR[:REF]                REF: a ref name in index.json, or a manifest digest
    oci-archive:FILE[:REF]
    docker-archive:FILE[:NAME:TAG | :@N]

Steps, each a clean stop on failure:

1. Find the image (:func:`~graphdriver.images.ocilayout.resolve_layout`,
   :func:`~graphdriver.images.archives.resolve_docker_archive`): the manifest and config are
   read whole, checked against their descriptors' digest and size, and parsed strictly; the config
   must list one diff ID per layer. Nothing is stored yet.
2. Take a lease on the image's chain IDs (:meth:`ImageStore.lease`), so that no ``rmi`` or
   ``prune`` removes a layer this import reuses.
3. Import each layer that the store does not have yet, bottom first, with
   :meth:`LayerStore.import_layer`: the blob's size is checked against its descriptor before it is
   read, and the store checks the blob digest, the size and the diff ID from the config over the
   whole stream. Layers the store has already (same chain ID) are not read at all.
   From an OCI layout directory, on a driver that applies each layer into its own directory
   (overlay2, fuse-overlayfs), the missing layers are applied at the same time instead, each in a
   forked worker (:meth:`LayerStore.import_layers`), when that pays: at least two of them are
   big (:data:`PARALLEL_MIN_BLOB`); a fork per tiny layer costs more than it saves.
4. Record the image (id = config digest), its manifest and names, in one transaction, while the
   lease still holds the layers.

On any failure the lease is dropped and the layers this import created are removed again unless
another image, container or import uses them: the store is left as it was. A process killed half
way leaves a stale lease; the next :meth:`ImageStore.open` removes what it claimed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from graphdriver.archive.types import Limits
from graphdriver.errors import DigestMismatch, InvalidArgument, NotFound
from graphdriver.images.archives import TarFiles, resolve_docker_archive
from graphdriver.images.manifests import (
    MT_OCI_CONFIG,
    MT_OCI_LAYER,
    MT_OCI_MANIFEST,
    Platform,
    canonical_json,
)
from graphdriver.images.ocilayout import LAYOUT_FILE, DirFiles, resolve_layout
from graphdriver.images.records import ImageTxn
from graphdriver.images.references import parse_reference
from graphdriver.images.sources import Files, ResolvedImage, sha256_digest
from graphdriver.layers.digests import chain_ids

if TYPE_CHECKING:
    from graphdriver.images.imagestore import Image, ImageStore
    from graphdriver.layers.store import LayerStore

__all__ = [
    "FORMATS",
    "PARALLEL_MIN_BLOB",
    "ImportProgress",
    "import_image",
    "parse_source",
    "record_image",
    "synthesized_manifest",
]

FORMATS = ("oci", "oci-archive", "docker-archive")

PARALLEL_MIN_BLOB = 4 << 20
"""blobs of at least this size count as big: with two or more, layers are applied in parallel"""


@dataclass
class ImportProgress:
    """Bytes of layer blobs read so far, of ``total`` (to poll from another thread)."""

    total: int = 0
    done: int = 0
    layers_total: int = 0
    layers_done: int = 0
    skipped: list[str] = field(default_factory=list)
    """diff IDs of layers the store had already"""

    def poll(self) -> tuple[int, int | None]:
        return self.done, self.total or None


class _Counting:
    """Counts what is read through it into an :class:`ImportProgress`."""

    def __init__(self, raw: BinaryIO, progress: ImportProgress) -> None:
        self._raw = raw
        self._progress = progress

    def readinto(self, buf: Any) -> int:
        n = int(self._raw.readinto(buf) or 0)  # type: ignore[attr-defined]
        self._progress.done += n
        return n

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._progress.done += len(data)
        return data

    def readable(self) -> bool:
        return True


def parse_source(source: str | Path, fmt: str | None = None) -> tuple[str, Path, str | None]:
    """``(format, path, ref)`` of a source string (see the module docstring). The format is
    ``"archive"`` for a file whose kind is known only once it has been read."""
    if fmt is not None and fmt not in FORMATS:
        raise InvalidArgument(f"unknown image format {fmt!r} (use {', '.join(FORMATS)})")
    text = str(source)
    ref: str | None = None
    for prefix in FORMATS:
        if text.startswith(prefix + ":") and not os.path.exists(text):
            if fmt is not None and fmt != prefix:
                raise InvalidArgument(f"source {text!r} says {prefix}, but the format given is {fmt}")
            fmt = prefix
            text, sep, rest = text[len(prefix) + 1 :].partition(":")
            ref = rest if sep and rest else None
            break
    if not text:
        raise InvalidArgument("empty image source")
    path = Path(text)
    if fmt is None:
        if path.is_dir():
            fmt = "oci"
        elif path.exists():
            fmt = "archive"
        else:
            raise NotFound(f"{text}: no such file or directory")
    return fmt, path, ref


@contextmanager
def _open_source(
    fmt: str, path: Path, ref: str | None, platform: Platform | None, spool: Path
) -> Iterator[tuple[Files, ResolvedImage]]:
    if fmt == "oci":
        with DirFiles(path) as files:
            yield files, resolve_layout(files, ref=ref, platform=platform)
        return
    tar = TarFiles(path, spool)
    if fmt == "archive":
        if tar.has("manifest.json"):
            fmt = "docker-archive"
        elif tar.has(LAYOUT_FILE):
            fmt = "oci-archive"
        else:
            from graphdriver.errors import InvalidArchive

            raise InvalidArchive(
                f"{path}: neither a docker-archive (manifest.json) nor an oci-archive (oci-layout)"
            )
    if fmt == "docker-archive":
        yield tar, resolve_docker_archive(tar, ref=ref)
    else:
        yield tar, resolve_layout(tar, ref=ref, platform=platform)


def synthesized_manifest(config: bytes, layers: Sequence[tuple[str, int]]) -> bytes:
    """The OCI manifest of an image whose layers are given as uncompressed tars
    ``(diff ID, size)``: what an uncompressed export writes, so its digest is stable."""
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": MT_OCI_CONFIG, "digest": sha256_digest(config), "size": len(config)},
            "layers": [{"mediaType": MT_OCI_LAYER, "digest": d, "size": s} for d, s in layers],
        }
    )


def import_image(
    images: ImageStore,
    source: str | Path,
    *,
    format: str | None = None,
    ref: str | None = None,
    platform: Platform | str | None = None,
    names: Sequence[str] = (),
    limits: Limits | None = None,
    progress: ImportProgress | None = None,
    parallel_apply: bool | None = None,
) -> Image:
    """Import the image at ``source`` (see the module docstring) and return it.

    ``ref`` picks an image of a layout or archive that holds several (overrides a ``:REF`` in
    ``source``); ``platform`` (``"linux/arm64"``) picks among the manifests of an index (default:
    this machine's); ``names`` replace the names the source gives (``docker.io/x:tag`` form,
    normalised). ``limits`` bound each layer (:class:`~graphdriver.archive.types.Limits`).
    ``parallel_apply``: apply the missing layers of an OCI layout directory at the same time
    (:meth:`LayerStore.import_layers`); None: where the driver can and two or more layers are big
    (:data:`PARALLEL_MIN_BLOB`); False: one after the other.
    """
    fmt, path, source_ref = parse_source(source, format)
    want_platform = Platform.parse(platform) if isinstance(platform, str) else platform
    new_names = [str(parse_reference(n)) for n in names]
    for n in new_names:
        if "@" in n:
            raise InvalidArgument(f"an image name cannot hold a digest: {n}")
    progress = progress or ImportProgress()
    store = images.layers
    with (
        store.staging() as spool,
        _open_source(fmt, path, ref if ref is not None else source_ref, want_platform, spool) as (
            files,
            image,
        ),
    ):
        chain = chain_ids(image.config.diff_ids)
        created: list[str] = []
        try:
            with images.lease(chain):
                top = _import_layers(
                    images, files, image=image, chain=chain, created=created, limits=limits,
                    progress=progress, parallel_apply=parallel_apply,
                )
                return record_image(images, image, top, new_names or list(image.names))
        except BaseException:
            if created:
                try:
                    images.collect(created)
                except Exception:
                    pass  # whatever is left is garbage for prune / check
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def _import_layers(
    images: ImageStore,
    files: Files,
    *,
    image: ResolvedImage,
    chain: list[str],
    created: list[str],
    limits: Limits | None,
    progress: ImportProgress,
    parallel_apply: bool | None = None,
) -> str | None:
    store = images.layers
    have: dict[int, str] = {}
    for i, c in enumerate(chain):
        existing = store.by_chain_id(c)
        if existing is not None:
            have[i] = existing.id
    todo = [i for i in range(len(chain)) if i not in have]
    sizes: dict[int, int] = {}
    for i in todo:
        spec = image.layers[i]
        actual = files.size(spec.name)
        if spec.size is not None and actual != spec.size:
            raise DigestMismatch(
                f"{files.label}: layer blob {spec.digest or spec.name} is {actual} bytes, its descriptor"
                f" says {spec.size}" + (" (truncated)" if actual < spec.size else "")
            )
        sizes[i] = actual
    progress.total = sum(sizes.values())
    progress.layers_total = len(chain)
    progress.layers_done = len(have)
    progress.skipped = [image.config.diff_ids[i] for i in sorted(have)]
    on_top = bool(todo) and sorted(have) == list(range(todo[0]))  # the missing layers: the top of the stack
    if (
        on_top
        and isinstance(files, DirFiles)
        and _worth_parallel(store, [sizes[i] for i in todo], parallel_apply)
    ):
        return _import_stack(
            store, files, image=image, todo=todo, have=have, sizes=sizes, created=created, limits=limits,
            progress=progress,
        )
    parent: str | None = None
    streams = files.open_in_order([image.layers[i].name for i in todo])
    try:
        for i in range(len(chain)):
            if i in have:
                parent = have[i]
                continue
            k, stream = next(streams)
            assert todo[k] == i
            spec = image.layers[i]
            layer = store.import_layer(
                cast(BinaryIO, _Counting(stream, progress)),
                parent,
                expected_diff_id=image.config.diff_ids[i],
                expected_digest=spec.digest,
                expected_size=sizes[i],
                limits=limits,
            )
            if layer.chain_id != chain[i]:  # pragma: no cover - the store checks the diff ID
                raise DigestMismatch(f"layer {layer.id} has chain ID {layer.chain_id}, expected {chain[i]}")
            created.append(layer.id)
            progress.layers_done += 1
            parent = layer.id
    finally:
        streams.close()
    return parent


def _worth_parallel(store: LayerStore, sizes: Sequence[int], wanted: bool | None) -> bool:
    if wanted is False or len(sizes) < 2 or not callable(getattr(store.driver, "applies_alone", None)):
        return False
    return bool(wanted) or sum(1 for s in sizes if s >= PARALLEL_MIN_BLOB) >= 2


def _import_stack(
    store: LayerStore,
    files: DirFiles,
    *,
    image: ResolvedImage,
    todo: Sequence[int],
    have: dict[int, str],
    sizes: dict[int, int],
    created: list[str],
    limits: Limits | None,
    progress: ImportProgress,
) -> str | None:
    """The missing layers ``todo`` (the top of the stack) through :meth:`LayerStore.import_layers`."""
    from graphdriver.layers.store import LayerBlob

    parent = have[todo[0] - 1] if todo[0] else None

    def event(k: int, what: str) -> None:
        if what == "applied":
            progress.done += sizes[todo[k]]
            progress.layers_done += 1

    with ExitStack() as stack:
        blobs = []
        for i in todo:
            spec = image.layers[i]
            blob = stack.enter_context(files.open(spec.name))
            blobs.append(LayerBlob(blob, image.config.diff_ids[i], spec.digest, sizes[i]))
        layers = store.import_layers(blobs, parent, limits=limits, on_event=event)
    created.extend(la.id for la in layers)
    return layers[-1].id


def record_image(images: ImageStore, image: ResolvedImage, top: str | None, names: list[str]) -> Image:
    """Record ``image`` with top layer ``top`` (its manifest, or one synthesized when the source
    had none) and give it ``names``, in one transaction; the caller holds a lease on its layers."""
    store = images.layers
    manifest = image.manifest
    digest = image.manifest_digest
    media_type = image.manifest_media_type
    if manifest is None:
        with store.db.read() as txn:
            sizes = []
            cur = top
            while cur is not None:
                layer = txn.get(cur)
                assert layer is not None
                sizes.append((str(layer.diff_id), int(layer.uncompressed_size or 0)))
                cur = layer.parent
        manifest = synthesized_manifest(image.config.raw, list(reversed(sizes)))
        digest, media_type = sha256_digest(manifest), MT_OCI_MANIFEST
    assert digest is not None and media_type is not None
    with store.write() as txn:
        itx = ImageTxn(txn)
        itx.insert_image(image.config_digest, top, image.config.raw)
        itx.add_manifest(image.config_digest, digest, media_type, manifest)
        itx.set_names(image.config_digest, names)
    return images.get(image.config_digest)
