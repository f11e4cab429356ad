"""Push an image from the layer store to a registry.

For each layer, in parallel (bounded), the first of these that works:

1. **A blob the registry already has.** Blobs known to hold the layer's tar (its diff ID) are
   the one it was imported from (the store's ``compressed_digest``) and those the blob cache
   (:mod:`graphdriver.registry.blobcache`) saw in earlier pulls and pushes. ``HEAD`` each one in
   the target repository: present means nothing is sent.
2. **A cross-repository mount** of such a blob from another repository of the same registry
   where the cache saw it, or from ``PushOptions.mount_from`` (``POST ?mount=&from=``).
3. **An upload** of the layer's original tar (:meth:`LayerStore.original_tar`, the exact bytes
   it was imported from, checked against the diff ID as it is read), compressed with
   ``PushOptions.compression`` into a staging file:

   - ``gzip`` (the default; ``application/vnd.oci.image.layer.v1.tar+gzip``): level 6, mtime 0,
     no file name, so one layer always gives the same blob with the same zlib: pushing it again,
     to any registry, finds the same digest;
   - ``none`` (``...tar``): the blob is the tar itself; its digest is the diff ID, known before
     anything is read, so the ``HEAD`` comes first;
   - ``zstd`` (``...tar+zstd``).

   gzip and none are what every registry and client reads: ``skopeo copy docker://... oci:DIR``
   keeps the gzip blobs byte for byte (and gzips uncompressed ones itself for an ``oci:``
   destination). The blob is then ``HEAD``-checked (and mounted when the cache knows it
   elsewhere) and otherwise uploaded: in one ``PUT`` up to ``monolithic_limit`` bytes, in
   ``PATCH`` chunks beyond.

Then the config (its exact bytes: the image ID does not change) and an OCI image manifest, put
under the reference's tag (or its digest, which must then be the manifest's).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import httpx

from graphdriver.errors import GraphDriverError, InvalidArgument
from graphdriver.images.manifests import LAYER_TYPES, MT_OCI_CONFIG, MT_OCI_LAYER, MT_OCI_MANIFEST, Descriptor
from graphdriver.registry.blobcache import BlobCache
from graphdriver.registry.client import CHUNK_SIZE, MONOLITHIC_LIMIT, RegistryClient, RetryPolicy
from graphdriver.registry.manifests import COMPRESSION_LAYER_TYPE, build_manifest, oci_layer_type
from graphdriver.registry.progress import Event, Sink, Throttle, null_sink
from graphdriver.registry.reference import Reference, api_host, parse_reference

if TYPE_CHECKING:
    from graphdriver.images.imagestore import ImageStore
    from graphdriver.layers.metadata import Layer
    from graphdriver.layers.store import LayerStore

__all__ = ["BlobPush", "PushOptions", "PushResult", "push", "push_image"]

_COPY = 1 << 20


@dataclass(frozen=True)
class PushOptions:
    insecure: bool = False
    compression: str = "gzip"
    """how layers are uploaded when the registry has no blob of them: gzip, none or zstd"""
    parallel: int = 3
    mount_from: tuple[str, ...] = ()
    """more repositories of the target registry to try mounting blobs from"""
    monolithic_limit: int = MONOLITHIC_LIMIT
    chunk_size: int = CHUNK_SIZE
    retry: RetryPolicy | None = None
    timeout: httpx.Timeout | float | None = None
    auth_file: str | None = None


@dataclass(frozen=True)
class BlobPush:
    """What happened to one blob: ``exists``, ``mounted`` (with ``source``) or ``uploaded``."""

    descriptor: Descriptor
    action: str
    source: str | None = None


@dataclass(frozen=True)
class PushResult:
    reference: Reference
    digest: str
    manifest: bytes
    config: BlobPush
    layers: tuple[BlobPush, ...]

    def to_json(self) -> dict[str, Any]:
        def blob(b: BlobPush) -> dict[str, Any]:
            out = {"digest": b.descriptor.digest, "size": b.descriptor.size,
                   "media_type": b.descriptor.media_type, "action": b.action}
            if b.source:
                out["from"] = b.source
            return out

        return {
            "reference": str(self.reference),
            "digest": self.digest,
            "config": blob(self.config),
            "layers": [blob(b) for b in self.layers],
        }


class _Pusher:
    def __init__(
        self,
        store: LayerStore,
        *,
        client: RegistryClient,
        ref: Reference,
        opts: PushOptions,
        cache: BlobCache,
        sink: Sink,
    ) -> None:
        self.store = store
        self.client = client
        self.ref = ref
        self.repo = ref.path
        self.opts = opts
        self.cache = cache
        self.sink = sink
        if opts.compression not in COMPRESSION_LAYER_TYPE:
            raise InvalidArgument(f"unknown layer compression {opts.compression!r} (gzip, none, zstd)")

    # -- finding a blob the registry has --------------------------------------------------------

    def _sniff(self, digest: str) -> str | None:
        """The layer media type of a blob the registry has, from its first bytes."""
        from graphdriver.archive.compression import Compression, detect_compression

        with self.client.open_blob(self.repo, digest) as blob:
            head = b""
            for chunk in blob.chunks():
                head += chunk
                if len(head) >= 8:
                    break
        kind = detect_compression(head)
        if kind is Compression.NONE:
            return MT_OCI_LAYER
        return COMPRESSION_LAYER_TYPE.get(kind.value)

    def _present(self, digest: str, media_type: str | None, diff_id: str) -> BlobPush | None:
        """The blob in the target repository, already there or mounted; None if neither."""
        size = self.client.blob_size(self.repo, digest)
        action, source = "exists", None
        if size is None:
            self.cache.forget(digest, self.client.host, self.repo)
            tried = set()
            for other in (*self.cache.repositories(digest, self.client.host), *self.opts.mount_from):
                if other == self.repo or other in tried:
                    continue
                tried.add(other)
                mounted, _session = self.client.mount_blob(self.repo, digest, other)
                if mounted:
                    size = self.client.blob_size(self.repo, digest)
                    action, source = "mounted", other
                    break
                self.cache.forget(digest, self.client.host, other)
            if size is None:
                return None
        if media_type is None:
            media_type = self._sniff(digest)
            if media_type is None:
                return None
        desc = Descriptor(oci_layer_type(media_type), digest, size)
        self.cache.record(digest, media_type, diff_id, self.client.host, self.repo)
        return BlobPush(desc, action, source)

    def _candidates(self, layer: Layer) -> list[tuple[str, str | None]]:
        assert layer.diff_id is not None
        out: list[tuple[str, str | None]] = []
        if self.opts.compression == "none":
            out.append((layer.diff_id, MT_OCI_LAYER))
        for digest, media_type in self.cache.candidates(layer.diff_id):
            if media_type in LAYER_TYPES and all(digest != d for d, _ in out):
                out.append((digest, media_type))
        if layer.compressed_digest and all(layer.compressed_digest != d for d, _ in out):
            out.append((layer.compressed_digest, None))
        return out

    # -- layers -----------------------------------------------------------------------------------

    def layer(self, layer: Layer) -> BlobPush:
        assert layer.diff_id is not None
        for digest, media_type in self._candidates(layer):
            found = self._present(digest, media_type, layer.diff_id)
            if found is not None:
                self._report(found)
                return found
        with self.store.staging() as tmp:
            desc = self._compress(layer, tmp / "blob")
            found = self._present(desc.digest, desc.media_type, layer.diff_id)
            if found is not None:
                self._report(found)
                return found
            self._upload(desc, lambda: open(tmp / "blob", "rb"))  # noqa: SIM115 - closed by the client
            self.cache.record(desc.digest, desc.media_type, layer.diff_id, self.client.host, self.repo)
            return BlobPush(desc, "uploaded")

    def _compress(self, layer: Layer, path: Path) -> Descriptor:
        from graphdriver.archive.compression import open_compressed

        compression = self.opts.compression
        self.sink(Event("status", layer.diff_id, "compressing" if compression != "none" else "preparing"))
        with open(path, "xb") as out:
            hashing = _HashingWriter(out)
            with self.store.original_tar(layer.id) as tar, open_compressed(hashing, compression) as packed:  # type: ignore[arg-type]
                while chunk := tar.read(_COPY):
                    packed.write(chunk)
            out.flush()
        return Descriptor(COMPRESSION_LAYER_TYPE[compression], hashing.digest, hashing.size)

    def _upload(self, desc: Descriptor, open_body: Any) -> None:
        throttle = Throttle(self.sink, desc.digest, "uploading", desc.size)
        self.sink(Event("status", desc.digest, "uploading", 0, desc.size))
        self.client.upload_blob(
            self.repo, desc.digest, desc.size, open_body,
            monolithic_limit=self.opts.monolithic_limit, chunk_size=self.opts.chunk_size,
            progress=throttle.add,
        )
        self.sink(Event("status", desc.digest, "uploaded", desc.size, desc.size))

    def _report(self, b: BlobPush) -> None:
        self.sink(Event("status", b.descriptor.digest, b.action, size=b.descriptor.size))

    # -- config and manifest ----------------------------------------------------------------------

    def config(self, data: bytes) -> BlobPush:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        desc = Descriptor(MT_OCI_CONFIG, digest, len(data))
        if self.client.blob_size(self.repo, digest) is not None:
            b = BlobPush(desc, "exists")
            self._report(b)
            return b
        self.client.upload_blob(self.repo, digest, len(data), lambda: io.BytesIO(data))
        b = BlobPush(desc, "uploaded")
        self._report(b)
        return b


class _HashingWriter:
    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        self._hash.update(view)
        self.size += len(view)
        self._out.write(view)
        return len(view)

    def flush(self) -> None:
        self._out.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


def _check_config(config: bytes, layers: Sequence[Layer]) -> None:
    try:
        doc = json.loads(config)
        diff_ids = doc["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument("the image config has no rootfs.diff_ids") from None
    have = [la.diff_id for la in layers]
    if None in have:
        bad = next(la.id for la in layers if la.diff_id is None)
        raise InvalidArgument(f"layer {bad} was not imported from a tar: it has no diff ID to push")
    if list(diff_ids) != have:
        raise InvalidArgument("the image config's rootfs.diff_ids do not match the layers being pushed")


def push_image(
    store: LayerStore,
    reference: str | Reference,
    *,
    config: bytes,
    layers: Sequence[str],
    options: PushOptions | None = None,
    sink: Sink = null_sink,
    client: RegistryClient | None = None,
) -> PushResult:
    """Push the image made of ``config`` (exact bytes) and the store's ``layers`` (ids or names,
    bottom first, whose diff IDs the config lists) to ``reference``."""
    opts = options or PushOptions()
    ref = reference if isinstance(reference, Reference) else parse_reference(reference)
    stacked = [store.get(name) for name in layers]
    _check_config(config, stacked)
    with ExitStack() as stack:
        if client is None:
            client = stack.enter_context(
                RegistryClient(
                    api_host(ref), insecure=opts.insecure, repository=ref.path, auth_file=opts.auth_file,
                    retry=opts.retry, timeout=opts.timeout,
                )
            )
        cache = stack.enter_context(BlobCache(store.root))
        pusher = _Pusher(store, client=client, ref=ref, opts=opts, cache=cache, sink=sink)
        client.ping()
        with ThreadPoolExecutor(max_workers=max(1, opts.parallel), thread_name_prefix="push") as pool:
            pushed = list(pool.map(pusher.layer, stacked))
        config_push = pusher.config(config)
        manifest = build_manifest(config_push.descriptor, [b.descriptor for b in pushed])
        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        if ref.digest is not None and ref.digest != digest:
            raise InvalidArgument(f"cannot push to {ref}: the manifest's digest is {digest}")
        client.put_manifest(ref.path, ref.tag or digest, manifest, MT_OCI_MANIFEST)
        sink(Event("message", message=f"{ref}: pushed manifest {digest}"))
        return PushResult(ref, digest, manifest, config_push, tuple(pushed))
    raise AssertionError("unreachable")  # pragma: no cover


def push(
    store: ImageStore | LayerStore,
    image: str,
    reference: str | Reference,
    options: PushOptions | None = None,
    *,
    sink: Sink = null_sink,
) -> PushResult:
    """Push the store's image ``image`` (a name, an id or id prefix, a manifest digest) to
    ``reference``. The layer blobs of the manifests it was pulled or imported with are offered
    first (:class:`BlobPush` ``exists``/``mounted`` without compressing anything)."""
    from graphdriver.images.imagestore import ImageStore
    from graphdriver.images.manifests import parse_manifest
    from graphdriver.images.records import ImageTxn

    images = store if isinstance(store, ImageStore) else ImageStore(store)
    found = images.get(image)
    with images.layers.db.read() as txn:
        manifests = ImageTxn(txn).manifests(found.id)
    with BlobCache(images.layers.root) as cache:
        for m in manifests:
            try:
                parsed = parse_manifest(m.body)
            except GraphDriverError:
                continue
            if len(parsed.layers) == len(found.diff_ids):
                for d, diff_id in zip(parsed.layers, found.diff_ids, strict=True):
                    cache.learn(d.digest, d.media_type, diff_id)
    return push_image(
        images.layers, reference, config=found.config, layers=list(found.layers), options=options, sink=sink
    )
