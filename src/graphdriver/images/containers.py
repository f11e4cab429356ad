"""Containers: a named read-write layer on an image's top layer, and ``commit``.

- :func:`create_container`: the layer is created (:meth:`LayerStore.create_layer`) on the image's
  top layer under a lease, then recorded with its name and image in one transaction; a failure
  in between removes the layer again.
- :func:`remove_container`: refused while the container's layer is mounted; the record goes
  first, then the layer.
- :func:`commit`: the container's changes (:meth:`LayerStore.diff`, an OCI layer tar with
  whiteouts) are spooled into the staging area while their digest is computed, then imported as
  a new image layer on the image's top layer (:meth:`LayerStore.import_layer`, with that digest
  as the expected diff ID), and a new image is recorded: the old config with the new diff ID
  appended to ``rootfs.diff_ids``, a history entry, a new ``created`` time, and a manifest that
  describes the layers as uncompressed tars.

Mounting and unmounting a container are its layer's (:meth:`ImageStore.mount_container`).
"""

from __future__ import annotations

import copy
import hashlib
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from graphdriver.errors import AlreadyExists, Busy, InvalidArchive, InvalidArgument, NotFound
from graphdriver.images.importer import record_image
from graphdriver.images.manifests import MT_OCI_CONFIG, canonical_json, load_json, parse_config
from graphdriver.images.records import ImageTxn
from graphdriver.images.references import parse_reference
from graphdriver.images.sources import ResolvedImage, sha256_digest
from graphdriver.layers.digests import chain_ids, new_layer_id

if TYPE_CHECKING:
    from graphdriver.images.imagestore import Container, Image, ImageStore

__all__ = ["commit", "create_container", "remove_container", "validate_container_name"]

_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}")
_CHUNK = 1 << 20


def validate_container_name(name: str) -> str:
    """A container name: 1-128 of ``[a-zA-Z0-9_.-]``, starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"invalid container name {name!r}: use 1-128 of [a-zA-Z0-9_.-], starting with a letter or digit"
        )
    return name


def create_container(images: ImageStore, image_ref: str, name: str) -> Container:
    """Create container ``name``: a read-write layer on image ``image_ref``'s top layer."""
    name = validate_container_name(name)
    image = images.get(image_ref)
    with images.layers.db.read() as txn:
        if ImageTxn(txn).container(name) is not None:
            raise AlreadyExists(f"container name {name!r} is already in use")
    layer_id = new_layer_id()
    claims = [layer_id] + ([image.top_layer] if image.top_layer is not None else [])
    created = False
    try:
        with images.lease(claims):
            images.layers.create_layer(image.top_layer, id=layer_id, read_write=True)
            created = True
            with images.layers.write() as txn:
                ImageTxn(txn).insert_container(name, layer_id, image.id)
    except BaseException:
        if created:
            try:
                images.collect([layer_id])
            except Exception:
                pass
        raise
    return images.container(name)


def remove_container(images: ImageStore, name: str) -> None:
    """Remove a container and its layer (Busy while the layer is mounted)."""
    c = images.container(name)
    layer = images.layers.get(c.layer_id)
    if layer.mount_count > 0 and images.layers.mount_alive(layer):
        raise Busy(f"container {name!r} is mounted ({layer.mount_count} mount(s)); unmount it first")
    with images.layers.write() as txn:
        ImageTxn(txn).delete_container(name)
    try:
        images.layers.remove(c.layer_id)
    except NotFound:
        pass
    except Busy:
        with images.layers.write() as txn:
            ImageTxn(txn).insert_container(name, c.layer_id, c.image_id)
        raise


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _new_config(image: Image, diff_id: str, *, message: str | None, author: str | None) -> bytes:
    doc = load_json(image.config, f"config of image {image.id}")
    if not isinstance(doc, dict):
        raise InvalidArchive(f"config of image {image.id} is not a JSON object")
    cfg: dict[str, Any] = copy.deepcopy(doc)
    now = _now()
    cfg["rootfs"] = {"type": "layers", "diff_ids": [*image.diff_ids, diff_id]}
    history = cfg.get("history")
    entry: dict[str, Any] = {"created": now, "created_by": "graphdriver commit"}
    if message:
        entry["comment"] = message
    if author:
        entry["author"] = author
        cfg["author"] = author
    cfg["history"] = [*(history if isinstance(history, list) else []), entry]
    cfg["created"] = now
    return canonical_json(cfg)


def commit(
    images: ImageStore,
    container: str,
    name: str | None = None,
    *,
    message: str | None = None,
    author: str | None = None,
) -> Image:
    """Turn container ``container``'s changes into a new image layer and a new image named
    ``name`` (a ``name:tag`` reference; None: no name)."""
    names = []
    if name is not None:
        ref = parse_reference(name)
        if ref.digest is not None:
            raise InvalidArgument(f"an image name cannot hold a digest: {name}")
        names.append(str(ref))
    c = images.container(container)
    image = images.get(c.image_id)
    store = images.layers
    with store.staging() as tmp:
        spool = tmp / "diff.tar"
        h = hashlib.sha256()
        with store.diff(c.layer_id) as stream, open(spool, "xb") as out:
            while chunk := stream.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
        diff_id = "sha256:" + h.hexdigest()
        config = _new_config(image, diff_id, message=message, author=author)
        chain = chain_ids([*image.diff_ids, diff_id])
        created: list[str] = []
        try:
            with images.lease(chain):
                had = store.by_chain_id(chain[-1])
                with open(spool, "rb") as f:
                    layer = store.import_layer(f, image.top_layer, expected_diff_id=diff_id)
                if had is None:
                    created.append(layer.id)
                resolved = ResolvedImage(
                    config=parse_config(config, "new config"),
                    config_digest=sha256_digest(config),
                    config_media_type=MT_OCI_CONFIG,
                    manifest=None,
                    manifest_digest=None,
                    manifest_media_type=None,
                    layers=(),
                    names=(),
                )
                return record_image(images, resolved, layer.id, names)
        except BaseException:
            if created:
                try:
                    images.collect(created)
                except Exception:
                    pass
            raise
    raise AssertionError("unreachable")  # pragma: no cover
