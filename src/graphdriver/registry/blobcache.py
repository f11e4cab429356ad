"""What this store knows about blobs in registries (a "blob info cache", as containers/image has).

``<store root>/registry-blobs.db`` (SQLite) remembers, from every pull and push:

- ``blobs(digest, media_type, diff_id)``: a compressed layer blob and the uncompressed tar it
  holds, so a push finds a blob it can offer for a layer without compressing anything;
- ``locations(digest, registry, repository)``: where that blob was seen, so a push to another
  repository of the same registry mounts it (``POST ?mount=&from=``) instead of uploading it.

It is a cache: losing it costs only work, every entry is checked with the registry (``HEAD``,
or the mount answer) before it is relied on, and every error here is ignored.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["BlobCache"]

FILENAME = "registry-blobs.db"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY NOT NULL,
    media_type TEXT NOT NULL,
    diff_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS blobs_diff_id ON blobs(diff_id);
CREATE TABLE IF NOT EXISTS locations (
    digest TEXT NOT NULL,
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    seen_ns INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (digest, registry, repository)
);
"""


class BlobCache:
    """The cache in one store root. Thread-safe; every method is best effort."""

    def __init__(self, root: Path) -> None:
        self.path = root / FILENAME
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection | None:
        if self._db is None:
            try:
                db = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
                self._db = db
            except sqlite3.Error:
                return None
        return self._db

    @contextlib.contextmanager
    def _use(self) -> Iterator[sqlite3.Connection | None]:
        with self._lock:
            try:
                yield self._conn()
            except sqlite3.Error:
                pass

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> BlobCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(self, digest: str, media_type: str, diff_id: str, registry: str, repository: str) -> None:
        """A blob of ``media_type`` holding the tar ``diff_id`` is in ``registry/repository``."""
        import time

        with self._use() as db:
            if db is None:
                return
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT INTO blobs(digest, media_type, diff_id) VALUES (?, ?, ?)"
                    " ON CONFLICT(digest) DO UPDATE"
                    " SET media_type=excluded.media_type, diff_id=excluded.diff_id",
                    (digest, media_type, diff_id),
                )
                db.execute(
                    "INSERT INTO locations(digest, registry, repository, seen_ns) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT DO UPDATE SET seen_ns=excluded.seen_ns",
                    (digest, registry, repository, time.time_ns()),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def learn(self, digest: str, media_type: str, diff_id: str) -> None:
        """A blob of ``media_type`` holds the tar ``diff_id`` (where it is, is not known)."""
        with self._use() as db:
            if db is not None:
                db.execute(
                    "INSERT INTO blobs(digest, media_type, diff_id) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    (digest, media_type, diff_id),
                )

    def forget(self, digest: str, registry: str, repository: str) -> None:
        """The registry said it does not have the blob there (any more)."""
        with self._use() as db:
            if db is not None:
                db.execute(
                    "DELETE FROM locations WHERE digest=? AND registry=? AND repository=?",
                    (digest, registry, repository),
                )

    def candidates(self, diff_id: str) -> list[tuple[str, str]]:
        """Known blobs (digest, media type) of the tar ``diff_id``, most recently seen first."""
        with self._use() as db:
            if db is None:
                return []
            rows = db.execute(
                "SELECT b.digest, b.media_type FROM blobs b LEFT JOIN locations l ON l.digest = b.digest"
                " WHERE b.diff_id=? GROUP BY b.digest ORDER BY MAX(COALESCE(l.seen_ns, 0)) DESC",
                (diff_id,),
            ).fetchall()
            return [(str(d), str(m)) for d, m in rows]
        return []

    def repositories(self, digest: str, registry: str) -> list[str]:
        """Repositories of ``registry`` where ``digest`` was seen, most recent first."""
        with self._use() as db:
            if db is None:
                return []
            rows = db.execute(
                "SELECT repository FROM locations WHERE digest=? AND registry=? ORDER BY seen_ns DESC",
                (digest, registry),
            ).fetchall()
            return [str(r[0]) for r in rows]
        return []
