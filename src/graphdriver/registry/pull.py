"""Pull an image from a registry into the layer store.

::

    resolve   GET manifest REF -> an index? pick the platform -> GET manifest DIGEST
    config    GET blob (config digest), checked; its diff IDs give every layer's chain ID
    skip      layers whose chain ID the store has are not downloaded (nor anything below them)
    download  up to ``parallel`` blobs at once, each into a spool file in the store's staging
              area, hashed and counted as it arrives (never more than the descriptor's size);
              a dropped connection resumes with ``Range: bytes=N-``
    apply     parallel (``parallel_apply``; by default where the driver applies each layer into
              its own directory, the overlay family): every missing layer at once, each in a
              forked worker of LayerStore.import_layers that reads its spool file *while it is
              written* and applies it into the layer's own directory; then measured, synced
              once, committed bottom-up. A layer that needs its lower layers' content while it is
              applied is applied again from its spool file once they are complete.
              One by one otherwise: parents first, LayerStore.import_layer reading the spool file
              while it is written (``stream_apply``): the first layer applies as it downloads,
              the later ones spool meanwhile. Either way the store checks the blob digest and
              size and the diff ID again, so a bad byte or a short blob stores nothing
    record    the image: config, top layer, manifest, the reference as its name
              (graphdriver.images.importer.record_image, as an OCI layout import does)

Like an image import, a pull holds a lease (:meth:`ImageStore.lease`) on the image's chain IDs
from before it looks for them until the image is recorded, so no concurrent ``rmi``/``prune``
takes a layer it reuses. A pull that fails removes the layers it created (unless something else
uses them meanwhile): nothing of it is left. A pull that is killed leaves an incomplete layer
record, a staging directory and a stale lease; the next :meth:`ImageStore.open` removes all three
and the layers the lease claimed, so the next pull starts clean.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import httpx

from graphdriver.errors import CorruptStream, DigestMismatch, GraphDriverError, InvalidArchive, NotFound
from graphdriver.images.manifests import (
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    host_platform,
    parse_config,
)
from graphdriver.layers.digests import chain_ids
from graphdriver.registry.client import RegistryClient, RetryPolicy
from graphdriver.registry.manifests import parse_document, select_platform
from graphdriver.registry.progress import Event, Sink, Throttle, null_sink
from graphdriver.registry.reference import Reference, api_host, parse_reference, target

if TYPE_CHECKING:
    from graphdriver.images.imagestore import Image, ImageStore
    from graphdriver.layers.metadata import Layer
    from graphdriver.layers.store import LayerStore

__all__ = ["PullOptions", "PullResult", "Resolved", "pull", "resolve"]

DEFAULT_PARALLEL = 4


@dataclass(frozen=True)
class PullOptions:
    """How to pull. ``platform`` None means this machine's (only consulted for an index)."""

    platform: Platform | None = None
    insecure: bool = False
    parallel: int = DEFAULT_PARALLEL
    """blobs downloaded at once"""
    stream_apply: bool = True
    """apply a layer while it downloads; False: download every blob first, then apply"""
    parallel_apply: bool | None = None
    """apply the missing layers at the same time in forked workers (LayerStore.import_layers);
    None: where the driver applies each layer into its own directory (overlay2's
    ``applies_alone``); False: one layer after the other"""
    retry: RetryPolicy | None = None
    timeout: httpx.Timeout | float | None = None
    auth_file: str | None = None


@dataclass(frozen=True)
class Resolved:
    """A reference resolved to one image manifest and its config."""

    reference: Reference
    manifest: bytes
    manifest_media_type: str
    manifest_digest: str
    parsed: Manifest
    config: ImageConfig
    config_digest: str
    index_digest: str | None = None


@dataclass(frozen=True)
class PullResult:
    """What a pull stored. ``downloaded`` lists the blob digests fetched this time."""

    resolved: Resolved
    layers: tuple[Layer, ...]
    downloaded: tuple[str, ...]
    image: Image
    """the image as the store recorded it"""

    @property
    def top_layer(self) -> Layer | None:
        return self.layers[-1] if self.layers else None

    def to_json(self) -> dict[str, Any]:
        r = self.resolved
        return {
            "reference": str(r.reference),
            "digest": r.manifest_digest,
            "index_digest": r.index_digest,
            "image": self.image.id,
            "config": r.config_digest,
            "platform": str(r.config.platform) if r.config.platform else None,
            "top_layer": self.top_layer.id if self.top_layer else None,
            "layers": [
                {
                    "digest": d.digest,
                    "size": d.size,
                    "diff_id": layer.diff_id,
                    "chain_id": layer.chain_id,
                    "id": layer.id,
                    "downloaded": d.digest in self.downloaded,
                }
                for d, layer in zip(r.parsed.layers, self.layers, strict=True)
            ],
        }


def resolve(
    client: RegistryClient, ref: Reference, platform: Platform | None = None, sink: Sink = null_sink
) -> Resolved:
    """Fetch the manifest (through an index if there is one) and the config of ``ref``."""
    repo = ref.path
    data, media_type, digest = client.get_manifest(repo, target(ref))
    doc = parse_document(data, media_type, f"manifest of {ref}")
    index_digest = None
    wanted = platform or host_platform()
    if isinstance(doc, Index):
        index_digest = digest
        chosen = select_platform(doc, wanted)
        data, media_type, digest = client.get_manifest(repo, chosen.digest)
        if len(data) != chosen.size:
            raise DigestMismatch(
                f"manifest {chosen.digest}: the index says {chosen.size} bytes, the registry sent {len(data)}"
            )
        doc = parse_document(data, media_type, f"manifest {chosen.digest}")
        if not isinstance(doc, Manifest):
            raise NotFound(f"{ref}: the index entry for {wanted} is not an image manifest")
    config_data = client.fetch_blob(repo, doc.config.digest, doc.config.size)
    config = parse_config(config_data, f"image config {doc.config.digest}")
    if len(config.diff_ids) != len(doc.layers):
        raise InvalidArchive(
            f"image config {doc.config.digest} lists {len(config.diff_ids)} diff IDs"
            f" but the manifest has {len(doc.layers)} layers"
        )
    if index_digest is None and platform is not None and not platform.matches(config.platform):
        raise NotFound(f"{ref} is an image for {config.platform}, not for the requested {platform}")
    sink(Event("message", message=f"{ref}: resolved to {digest}"))
    return Resolved(
        ref, data, media_type or doc.media_type, digest, doc, config, doc.config.digest, index_digest
    )


# -- spooling: a file written by a download thread and read, as it grows, by the applier -----------


class _Spool:
    """One blob's download into a staging file; readers follow the writer."""

    def __init__(self, path: Path, desc: Descriptor) -> None:
        self.path = path
        self.failed_path = path.with_name(path.name + ".failed")
        """made when the download fails: how a reader in another process learns it"""
        self.desc = desc
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._cond = threading.Condition()
        self.written = 0
        self.done = False
        self.error: BaseException | None = None
        self.finished = threading.Event()

    def write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        with self._cond:
            self.written += len(chunk)
            self._cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        if error is not None:
            try:
                os.close(os.open(self.failed_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            except OSError:
                pass  # the staging area is gone: nobody reads any more
        with self._cond:
            if not self.done:
                os.close(self._fd)
            self.done = True
            self.error = error
            self._cond.notify_all()
        self.finished.set()

    def wait_readable(self, pos: int) -> int:
        """Block until bytes past ``pos`` exist (return how many) or the download ended
        (0 at a clean end; the download's error is raised)."""
        with self._cond:
            while self.written <= pos and not self.done:
                self._cond.wait()
            if self.written > pos:
                return self.written - pos
            if self.error is not None:
                raise self.error
            return 0

    def reader(self, on_first_read: Callable[[], None] | None = None) -> BinaryIO:
        raw = _SpoolReader(self, on_first_read)
        return cast(BinaryIO, io.BufferedReader(raw, buffer_size=1 << 20))

    def follower(self) -> BinaryIO:
        """A reader that needs nothing of this process's threads: for a forked worker."""
        return cast(BinaryIO, io.BufferedReader(_FollowReader(self), buffer_size=1 << 20))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.failed_path.unlink(missing_ok=True)


class _SpoolReader(io.RawIOBase):
    def __init__(self, spool: _Spool, on_first_read: Callable[[], None] | None) -> None:
        super().__init__()
        self._spool = spool
        self._on_first_read = on_first_read
        self._fd = os.open(spool.path, os.O_RDONLY | os.O_CLOEXEC)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if self._on_first_read is not None:
            self._on_first_read()
            self._on_first_read = None
        available = self._spool.wait_readable(self._pos)
        if not available:
            return 0
        data = os.pread(self._fd, min(len(view), available), self._pos)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class _FollowReader(io.RawIOBase):
    """Reads a spool file up to the blob's size while a download thread writes it, also from a
    forked process (where that thread and the spool's condition do not exist): at the end of what
    is there it polls the file, and raises once the spool's failure marker appears."""

    _MAX_WAIT = 0.02

    def __init__(self, spool: _Spool) -> None:
        super().__init__()
        self._fd = os.open(spool.path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = spool.desc.size
        self._digest = spool.desc.digest
        self._failed = spool.failed_path
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        want = min(len(view), self._size - self._pos)
        if want <= 0:
            return 0
        wait = 0.0005
        while True:
            n = os.preadv(self._fd, [view[:want]], self._pos)
            if n:
                self._pos += n
                return n
            if self._failed.exists():
                raise CorruptStream(f"blob {self._digest}: its download failed at byte {self._pos}")
            time.sleep(wait)
            wait = min(wait * 2, self._MAX_WAIT)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class _Cancelled(Exception):
    pass


@dataclass
class _Downloads:
    client: RegistryClient
    repository: str
    sink: Sink
    retry: RetryPolicy
    cancel: threading.Event = field(default_factory=threading.Event)

    def run(self, spool: _Spool) -> None:
        """Download one blob into ``spool``; every outcome is recorded in the spool."""
        try:
            self._fetch(spool)
        except BaseException as exc:
            spool.finish(exc)
            return
        spool.finish()

    def _fetch(self, spool: _Spool) -> None:
        desc = spool.desc
        algo = desc.digest.partition(":")[0]
        digest = hashlib.new(algo)
        offset = 0
        attempt = 0
        throttle = Throttle(self.sink, desc.digest, "downloading", desc.size)
        self.sink(Event("status", desc.digest, "downloading", 0, desc.size))
        while True:
            if self.cancel.is_set():
                raise _Cancelled()
            attempt += 1
            problem: str
            try:
                with self.client.open_blob(self.repository, desc.digest, offset) as blob:
                    if offset and blob.skip == 0 and blob.response.status_code == 416:
                        problem = "the registry refused to resume"
                        raise _Retry()
                    for chunk in blob.chunks():
                        if self.cancel.is_set():
                            raise _Cancelled()
                        if offset + len(chunk) > desc.size:
                            raise DigestMismatch(
                                f"blob {desc.digest}: the registry sent more than the {desc.size} bytes"
                                " the manifest gives"
                            )
                        digest.update(chunk)
                        spool.write(chunk)
                        offset += len(chunk)
                        throttle.add(len(chunk))
                if offset == desc.size:
                    break
                problem = f"the registry sent {offset} of {desc.size} bytes"
            except _Retry:
                pass
            except (httpx.TransportError, httpx.StreamError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt >= self.retry.attempts:
                raise CorruptStream(
                    f"blob {desc.digest}: truncated: {problem} (gave up after {attempt} attempts)"
                )
            time.sleep(self.retry.delay(attempt))
        got = f"{algo}:{digest.hexdigest()}"
        if got != desc.digest:
            raise DigestMismatch(f"blob {desc.digest}: the registry sent content that hashes to {got}")
        self.sink(Event("status", desc.digest, "downloaded", desc.size, desc.size))


class _Retry(Exception):
    pass


def pull(
    store: ImageStore | LayerStore,
    reference: str | Reference,
    options: PullOptions | None = None,
    *,
    sink: Sink = null_sink,
    client: RegistryClient | None = None,
) -> PullResult:
    """Pull ``reference`` into ``store`` and record the image; returns what was stored.

    Errors: :class:`NotFound` (no such repository, tag or platform), :class:`PermissionDenied`
    (401/403, with the registry's message), :class:`DigestMismatch` / :class:`CorruptStream`
    (bad or short content), :class:`RegistryError` (unreachable, or 5xx/429 after the
    retries). After any of them the store is as it was.
    """
    from graphdriver.images.imagestore import ImageStore

    images = store if isinstance(store, ImageStore) else ImageStore(store)
    opts = options or PullOptions()
    ref = reference if isinstance(reference, Reference) else parse_reference(reference)
    retry = opts.retry or RetryPolicy()
    with ExitStack() as stack:
        if client is None:
            client = stack.enter_context(
                RegistryClient(
                    api_host(ref), insecure=opts.insecure, repository=ref.path, auth_file=opts.auth_file,
                    retry=retry, timeout=opts.timeout, max_connections=max(8, opts.parallel * 2),
                )
            )
        resolved = resolve(client, ref, opts.platform, sink)
        created: list[str] = []
        try:
            with images.lease(chain_ids(resolved.config.diff_ids)):
                layers, downloaded = _fetch_layers(
                    images.layers, client=client, resolved=resolved, opts=opts, retry=retry, sink=sink,
                    created=created,
                )
                image = _record_image(images, resolved, layers)
        except BaseException:
            if created:
                try:
                    images.collect(created)
                except Exception:
                    pass  # whatever is left is garbage for prune / check
            raise
        _remember_blobs(images.layers, client.host, resolved)
        return PullResult(resolved, tuple(layers), tuple(downloaded), image)
    raise AssertionError("unreachable")  # pragma: no cover


def _fetch_layers(
    store: LayerStore,
    *,
    client: RegistryClient,
    resolved: Resolved,
    opts: PullOptions,
    retry: RetryPolicy,
    sink: Sink,
    created: list[str],
) -> tuple[list[Layer], list[str]]:
    descs = resolved.parsed.layers
    diff_ids = resolved.config.diff_ids
    chains = chain_ids(diff_ids)
    have = [store.by_chain_id(c) for c in chains]
    first_missing = next((i for i, la in enumerate(have) if la is None), len(descs))
    layers: list[Layer] = []
    for i in range(first_missing):
        found = have[i]
        assert found is not None
        layers.append(found)
        sink(Event("status", descs[i].digest, "exists", size=descs[i].size))
    todo = list(range(first_missing, len(descs)))
    if not todo:
        return layers, []
    for i in todo:
        sink(Event("status", descs[i].digest, "waiting", size=descs[i].size))
    downloads = _Downloads(client, resolved.reference.path, sink, retry)
    with store.staging() as staging, ThreadPoolExecutor(
        max_workers=max(1, opts.parallel), thread_name_prefix="pull"
    ) as pool:
        spools: dict[str, _Spool] = {}
        futures: list[Future[None]] = []
        uses: dict[str, int] = {}
        try:
            for n, i in enumerate(todo):
                d = descs[i]
                uses[d.digest] = uses.get(d.digest, 0) + 1
                if d.digest not in spools:
                    spools[d.digest] = _Spool(staging / f"blob-{n}", d)
                    futures.append(pool.submit(downloads.run, spools[d.digest]))
            if not opts.stream_apply:
                for s in spools.values():
                    s.finished.wait()
                    if s.error is not None:
                        raise s.error
            parent = layers[-1].id if layers else None
            if _parallel_apply(store, opts, len(todo)):
                try:
                    stacked = _apply_stack(
                        store, spools=spools, descs=descs, diff_ids=diff_ids, todo=todo, parent=parent,
                        sink=sink,
                    )
                except GraphDriverError as exc:
                    # a worker that read a failed download reports just that: the download's
                    # own error says what went wrong
                    downloads.cancel.set()
                    for s in spools.values():
                        s.finished.wait()
                    for i in todo:
                        err = spools[descs[i].digest].error
                        if err is not None and err is not exc and not isinstance(err, _Cancelled):
                            raise err from None
                    raise
                created.extend(la.id for la in stacked)
                layers.extend(stacked)
                todo = []
            for i in todo:
                d = descs[i]
                spool = spools[d.digest]
                layer = _apply(store, spool, parent, diff_ids[i], sink)
                created.append(layer.id)
                layers.append(layer)
                parent = layer.id
                uses[d.digest] -= 1
                if not uses[d.digest]:
                    spool.finished.wait()
                    spool.remove()
        except BaseException:
            downloads.cancel.set()
            raise
        finally:
            downloads.cancel.set()
            for s in spools.values():
                s.finished.wait()
    return layers, list(spools)


def _parallel_apply(store: LayerStore, opts: PullOptions, missing: int) -> bool:
    if missing < 2 or opts.parallel_apply is False:
        return False
    return bool(opts.parallel_apply) or callable(getattr(store.driver, "applies_alone", None))


def _apply_stack(
    store: LayerStore,
    *,
    spools: dict[str, _Spool],
    descs: Sequence[Descriptor],
    diff_ids: Sequence[str],
    todo: Sequence[int],
    parent: str | None,
    sink: Sink,
) -> list[Layer]:
    """The missing layers ``todo`` through LayerStore.import_layers, each worker following its
    spool file as it downloads."""
    from graphdriver.layers.store import LayerBlob

    def event(k: int, what: str) -> None:
        d = descs[todo[k]]
        sink(Event("status", d.digest, what, size=d.size))

    with ExitStack() as stack:
        blobs = []
        for i in todo:
            d = descs[i]
            spool = spools[d.digest]
            reader = stack.enter_context(spool.follower())
            blobs.append(LayerBlob(reader, diff_ids[i], d.digest, d.size, reopen=spool.follower))
        return store.import_layers(blobs, parent, on_event=event)
    raise AssertionError("unreachable")  # pragma: no cover


def _apply(store: LayerStore, spool: _Spool, parent: str | None, diff_id: str, sink: Sink) -> Layer:
    d = spool.desc

    def started() -> None:  # the store asks for the first bytes once the layer is recorded
        sink(Event("status", d.digest, "applying", size=d.size))

    try:
        with spool.reader(started) as blob:
            layer = store.import_layer(
                blob, parent, expected_diff_id=diff_id, expected_digest=d.digest, expected_size=d.size
            )
    except GraphDriverError as exc:
        # a bad byte usually breaks the decompressor or the tar before the digest can be
        # checked: when the download itself failed, that is the error to report
        spool.finished.wait()
        if spool.error is not None and spool.error is not exc and not isinstance(spool.error, _Cancelled):
            raise spool.error from None
        raise
    sink(Event("status", d.digest, "applied", size=d.size))
    return layer


def _record_image(images: ImageStore, resolved: Resolved, layers: Sequence[Layer]) -> Image:
    """Record the pulled image as an import does (one transaction; the lease still holds)."""
    from graphdriver.images.importer import record_image
    from graphdriver.images.sources import LayerSpec, ResolvedImage

    image = ResolvedImage(
        config=resolved.config,
        config_digest=resolved.config_digest,
        config_media_type=resolved.parsed.config.media_type,
        manifest=resolved.manifest,
        manifest_digest=resolved.manifest_digest,
        manifest_media_type=resolved.manifest_media_type,
        layers=tuple(LayerSpec(d.digest, d.digest, d.size, d.media_type) for d in resolved.parsed.layers),
        names=(str(resolved.reference),),
    )
    return record_image(images, image, layers[-1].id if layers else None, [str(resolved.reference)])


def _remember_blobs(store: LayerStore, host: str, resolved: Resolved) -> None:
    """Tell the blob cache where these layer blobs are (push mounts from there later)."""
    from graphdriver.registry.blobcache import BlobCache

    with BlobCache(store.root) as cache:
        for desc, diff_id in zip(resolved.parsed.layers, resolved.config.diff_ids, strict=True):
            cache.record(desc.digest, desc.media_type, diff_id, host, resolved.reference.path)
