"""The image store: images, their names and containers, over one layer store.

:class:`ImageStore` opens a :class:`~graphdriver.layers.store.LayerStore` and keeps its records
in the same database (:mod:`graphdriver.images.records`). An image is identified by the digest
of its config (the image id), found by a name (``name:tag``, normalised), its id (or a unique
prefix of it), or the digest of any manifest it was imported with; its layers are the parent
chain of its top layer. Operations live in their own modules and are reached from here:
:mod:`~graphdriver.images.importer`, :mod:`~graphdriver.images.exporter`,
:mod:`~graphdriver.images.containers`.

**Garbage.** A layer is *used* when an image's top layer, a container's layer or a live lease's
target is that layer or a layer above it. :meth:`ImageStore.collect` removes unused layers,
deepest first, through :meth:`LayerStore.remove`, which refuses (under the store lock, in the same
transaction that would mark the layer ``removing``) a layer that is mounted, has children, or is
used by an image, a container or a live lease; so an import that is about to reuse a layer
(it leases the chain IDs it needs before it looks them up) can never lose it to a concurrent
``rmi`` or ``prune``.

**Leases** (:meth:`ImageStore.lease`) are rows naming chain IDs or layer ids, alive while their
lock file is held. A process that dies leaves a stale lease; opening the store deletes stale
leases and removes the layers they claimed that nothing else uses, so an import killed half way
leaves no layer behind.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphdriver.errors import Busy, GraphDriverError, InvalidArgument, NotFound
from graphdriver.images.manifests import ImageConfig, parse_config
from graphdriver.images.records import ContainerRow, ImageRow, ImageTxn
from graphdriver.images.references import is_digest, try_parse_reference
from graphdriver.layers.digests import chain_ids
from graphdriver.layers.metadata import Layer, LayerState, Txn
from graphdriver.layers.store import DiskUsage, LayerStore

if TYPE_CHECKING:
    from graphdriver.layers.check import CheckReport

__all__ = [
    "Container",
    "GcResult",
    "Image",
    "ImageCheckReport",
    "ImageDiskUsage",
    "ImageProblem",
    "ImageStore",
    "RemoveReport",
    "TreeNode",
]

_HEX_PREFIX = re.compile(r"(?:sha256:)?([0-9a-f]{4,64})")
_FULL_HEX = re.compile(r"[0-9a-f]{64}")


def _iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Image:
    """One image as the store knows it."""

    id: str
    """the config digest"""
    names: tuple[str, ...]
    top_layer: str | None
    layers: tuple[str, ...]
    """store ids of its layers, bottom first"""
    diff_ids: tuple[str, ...]
    manifest_digests: tuple[str, ...]
    created: str | None
    """the config's ``created`` (when the image was built)"""
    recorded: datetime
    """when this store recorded it"""
    size: int
    """bytes of its layers' own changes, as recorded"""
    config: bytes

    @property
    def short_id(self) -> str:
        return self.id.partition(":")[2][:12]

    def parsed_config(self) -> ImageConfig:
        return parse_config(self.config, f"config of image {self.id}")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "names": list(self.names),
            "top_layer": self.top_layer,
            "layers": list(self.layers),
            "diff_ids": list(self.diff_ids),
            "manifest_digests": list(self.manifest_digests),
            "created": self.created,
            "recorded": _iso(self.recorded),
            "size": self.size,
        }


@dataclass(frozen=True)
class Container:
    """A container: a name, a read-write layer on an image's top layer."""

    name: str
    layer_id: str
    image_id: str
    created: datetime
    mount_count: int = 0
    mount_point: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layer": self.layer_id,
            "image": self.image_id,
            "created": _iso(self.created),
            "mount_count": self.mount_count,
            "mount_point": self.mount_point,
        }


@dataclass
class GcResult:
    removed: list[str] = field(default_factory=list)
    """layers removed"""
    kept: list[tuple[str, str]] = field(default_factory=list)
    """unused layers that could not be removed now, with the reason (mounted, in use...)"""

    def to_json(self) -> dict[str, Any]:
        return {"removed": list(self.removed), "kept": [{"layer": k, "reason": r} for k, r in self.kept]}


@dataclass
class RemoveReport:
    """What :meth:`ImageStore.rmi` did."""

    untagged: list[str] = field(default_factory=list)
    deleted: str | None = None
    """the image id, if the image record was deleted (not only a name)"""
    gc: GcResult = field(default_factory=GcResult)

    def to_json(self) -> dict[str, Any]:
        return {"untagged": list(self.untagged), "deleted": self.deleted, **self.gc.to_json()}


@dataclass(frozen=True)
class ImageDiskUsage:
    images: int
    containers: int
    layers: DiskUsage
    unused_layers: int
    reclaimable: int
    """bytes of the layers no image or container uses (what ``prune`` would free)"""

    def to_json(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "containers": self.containers,
            "unused_layers": self.unused_layers,
            "reclaimable": self.reclaimable,
            **self.layers.to_json(),
        }


@dataclass
class ImageProblem:
    kind: str
    """image, container, stale-lease"""
    subject: str
    message: str
    repaired: bool = False
    action: str = ""

    def __str__(self) -> str:
        tail = (
            f" [repaired: {self.action}]" if self.repaired else (f" [{self.action}]" if self.action else "")
        )
        return f"{self.kind}: {self.message}{tail}"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "subject": self.subject,
            "message": self.message,
            "repaired": self.repaired,
            "action": self.action,
        }


@dataclass
class ImageCheckReport:
    """``check`` over images, containers and leases, plus the layer store's own report."""

    layers: CheckReport
    problems: list[ImageProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.layers.clean and not self.problems

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems] + [str(p) for p in self.layers.problems]

    def to_json(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "problems": [p.to_json() for p in self.problems],
            "layers": self.layers.to_json(),
            "notes": self.notes + list(self.layers.notes),
        }


@dataclass(frozen=True)
class TreeNode:
    """One line of ``layers --tree``: a layer, its depth, and who uses it as a top layer."""

    layer: Layer
    depth: int
    images: tuple[str, ...]
    containers: tuple[str, ...]


class Lease:
    """A live lease: :meth:`add` claims more targets."""

    def __init__(self, store: ImageStore, lease_id: str) -> None:
        self.store = store
        self.id = lease_id

    def add(self, targets: Iterable[str]) -> None:
        with self.store.layers.write() as txn:
            ImageTxn(txn).add_lease(self.id, targets)


def _ancestors(layer_id: str | None, by_id: dict[str, Layer]) -> list[str]:
    """``layer_id`` and its parents, top first."""
    out: list[str] = []
    cur = layer_id
    while cur is not None and cur in by_id and cur not in out:
        out.append(cur)
        cur = by_id[cur].parent
    return out


class ImageStore:
    """Images and containers over a :class:`LayerStore`. Open with :meth:`open`."""

    def __init__(self, layers: LayerStore) -> None:
        self.layers = layers

    @classmethod
    def open(
        cls,
        root: Path | str,
        driver: str | None = None,
        options: dict[str, str] | None = None,
        *,
        recover: bool = True,
    ) -> ImageStore:
        """Open (creating if needed) the store at ``root`` on ``driver`` (see
        :meth:`LayerStore.open`); unless ``recover=False``, stale leases are cleaned up."""
        store = cls(LayerStore.open(root, driver, options, recover=recover))
        if recover:
            try:
                store.clean_leases()
            except BaseException:
                store.close()
                raise
        return store

    def close(self) -> None:
        self.layers.close()

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ImageStore root={str(self.layers.root)!r} driver={self.layers.driver.name}>"

    # -- reading ----------------------------------------------------------------------------------

    def _image(self, txn: Txn, row: ImageRow) -> Image:
        chain: list[Layer] = []
        cur = row.top_layer
        while cur is not None:
            layer = txn.get(cur)
            if layer is None:
                break
            chain.append(layer)
            cur = layer.parent
        chain.reverse()
        try:
            config = parse_config(row.config, f"config of image {row.id}")
            diff_ids, created = config.diff_ids, config.created
        except GraphDriverError:
            diff_ids, created = (), None
        return Image(
            id=row.id,
            names=row.names,
            top_layer=row.top_layer,
            layers=tuple(la.id for la in chain),
            diff_ids=diff_ids,
            manifest_digests=row.manifest_digests,
            created=created,
            recorded=row.created,
            size=sum(la.size for la in chain),
            config=row.config,
        )

    def _find(self, itx: ImageTxn, ref: str) -> ImageRow:
        if not isinstance(ref, str) or not ref:
            raise InvalidArgument(f"invalid image reference {ref!r}")
        row: ImageRow | None = None
        if is_digest(ref):
            row = itx.image(ref) or itx.image_by_manifest(ref)
        elif _FULL_HEX.fullmatch(ref):
            row = itx.image("sha256:" + ref)
        if row is None:
            parsed = try_parse_reference(ref)
            if parsed is not None:
                if parsed.digest is not None:
                    row = itx.image(parsed.digest) or itx.image_by_manifest(parsed.digest)
                else:
                    row = itx.image_by_name(str(parsed))
        if row is None:
            m = _HEX_PREFIX.fullmatch(ref)
            if m is not None:
                ids = itx.image_ids_with_prefix(m.group(1))
                if len(ids) > 1:
                    raise InvalidArgument(f"image id prefix {ref!r} is ambiguous ({len(ids)} images)")
                if ids:
                    row = itx.image(ids[0])
        if row is None:
            raise NotFound(f"image not known: {ref}")
        return row

    def get(self, ref: str) -> Image:
        """The image ``ref`` names (name, id, id prefix or manifest digest); NotFound otherwise."""
        with self.layers.db.read() as txn:
            return self._image(txn, self._find(ImageTxn(txn), ref))

    def images(self) -> list[Image]:
        """Every image, oldest first."""
        with self.layers.db.read() as txn:
            return [self._image(txn, r) for r in ImageTxn(txn).images()]

    def manifest(self, ref: str) -> tuple[str, str, bytes] | None:
        """(digest, media type, body) of the first manifest the image was imported with."""
        with self.layers.db.read() as txn:
            itx = ImageTxn(txn)
            rows = itx.manifests(self._find(itx, ref).id)
        return None if not rows else (rows[0].digest, rows[0].media_type, rows[0].body)

    # -- names ------------------------------------------------------------------------------------

    def tag(self, ref: str, name: str) -> Image:
        """Give an image another name (taken from the image that had it)."""
        from graphdriver.images.references import parse_reference

        parsed = parse_reference(name)
        if parsed.digest is not None:
            raise InvalidArgument(f"cannot tag with a digest: {name}")
        with self.layers.write() as txn:
            itx = ImageTxn(txn)
            row = self._find(itx, ref)
            itx.set_names(row.id, [str(parsed)])
        return self.get(row.id)

    # -- leases and garbage -----------------------------------------------------------------------

    @contextmanager
    def lease(self, targets: Iterable[str] = ()) -> Iterator[Lease]:
        """Claim layers (chain IDs or layer ids) for the block: no collection removes them."""
        lease_id = secrets.token_hex(16)
        lock = self.layers.lease_lock(lease_id)
        lock.acquire()
        try:
            handle = Lease(self, lease_id)
            handle.add(targets)
            yield handle
        finally:
            try:
                with self.layers.write() as txn:
                    ImageTxn(txn).delete_lease(lease_id)
            finally:
                lock.release(unlink=True)

    def _usage(self) -> tuple[list[Layer], set[str]]:
        """Every complete layer, and the ids of the used ones."""
        with self.layers.db.read() as txn:
            itx = ImageTxn(txn)
            everything = txn.all()
            roots = itx.top_layers() | itx.container_layers()
            leases = itx.leases()
        live: set[str] = set()
        for lease_id, targets in leases.items():
            if self.layers.lease_alive(lease_id):
                live |= targets
        by_id = {la.id: la for la in everything}
        used: set[str] = set()
        for la in everything:
            if la.id in roots or la.id in live or (la.chain_id is not None and la.chain_id in live):
                used.update(_ancestors(la.id, by_id))
            elif la.state is not LayerState.COMPLETE:
                used.update(_ancestors(la.parent, by_id))  # being built on, or being removed
        complete = [la for la in everything if la.state is LayerState.COMPLETE]
        return complete, used

    def unused_layers(self) -> list[Layer]:
        """Complete layers that no image, container or live lease uses, oldest first."""
        complete, used = self._usage()
        return [la for la in complete if la.id not in used]

    def collect(self, candidates: Iterable[str] | None = None) -> GcResult:
        """Remove unused layers (only those in ``candidates``, if given), deepest first.
        A layer that cannot be removed now (mounted, in use meanwhile) is kept, with the reason."""
        wanted = None if candidates is None else set(candidates)
        complete, used = self._usage()
        by_id = {la.id: la for la in complete}
        garbage = [la for la in complete if la.id not in used and (wanted is None or la.id in wanted)]

        def depth(la: Layer) -> int:
            return len(_ancestors(la.id, by_id))

        garbage.sort(key=depth, reverse=True)
        result = GcResult()
        for la in garbage:
            try:
                self.layers.remove(la.id)
                result.removed.append(la.id)
            except NotFound:
                continue
            except Busy as exc:
                result.kept.append((la.id, str(exc)))
        return result

    def prune(self) -> GcResult:
        """Remove every layer no image or container uses (and stale leases)."""
        self.clean_leases(collect=False)
        return self.collect()

    def clean_leases(self, *, collect: bool = True) -> GcResult:
        """Delete the leases of operations that died, then (``collect``) remove the layers they
        claimed that nothing uses."""
        with self.layers.db.read() as txn:
            leases = ImageTxn(txn).leases()
        stale = {lid: t for lid, t in leases.items() if not self.layers.lease_alive(lid)}
        if not stale:
            return GcResult()
        with self.layers.write() as txn:
            itx = ImageTxn(txn)
            for lid in stale:
                itx.delete_lease(lid)
        if not collect:
            return GcResult()
        targets = set().union(*stale.values())
        with self.layers.db.read() as txn:
            claimed = [la.id for la in txn.all() if la.id in targets or la.chain_id in targets]
        return self.collect(claimed)

    # -- removal ----------------------------------------------------------------------------------

    def rmi(self, ref: str) -> RemoveReport:
        """Remove an image name, or the image, and then every layer of it nothing else uses.

        ``ref`` a name of an image that has other names: only that name goes. Otherwise (the
        last name, the id, a digest) the image record goes with all its names, unless a
        container uses it (Busy), and then its unused layers.
        """
        report = RemoveReport()
        with self.layers.write() as txn:
            itx = ImageTxn(txn)
            row = self._find(itx, ref)
            parsed = try_parse_reference(ref)
            name = None if parsed is None or parsed.digest is not None else str(parsed)
            if name is not None and name in row.names and len(row.names) > 1:
                itx.remove_name(name)
                report.untagged.append(name)
                return report
            itx.delete_image(row.id)
            report.untagged.extend(row.names)
            report.deleted = row.id
            chain = []
            cur = row.top_layer
            while cur is not None:
                layer = txn.get(cur)
                if layer is None:
                    break
                chain.append(cur)
                cur = layer.parent
        report.gc = self.collect(chain)
        return report

    # -- operations in their own modules ----------------------------------------------------------

    def import_image(self, source: str | Path, **kw: Any) -> Image:
        """Import an image; see :func:`graphdriver.images.importer.import_image`."""
        from graphdriver.images.importer import import_image

        return import_image(self, source, **kw)

    def export_image(self, ref: str, dest: str | Path, **kw: Any) -> Any:
        """Export an image; see :func:`graphdriver.images.exporter.export_image`."""
        from graphdriver.images.exporter import export_image

        return export_image(self, ref, dest, **kw)

    def _container(self, txn: Txn, row: ContainerRow) -> Container:
        layer = txn.get(row.layer_id)
        return Container(
            name=row.name,
            layer_id=row.layer_id,
            image_id=row.image_id,
            created=row.created,
            mount_count=0 if layer is None else layer.mount_count,
            mount_point=None if layer is None else layer.mount_point,
        )

    def containers(self) -> list[Container]:
        with self.layers.db.read() as txn:
            return [self._container(txn, r) for r in ImageTxn(txn).containers()]

    def container(self, name: str) -> Container:
        with self.layers.db.read() as txn:
            row = ImageTxn(txn).container(name)
            if row is None:
                raise NotFound(f"container not known: {name}")
            return self._container(txn, row)

    def create_container(self, image: str, name: str) -> Container:
        from graphdriver.images.containers import create_container

        return create_container(self, image, name)

    def remove_container(self, name: str) -> None:
        """Remove a container and its layer (Busy while it is mounted)."""
        from graphdriver.images.containers import remove_container

        remove_container(self, name)

    def mount_container(self, name: str, label: str = "") -> Path:
        return self.layers.mount(self.container(name).layer_id, label)

    def unmount_container(self, name: str, force: bool = False) -> int:
        return self.layers.unmount(self.container(name).layer_id, force)

    def commit(self, container: str, name: str | None = None, **kw: Any) -> Image:
        from graphdriver.images.containers import commit

        return commit(self, container, name, **kw)

    # -- reports ----------------------------------------------------------------------------------

    def df(self) -> ImageDiskUsage:
        unused = self.unused_layers()
        with self.layers.db.read() as txn:
            itx = ImageTxn(txn)
            n_images = len(itx.images())
            n_containers = len(itx.containers())
        return ImageDiskUsage(
            images=n_images,
            containers=n_containers,
            layers=self.layers.df(),
            unused_layers=len(unused),
            reclaimable=sum(la.size for la in unused),
        )

    def tree(self) -> list[TreeNode]:
        """Every complete layer, parents before children (depth first), with the images whose
        top layer it is and the containers whose layer it is."""
        with self.layers.db.read() as txn:
            itx = ImageTxn(txn)
            layers = txn.all(LayerState.COMPLETE)
            tops: dict[str, list[str]] = {}
            for row in itx.images():
                if row.top_layer is not None:
                    label = ", ".join(row.names) if row.names else row.id.partition(":")[2][:12]
                    tops.setdefault(row.top_layer, []).append(label)
            ctrs: dict[str, list[str]] = {}
            for c in itx.containers():
                ctrs.setdefault(c.layer_id, []).append(c.name)
        ids = {la.id for la in layers}
        kids: dict[str | None, list[Layer]] = {}
        for la in layers:
            kids.setdefault(la.parent if la.parent in ids else None, []).append(la)
        out: list[TreeNode] = []
        stack = [(la, 0) for la in reversed(kids.get(None, []))]
        while stack:
            la, depth = stack.pop()
            out.append(TreeNode(la, depth, tuple(tops.get(la.id, ())), tuple(ctrs.get(la.id, ()))))
            stack.extend((k, depth + 1) for k in reversed(kids.get(la.id, [])))
        return out

    def check(self, *, repair: bool = False, verify_content: bool = False) -> ImageCheckReport:
        """Every inconsistency of the images, containers and leases, and the layer store's
        ``check``; with ``repair``, fix what can be (see :mod:`graphdriver.images.checking`)."""
        from graphdriver.images.checking import check

        return check(self, repair=repair, verify_content=verify_content)

    def chain_of(self, image: Image) -> list[str]:
        """The chain IDs of an image's layers, bottom first."""
        return chain_ids(image.diff_ids)
