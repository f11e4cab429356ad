"""The layer store's metadata: one SQLite database, one transaction per change.

``<root>/layers.db`` (stdlib :mod:`sqlite3`) holds every layer's record and its names. It runs in
WAL mode with ``synchronous=FULL`` (a commit is on disk when it returns), foreign keys on, and a
busy timeout; ``PRAGMA user_version`` is the schema version. Writers go through
:meth:`MetadataDB.write` (``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any exception),
readers through :meth:`MetadataDB.read`; both hand out an explicit :class:`Txn` and every data
function is a method of it, so no query runs outside a transaction.

Schema (version 1, the layers; version 2 adds the images tables)::

    layers(id PK, parent -> layers.id, kind image|container, state incomplete|complete|removing,
           chain_id, diff_id, compressed_digest, compressed_size, uncompressed_size,
           size, created_ns, mount_count >= 0, mount_point, mount_kind mount|plain, mount_boot,
           mount_pending get|put)
      unique (chain_id) among complete layers
    names(name PK, layer_id -> layers.id ON DELETE CASCADE)
    meta(key PK, value)          "driver": the driver the store was created with

    -- version 2: images on top of the layers (graphdriver.images.records)
    images(id PK = config digest, top_layer -> layers.id, config BLOB, created_ns)
    image_names(name PK, image_id -> images.id ON DELETE CASCADE)
    image_manifests(digest PK, image_id -> images.id ON DELETE CASCADE, media_type, body BLOB,
                    created_ns)
    containers(name PK, layer_id UNIQUE -> layers.id, image_id -> images.id, created_ns)
    leases(lease, target)        a running operation's claim on layers it is about to use: a
                                 chain ID or a layer id; alive while locks/lease-<lease>.lock
                                 is held (graphdriver.layers.store.LayerStore.lease_alive)

A mount count is believed only while the kernel agrees: ``mount_kind`` says whether the driver
mounted something at ``mount_point`` (checked against the mount table) or handed out a plain
directory, and ``mount_boot`` is the boot id it was counted in (a reboot resets every count).
``mount_pending`` is written before the driver is asked to mount (``get``) or to release its last
mount (``put``) and cleared with the new count, so a process that dies in between leaves a mark
that recovery settles (it releases the driver's get) instead of a count nobody can drop.

The invariants live here, once: a parent must be complete to get a child, a name belongs to one
layer, a chain ID to one complete layer (:class:`~graphdriver.errors.AlreadyExists` otherwise),
and a layer with children cannot be deleted (the foreign key refuses it). A layer an image, a
container or a live lease uses cannot be removed either (:meth:`Txn.layer_users`).
"""

from __future__ import annotations

import enum
import errno
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from graphdriver.errors import AlreadyExists, Busy, InvalidArgument, NotFound, NotSupported, StoreCorrupt

__all__ = ["SCHEMA_VERSION", "Layer", "LayerKind", "LayerState", "MetadataDB", "Txn", "validate_name"]

SCHEMA_VERSION = 2
BUSY_TIMEOUT_S = 60.0

_SCHEMA_V1 = """
CREATE TABLE layers (
    id                TEXT PRIMARY KEY NOT NULL,
    parent            TEXT REFERENCES layers(id),
    kind              TEXT NOT NULL CHECK (kind IN ('image', 'container')),
    state             TEXT NOT NULL CHECK (state IN ('incomplete', 'complete', 'removing')),
    chain_id          TEXT,
    diff_id           TEXT,
    compressed_digest TEXT,
    compressed_size   INTEGER,
    uncompressed_size INTEGER,
    size              INTEGER NOT NULL DEFAULT 0,
    created_ns        INTEGER NOT NULL,
    mount_count       INTEGER NOT NULL DEFAULT 0 CHECK (mount_count >= 0),
    mount_point       TEXT,
    mount_kind        TEXT CHECK (mount_kind IN ('mount', 'plain')),
    mount_boot        TEXT,
    mount_pending     TEXT CHECK (mount_pending IN ('get', 'put'))
);
CREATE UNIQUE INDEX layers_chain_id ON layers(chain_id) WHERE state = 'complete' AND chain_id IS NOT NULL;
CREATE INDEX layers_parent ON layers(parent);
CREATE TABLE names (
    name     TEXT PRIMARY KEY NOT NULL,
    layer_id TEXT NOT NULL REFERENCES layers(id) ON DELETE CASCADE
);
CREATE INDEX names_layer ON names(layer_id);
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
"""

_SCHEMA_V2 = """
CREATE TABLE images (
    id         TEXT PRIMARY KEY NOT NULL,
    top_layer  TEXT REFERENCES layers(id),
    config     BLOB NOT NULL,
    created_ns INTEGER NOT NULL
);
CREATE INDEX images_top_layer ON images(top_layer);
CREATE TABLE image_names (
    name     TEXT PRIMARY KEY NOT NULL,
    image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE
);
CREATE INDEX image_names_image ON image_names(image_id);
CREATE TABLE image_manifests (
    digest     TEXT PRIMARY KEY NOT NULL,
    image_id   TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    media_type TEXT NOT NULL,
    body       BLOB NOT NULL,
    created_ns INTEGER NOT NULL
);
CREATE INDEX image_manifests_image ON image_manifests(image_id);
CREATE TABLE containers (
    name       TEXT PRIMARY KEY NOT NULL,
    layer_id   TEXT NOT NULL UNIQUE REFERENCES layers(id),
    image_id   TEXT NOT NULL REFERENCES images(id),
    created_ns INTEGER NOT NULL
);
CREATE INDEX containers_image ON containers(image_id);
CREATE TABLE leases (
    lease  TEXT NOT NULL,
    target TEXT NOT NULL,
    PRIMARY KEY (lease, target)
);
CREATE INDEX leases_target ON leases(target);
"""

_MIGRATIONS: dict[int, str] = {1: _SCHEMA_V1, 2: _SCHEMA_V2}
"""Script that takes the schema from version n-1 to n."""


class LayerKind(enum.StrEnum):
    IMAGE = "image"
    """an image layer: read-only content, shared by chain ID"""
    CONTAINER = "container"
    """a container's read-write layer"""


class LayerState(enum.StrEnum):
    INCOMPLETE = "incomplete"
    """recorded before any work; never listed; deleted by recovery if its builder died"""
    COMPLETE = "complete"
    REMOVING = "removing"
    """marked before its data is deleted; recovery finishes the removal"""


@dataclass(frozen=True)
class Layer:
    """One layer's record. Sizes are bytes; ``size`` is the layer's own change size, recorded
    when it was committed, so listings and ``df`` never walk a tree."""

    id: str
    parent: str | None
    kind: LayerKind
    state: LayerState
    created: datetime
    chain_id: str | None = None
    diff_id: str | None = None
    compressed_digest: str | None = None
    compressed_size: int | None = None
    uncompressed_size: int | None = None
    size: int = 0
    names: tuple[str, ...] = ()
    mount_count: int = 0
    mount_point: str | None = None
    mount_kind: str | None = None
    mount_boot: str | None = None
    mount_pending: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parent": self.parent,
            "kind": str(self.kind),
            "state": str(self.state),
            "created": self.created.isoformat().replace("+00:00", "Z"),
            "chain_id": self.chain_id,
            "diff_id": self.diff_id,
            "compressed_digest": self.compressed_digest,
            "compressed_size": self.compressed_size,
            "uncompressed_size": self.uncompressed_size,
            "size": self.size,
            "names": list(self.names),
            "mount_count": self.mount_count,
            "mount_point": self.mount_point,
        }


def validate_name(name: str) -> str:
    """A layer name: 1-255 printable characters, no leading or trailing space."""
    if (
        not isinstance(name, str)
        or not 0 < len(name) <= 255
        or not name.isprintable()
        or name != name.strip()
    ):
        raise InvalidArgument(f"invalid layer name {name!r}: use 1-255 printable characters")
    return name


_COLUMNS = (
    "id, parent, kind, state, chain_id, diff_id, compressed_digest, compressed_size, "
    "uncompressed_size, size, created_ns, mount_count, mount_point, mount_kind, mount_boot, mount_pending"
)


def _now_ns() -> int:
    return time.time_ns()


@dataclass
class Txn:
    """An open transaction; every query of the store is a method of one."""

    conn: sqlite3.Connection
    writable: bool

    # -- reading ----------------------------------------------------------------------------------

    def _names(self, layer_id: str) -> tuple[str, ...]:
        rows = self.conn.execute("SELECT name FROM names WHERE layer_id = ? ORDER BY name", (layer_id,))
        return tuple(r[0] for r in rows)

    def _layer(self, row: tuple[Any, ...], names: tuple[str, ...] | None = None) -> Layer:
        (
            lid,
            parent,
            kind,
            state,
            chain,
            diff,
            cdig,
            csize,
            usize,
            size,
            created,
            mcount,
            mpoint,
            mkind,
            mboot,
            mpending,
        ) = row
        return Layer(
            id=lid,
            parent=parent,
            kind=LayerKind(kind),
            state=LayerState(state),
            created=datetime.fromtimestamp(created / 1e9, UTC),
            chain_id=chain,
            diff_id=diff,
            compressed_digest=cdig,
            compressed_size=csize,
            uncompressed_size=usize,
            size=size,
            names=self._names(lid) if names is None else names,
            mount_count=mcount,
            mount_point=mpoint,
            mount_kind=mkind,
            mount_boot=mboot,
            mount_pending=mpending,
        )

    def get(self, layer_id: str) -> Layer | None:
        row = self.conn.execute(f"SELECT {_COLUMNS} FROM layers WHERE id = ?", (layer_id,)).fetchone()
        return None if row is None else self._layer(row)

    def resolve(self, id_or_name: str) -> Layer | None:
        """The layer whose id, else whose name, is ``id_or_name``."""
        found = self.get(id_or_name)
        if found is not None:
            return found
        row = self.conn.execute("SELECT layer_id FROM names WHERE name = ?", (id_or_name,)).fetchone()
        return None if row is None else self.get(row[0])

    def all(self, *states: LayerState) -> list[Layer]:
        """Every layer (in the given states), oldest first."""
        names: dict[str, list[str]] = {}
        for name, lid in self.conn.execute("SELECT name, layer_id FROM names ORDER BY name"):
            names.setdefault(lid, []).append(name)
        sql = f"SELECT {_COLUMNS} FROM layers"
        args: tuple[str, ...] = ()
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args = tuple(str(s) for s in states)
        sql += " ORDER BY created_ns, id"
        return [self._layer(r, tuple(names.get(r[0], ()))) for r in self.conn.execute(sql, args)]

    def by_chain_id(self, chain_id: str) -> Layer | None:
        """The complete layer with ``chain_id``."""
        row = self.conn.execute(
            f"SELECT {_COLUMNS} FROM layers WHERE chain_id = ? AND state = 'complete'", (chain_id,)
        ).fetchone()
        return None if row is None else self._layer(row)

    def children(self, layer_id: str) -> list[str]:
        return [
            r[0] for r in self.conn.execute("SELECT id FROM layers WHERE parent = ? ORDER BY id", (layer_id,))
        ]

    def name_owner(self, name: str) -> str | None:
        row = self.conn.execute("SELECT layer_id FROM names WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def layer_users(self, layer: Layer) -> tuple[list[str], list[str]]:
        """Who uses ``layer`` directly: descriptions of the images and containers that refer to
        it, and the ids of the leases that claim it (by its id or its chain ID; whether they
        are alive is the store's question)."""
        users = [
            f"image {r[0]}"
            for r in self.conn.execute("SELECT id FROM images WHERE top_layer = ? ORDER BY id", (layer.id,))
        ]
        users += [
            f"container {r[0]!r}"
            for r in self.conn.execute(
                "SELECT name FROM containers WHERE layer_id = ? ORDER BY name", (layer.id,)
            )
        ]
        targets = [layer.id] if layer.chain_id is None else [layer.id, layer.chain_id]
        leases = [
            str(r[0])
            for r in self.conn.execute(
                f"SELECT DISTINCT lease FROM leases WHERE target IN ({','.join('?' * len(targets))})"
                " ORDER BY lease",
                targets,
            )
        ]
        return users, leases

    # -- writing ----------------------------------------------------------------------------------

    def _need_write(self) -> None:
        if not self.writable:
            raise RuntimeError("write in a read-only transaction")

    def insert(
        self,
        layer_id: str,
        parent: str | None,
        kind: LayerKind,
        *,
        chain_id: str | None = None,
        parent_in_build: bool = False,
    ) -> None:
        """Record a new ``incomplete`` layer. The parent must exist and be complete, or with
        ``parent_in_build`` be an ``incomplete`` layer that the same caller builds (its lock
        held: a stack imported at once). Recovery removes a crashed stack deepest first by
        these parent links."""
        self._need_write()
        if self.get(layer_id) is not None:
            raise AlreadyExists(f"layer {layer_id} already exists")
        if self.name_owner(layer_id) is not None:
            raise AlreadyExists(f"{layer_id} is already the name of a layer")
        if parent is not None:
            p = self.get(parent)
            wanted = LayerState.INCOMPLETE if parent_in_build else LayerState.COMPLETE
            if p is None or p.state is not wanted:
                raise NotFound(f"parent layer {parent} not found")
        self.conn.execute(
            "INSERT INTO layers (id, parent, kind, state, chain_id, created_ns) VALUES (?, ?, ?, ?, ?, ?)",
            (layer_id, parent, str(kind), str(LayerState.INCOMPLETE), chain_id, _now_ns()),
        )

    def add_names(self, layer_id: str, names: Iterable[str]) -> None:
        self._need_write()
        for name in names:
            validate_name(name)
            owner = self.name_owner(name)
            if owner == layer_id:
                continue
            if owner is not None:
                raise AlreadyExists(f"name {name!r} is already used by layer {owner}")
            if self.get(name) is not None:
                raise AlreadyExists(f"name {name!r} is the id of another layer")
            self.conn.execute("INSERT INTO names (name, layer_id) VALUES (?, ?)", (name, layer_id))

    def remove_names(self, layer_id: str, names: Iterable[str]) -> None:
        self._need_write()
        for name in names:
            self.conn.execute("DELETE FROM names WHERE name = ? AND layer_id = ?", (name, layer_id))

    def complete(
        self,
        layer_id: str,
        *,
        size: int,
        chain_id: str | None = None,
        diff_id: str | None = None,
        compressed_digest: str | None = None,
        compressed_size: int | None = None,
        uncompressed_size: int | None = None,
    ) -> None:
        """Mark an incomplete layer complete with what was measured while building it.
        AlreadyExists if another complete layer has ``chain_id``."""
        self._need_write()
        if chain_id is not None:
            other = self.by_chain_id(chain_id)
            if other is not None and other.id != layer_id:
                raise AlreadyExists(f"chain ID {chain_id} is already layer {other.id}")
        cur = self.conn.execute(
            "UPDATE layers SET state = 'complete', size = ?, chain_id = ?, diff_id = ?,"
            " compressed_digest = ?, compressed_size = ?, uncompressed_size = ?"
            " WHERE id = ? AND state = 'incomplete'",
            (size, chain_id, diff_id, compressed_digest, compressed_size, uncompressed_size, layer_id),
        )
        if cur.rowcount != 1:
            raise StoreCorrupt(f"layer {layer_id} vanished or changed state while it was being built")

    def set_state(self, layer_id: str, state: LayerState) -> None:
        self._need_write()
        self.conn.execute("UPDATE layers SET state = ? WHERE id = ?", (str(state), layer_id))

    def set_size(self, layer_id: str, size: int) -> None:
        self._need_write()
        self.conn.execute("UPDATE layers SET size = ? WHERE id = ?", (size, layer_id))

    def set_mount(
        self,
        layer_id: str,
        count: int,
        point: str | None = None,
        kind: str | None = None,
        boot: str | None = None,
    ) -> None:
        """Record ``count`` gets of a layer, mounted (``kind``) at ``point`` during boot ``boot``;
        clears a pending mark."""
        self._need_write()
        if count == 0:
            point = kind = boot = None
        self.conn.execute(
            "UPDATE layers SET mount_count = ?, mount_point = ?, mount_kind = ?, mount_boot = ?,"
            " mount_pending = NULL WHERE id = ?",
            (count, point, kind, boot, layer_id),
        )

    def set_mount_pending(self, layer_id: str, pending: str | None) -> None:
        """Mark that the driver is being asked to ``get`` (mount) or ``put`` (release its last
        mount) the layer, or clear the mark."""
        self._need_write()
        self.conn.execute("UPDATE layers SET mount_pending = ? WHERE id = ?", (pending, layer_id))

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._need_write()
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def delete(self, layer_id: str) -> None:
        """Delete the record (and its names). Refused (Busy) while it has children."""
        self._need_write()
        kids = self.children(layer_id)
        if kids:
            raise Busy(f"layer {layer_id} has {len(kids)} child layer(s)")
        self.conn.execute("DELETE FROM layers WHERE id = ?", (layer_id,))


_ENVIRONMENT_ERRNOS = {
    "SQLITE_FULL": errno.ENOSPC,
    "SQLITE_READONLY": errno.EROFS,
    "SQLITE_IOERR": errno.EIO,
}
"""SQLite result codes (primary, by name) that describe the machine, not the database: the
operation failed and can be retried once the cause is gone, so they are :class:`OSError`, never
:class:`StoreCorrupt` (which sends the user to ``check --repair``)."""


def _wrap(exc: sqlite3.Error, db: Path) -> Exception:
    text = str(exc)
    name = str(getattr(exc, "sqlite_errorname", "") or "")
    for prefix, code in _ENVIRONMENT_ERRNOS.items():
        if name == prefix or name.startswith(prefix + "_"):
            return OSError(code, f"{db}: {text}")
    if isinstance(exc, sqlite3.OperationalError) and "locked" in text:
        return Busy(f"{db}: {text} (another process held it past the {BUSY_TIMEOUT_S:.0f} s busy timeout)")
    if isinstance(exc, sqlite3.IntegrityError):
        return StoreCorrupt(f"{db}: constraint violated: {text}")
    return StoreCorrupt(f"{db}: {text}")


def _create_private(path: Path) -> None:
    """Create the database file 0600 (SQLite would use the umask).

    Only ever for a file that does not exist yet: an existing database file must never be
    opened outside SQLite, because closing any descriptor of it drops the POSIX locks of every
    connection of this process, and another process may then delete the WAL under them.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return  # created by another process meanwhile
    os.close(fd)


class MetadataDB:
    """The open database. Thread-safe: one connection, used by one transaction at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mutex = threading.RLock()
        try:
            if not os.path.lexists(path):
                _create_private(path)
            self.conn = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreCorrupt(f"cannot open {path}: {exc}") from exc
        try:
            self.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreCorrupt(f"{path}: cannot switch to WAL mode (journal_mode is {mode})")
            self.conn.execute("PRAGMA synchronous = FULL")
            self.conn.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.Error as exc:
            self.conn.close()
            raise _wrap(exc, path) from exc
        except BaseException:
            self.conn.close()
            raise

    def _migrate(self) -> None:
        version = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise NotSupported(
                f"{self.path} has schema version {version}; this graphdriver knows up to {SCHEMA_VERSION}"
            )
        with self.write() as txn:
            version = int(txn.conn.execute("PRAGMA user_version").fetchone()[0])
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[target].split(";"):
                    if statement.strip():
                        txn.conn.execute(statement)
            if version < SCHEMA_VERSION:
                txn.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self, begin: str, writable: bool) -> Iterator[Txn]:
        with self._mutex:
            try:
                self.conn.execute(begin)
            except sqlite3.Error as exc:
                raise _wrap(exc, self.path) from exc
            try:
                yield Txn(self.conn, writable)
            except BaseException:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error as exc:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise _wrap(exc, self.path) from exc

    @contextmanager
    def write(self) -> Iterator[Txn]:
        """A write transaction (``BEGIN IMMEDIATE``): committed if the block returns, else rolled back."""
        try:
            with self._transaction("BEGIN IMMEDIATE", True) as txn:
                yield txn
        except sqlite3.Error as exc:
            raise _wrap(exc, self.path) from exc

    @contextmanager
    def read(self) -> Iterator[Txn]:
        """A read transaction: one consistent snapshot of the database."""
        try:
            with self._transaction("BEGIN", False) as txn:
                yield txn
        except sqlite3.Error as exc:
            raise _wrap(exc, self.path) from exc

    def close(self) -> None:
        with self._mutex:
            self.conn.close()
