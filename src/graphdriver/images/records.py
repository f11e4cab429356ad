"""The image, container and lease records, in the layer store's database (schema version 2).

The tables are drawn in :mod:`graphdriver.layers.metadata`. :class:`ImageTxn` wraps the store's
:class:`~graphdriver.layers.metadata.Txn`: every query of this package is one of its methods, and
runs inside the transaction the caller opened (``store.db.read()`` / ``store.write()``), so an
image and its names, or a container and its layer, change together or not at all.

- An image's id is the digest of its config; ``top_layer`` is the store id of its top layer (None
  for an image without layers), whose parent chain is the image's stack.
- ``image_manifests`` keeps every manifest the image was imported with (an image reached through a
  gzip and an uncompressed manifest has two), so it can be found by either digest.
- Names are normalised references (:mod:`graphdriver.images.references`); a name belongs to one
  image, and giving it to another image moves it, as ``docker tag`` and ``docker load`` do.
- A container is a name, its read-write layer and the image it was created from.
- A lease (``leases``) is a running operation's claim on layers it is about to use, by chain ID
  or layer id; it is alive while its lock file is held (:meth:`LayerStore.lease_alive`), so a
  crashed operation's lease is simply ignored, and deleted by the next cleanup.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from graphdriver.errors import AlreadyExists, NotFound
from graphdriver.layers.metadata import Txn

__all__ = ["ContainerRow", "ImageRow", "ImageTxn", "ManifestRow"]


@dataclass(frozen=True)
class ImageRow:
    id: str
    top_layer: str | None
    config: bytes
    created: datetime
    names: tuple[str, ...]
    manifest_digests: tuple[str, ...]


@dataclass(frozen=True)
class ManifestRow:
    digest: str
    image_id: str
    media_type: str
    body: bytes


@dataclass(frozen=True)
class ContainerRow:
    name: str
    layer_id: str
    image_id: str
    created: datetime


def _time(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)


class ImageTxn:
    """The image queries, inside one open transaction of the layer store."""

    def __init__(self, txn: Txn) -> None:
        self.txn = txn
        self.conn = txn.conn

    # -- images -----------------------------------------------------------------------------------

    def _image(self, row: tuple[object, ...]) -> ImageRow:
        image_id, top, config, created = row
        assert isinstance(image_id, str) and isinstance(created, int)
        names = tuple(
            r[0]
            for r in self.conn.execute(
                "SELECT name FROM image_names WHERE image_id = ? ORDER BY name", (image_id,)
            )
        )
        digests = tuple(
            r[0]
            for r in self.conn.execute(
                "SELECT digest FROM image_manifests WHERE image_id = ? ORDER BY created_ns, digest",
                (image_id,),
            )
        )
        return ImageRow(
            id=image_id,
            top_layer=top if isinstance(top, str) else None,
            config=bytes(config) if isinstance(config, (bytes, bytearray, memoryview)) else b"",
            created=_time(created),
            names=names,
            manifest_digests=digests,
        )

    def image(self, image_id: str) -> ImageRow | None:
        row = self.conn.execute(
            "SELECT id, top_layer, config, created_ns FROM images WHERE id = ?", (image_id,)
        ).fetchone()
        return None if row is None else self._image(row)

    def images(self) -> list[ImageRow]:
        rows = self.conn.execute(
            "SELECT id, top_layer, config, created_ns FROM images ORDER BY created_ns, id"
        )
        return [self._image(r) for r in rows.fetchall()]

    def image_by_name(self, name: str) -> ImageRow | None:
        row = self.conn.execute("SELECT image_id FROM image_names WHERE name = ?", (name,)).fetchone()
        return None if row is None else self.image(row[0])

    def image_by_manifest(self, digest: str) -> ImageRow | None:
        row = self.conn.execute("SELECT image_id FROM image_manifests WHERE digest = ?", (digest,)).fetchone()
        return None if row is None else self.image(row[0])

    def image_ids_with_prefix(self, hex_prefix: str) -> list[str]:
        """Ids whose hex part starts with ``hex_prefix`` (already validated as hex)."""
        rows = self.conn.execute(
            "SELECT id FROM images WHERE substr(id, instr(id, ':') + 1, ?) = ? ORDER BY id",
            (len(hex_prefix), hex_prefix),
        )
        return [r[0] for r in rows]

    def insert_image(self, image_id: str, top_layer: str | None, config: bytes) -> bool:
        """Record an image; False if it exists already (then nothing changes)."""
        if self.image(image_id) is not None:
            return False
        if top_layer is not None and self.txn.get(top_layer) is None:
            raise NotFound(f"layer {top_layer} vanished before image {image_id} was recorded")
        self.conn.execute(
            "INSERT INTO images (id, top_layer, config, created_ns) VALUES (?, ?, ?, ?)",
            (image_id, top_layer, config, time.time_ns()),
        )
        return True

    def delete_image(self, image_id: str) -> None:
        """Delete an image with its names and manifests (refused while containers use it)."""
        users = self.containers_of(image_id)
        if users:
            from graphdriver.errors import Busy

            raise Busy(f"image {image_id} is used by container(s) {', '.join(repr(u) for u in users)}")
        self.conn.execute("DELETE FROM images WHERE id = ?", (image_id,))

    def add_manifest(self, image_id: str, digest: str, media_type: str, body: bytes) -> None:
        owner = self.conn.execute(
            "SELECT image_id FROM image_manifests WHERE digest = ?", (digest,)
        ).fetchone()
        if owner is not None:
            if owner[0] != image_id:
                raise AlreadyExists(f"manifest {digest} already belongs to image {owner[0]}")
            return
        self.conn.execute(
            "INSERT INTO image_manifests (digest, image_id, media_type, body, created_ns)"
            " VALUES (?, ?, ?, ?, ?)",
            (digest, image_id, media_type, body, time.time_ns()),
        )

    def manifests(self, image_id: str) -> list[ManifestRow]:
        rows = self.conn.execute(
            "SELECT digest, image_id, media_type, body FROM image_manifests WHERE image_id = ?"
            " ORDER BY created_ns, digest",
            (image_id,),
        )
        return [ManifestRow(r[0], r[1], r[2], bytes(r[3])) for r in rows]

    def set_names(self, image_id: str, names: Iterable[str]) -> list[tuple[str, str]]:
        """Give ``image_id`` these names, taking each from the image that had it.
        Returns (name, previous image) for every name that moved."""
        moved = []
        for name in names:
            row = self.conn.execute("SELECT image_id FROM image_names WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] == image_id:
                continue
            if row is not None:
                moved.append((name, str(row[0])))
                self.conn.execute("UPDATE image_names SET image_id = ? WHERE name = ?", (image_id, name))
            else:
                self.conn.execute("INSERT INTO image_names (name, image_id) VALUES (?, ?)", (name, image_id))
        return moved

    def remove_name(self, name: str) -> None:
        self.conn.execute("DELETE FROM image_names WHERE name = ?", (name,))

    def top_layers(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT top_layer FROM images WHERE top_layer IS NOT NULL")}

    # -- containers -------------------------------------------------------------------------------

    def _container(self, row: tuple[object, ...]) -> ContainerRow:
        name, layer_id, image_id, created = row
        assert isinstance(name, str) and isinstance(layer_id, str) and isinstance(image_id, str)
        assert isinstance(created, int)
        return ContainerRow(name, layer_id, image_id, _time(created))

    def container(self, name: str) -> ContainerRow | None:
        row = self.conn.execute(
            "SELECT name, layer_id, image_id, created_ns FROM containers WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else self._container(row)

    def containers(self) -> list[ContainerRow]:
        rows = self.conn.execute(
            "SELECT name, layer_id, image_id, created_ns FROM containers ORDER BY created_ns, name"
        )
        return [self._container(r) for r in rows.fetchall()]

    def containers_of(self, image_id: str) -> list[str]:
        rows = self.conn.execute("SELECT name FROM containers WHERE image_id = ? ORDER BY name", (image_id,))
        return [r[0] for r in rows]

    def insert_container(self, name: str, layer_id: str, image_id: str) -> None:
        if self.container(name) is not None:
            raise AlreadyExists(f"container name {name!r} is already in use")
        if self.image(image_id) is None:
            raise NotFound(f"image {image_id} was removed while the container was being created")
        self.conn.execute(
            "INSERT INTO containers (name, layer_id, image_id, created_ns) VALUES (?, ?, ?, ?)",
            (name, layer_id, image_id, time.time_ns()),
        )

    def delete_container(self, name: str) -> None:
        self.conn.execute("DELETE FROM containers WHERE name = ?", (name,))

    def container_layers(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT layer_id FROM containers")}

    # -- leases -----------------------------------------------------------------------------------

    def add_lease(self, lease: str, targets: Iterable[str]) -> None:
        self.conn.executemany(
            "INSERT OR IGNORE INTO leases (lease, target) VALUES (?, ?)", [(lease, t) for t in targets]
        )

    def delete_lease(self, lease: str) -> None:
        self.conn.execute("DELETE FROM leases WHERE lease = ?", (lease,))

    def leases(self) -> dict[str, set[str]]:
        """Every lease and its targets (alive or not)."""
        out: dict[str, set[str]] = {}
        for lease, target in self.conn.execute("SELECT lease, target FROM leases"):
            out.setdefault(lease, set()).add(target)
        return out
