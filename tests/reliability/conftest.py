"""Fixtures of the reliability suite: a layer store next to a sentinel tree, and the store oracle.

``driver_name`` runs a test once per driver in :data:`DRIVERS` that works here (the others skip
with the driver's own reason). ``arena`` is a directory holding a planted
:class:`~graphdriver.testing.sentinel.Sentinel` (``victim/``, ``victim-evil/``) and the store root
``store/`` beside it. The ``rk`` fixture carries the helpers (test modules cannot import this file
under ``--import-mode=importlib``):

- ``rk.blob(tar, compression)``: a layer blob with its digest, size and diff ID;
- ``rk.capture(store)`` / ``rk.assert_unchanged(store, before)``: the *store oracle*. A capture
  holds every metadata record (all states, names, mount counts), every path under the store root
  with its type, mode, owner, size, mtime and content (the SQLite files excepted: their bytes
  change with every checkpoint; and ``locks/``), and the mounts below the root. "Unchanged" means
  equal, plus ``check()`` clean, ``staging/`` empty and no lock file but the store's and those of
  layers that exist.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from graphdriver import mount as kmount
from graphdriver.errors import GraphDriverError, NotSupported
from graphdriver.fs.remove import remove_tree
from graphdriver.layers.store import LayerStore
from graphdriver.testing.sentinel import Sentinel
from graphdriver.testing.tarbuild import compress

DRIVERS = ("vfs", "overlay2")
_support: dict[str, str | None] = {}


def driver_unsupported(name: str, scratch: Path) -> str | None:
    """None if driver ``name`` works here, else why not (probed once per session)."""
    if name not in _support:
        from graphdriver.drivers.registry import open_driver

        probe = scratch / f"reliability-probe-{name}"
        try:
            open_driver(probe, name).cleanup()
            _support[name] = None
        except NotSupported as exc:
            _support[name] = exc.reason
        except GraphDriverError as exc:  # pragma: no cover - a broken driver fails elsewhere
            _support[name] = f"driver failed to initialise: {exc}"
        finally:
            release_mounts(probe)
            remove_tree(probe)
    return _support[name]


def release_mounts(root: Path) -> None:
    """Detach everything mounted below ``root`` (teardown)."""
    if root.exists():
        for m in kmount.mounts_under(root):
            kmount.unmount(m.mount_point, detach=True)


@pytest.fixture(params=DRIVERS)
def driver_name(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    name: str = request.param
    reason = driver_unsupported(name, tmp_path_factory.getbasetemp())
    if reason is not None:
        pytest.skip(f"driver {name} does not work here: {reason}")
    return name


@pytest.fixture
def mounting_driver(tmp_path_factory: pytest.TempPathFactory) -> str:
    """overlay2 (a driver whose get() mounts), or skip."""
    reason = driver_unsupported("overlay2", tmp_path_factory.getbasetemp())
    if reason is not None:
        pytest.skip(f"needs a mounting driver; overlay2 does not work here: {reason}")
    return "overlay2"


@dataclass
class Arena:
    """``base/`` with the sentinel and the store root ``base/store``."""

    base: Path
    root: Path
    sentinel: Sentinel


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[Arena]:
    base = tmp_path / "base"
    base.mkdir()
    sentinel = Sentinel(base, exclude=("store",))
    yield Arena(base, base / "store", sentinel)
    release_mounts(tmp_path)


# -- blobs ---------------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """A layer as a registry hands it out: the blob and its descriptor, plus the diff ID."""

    data: bytes
    tar: bytes

    @property
    def digest(self) -> str:
        return sha256(self.data)

    @property
    def diff_id(self) -> str:
        return sha256(self.tar)

    @property
    def size(self) -> int:
        return len(self.data)


def blob(tar: bytes, compression: str = "none") -> Blob:
    return Blob(compress(tar, compression), tar)  # type: ignore[arg-type]


# -- the store oracle ----------------------------------------------------------------------------

_DB_FILES = ("layers.db", "layers.db-wal", "layers.db-shm", "layers.db-journal")


def _describe(path: str) -> tuple[object, ...]:
    st = os.lstat(path)
    fmt = stat.S_IFMT(st.st_mode)
    if fmt == stat.S_IFDIR:
        # a directory's times and size move when entries come and go: its listing is compared
        return ("dir", st.st_mode, st.st_uid, st.st_gid, tuple(sorted(os.listdir(path))))
    detail: object = None
    if fmt == stat.S_IFREG:
        with open(path, "rb") as f:
            detail = hashlib.sha256(f.read()).hexdigest()
    elif fmt == stat.S_IFLNK:
        detail = os.readlink(path)
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        detail = st.st_rdev
    return ("node", st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, detail)


def store_files(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path under the store root (symlinks not followed, mounts not entered)."""
    out: dict[str, tuple[object, ...]] = {}
    mounts = {m.mount_point for m in kmount.mounts_under(root)}
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath in mounts and dirpath != str(root):
            dirnames[:] = []
            continue
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if rel in _DB_FILES or rel == "locks" or rel.startswith("locks/"):
                continue  # lock files: see assert_unchanged
            out[rel] = _describe(full)
    for rel in _DB_FILES:
        out.pop(rel, None)
    out.pop(".", None)
    return out


@dataclass(frozen=True)
class Capture:
    records: tuple[Any, ...]
    files: dict[str, tuple[object, ...]]
    mounts: tuple[str, ...]


def capture(store: LayerStore) -> Capture:
    with store.db.read() as txn:
        records = tuple(txn.all())
    files = store_files(store.root)
    mounts = tuple(m.mount_point for m in kmount.mounts_under(store.root))
    return Capture(records, files, mounts)


def _committed_marker(rel: str, before: Capture) -> bool:
    """overlay2 writes ``<parent>/committed`` when a child is created on a layer and keeps it
    (a layer that once had a child mounts read-only); a failed child import leaves it by design."""
    parts = rel.split("/")
    return len(parts) == 3 and parts[0] == "overlay2" and parts[2] == "committed"


def assert_unchanged(store: LayerStore, before: Capture) -> None:
    """The store is as ``before``: same records, same files, same mounts, and clean."""
    after = capture(store)
    assert after.records == before.records, "metadata changed"
    extra = {k for k in set(after.files) - set(before.files) if not _committed_marker(k, before)}
    missing = set(before.files) - set(after.files)
    changed = {
        k
        for k in set(before.files) & set(after.files)
        if before.files[k] != after.files[k] and not _dir_only_gained_marker(k, before, after)
    }
    assert (sorted(extra), sorted(missing), sorted(changed)) == ([], [], []), "store files changed"
    assert after.mounts == before.mounts
    assert os.listdir(store.staging_root) == []
    # a layer's lock file may outlive a shared lock on it, but none may exist for a layer that is gone
    known = {f"layer-{la.id}.lock" for la in after.records} | {"store.lock"}
    leftover_locks = sorted(set(os.listdir(store.root / "locks")) - known)
    assert leftover_locks == []
    report = store.check()
    assert report.clean, [str(p) for p in report.problems]


def _dir_only_gained_marker(rel: str, before: Capture, after: Capture) -> bool:
    old, new = before.files[rel], after.files[rel]
    if old[0] != "dir" or new[0] != "dir" or old[:4] != new[:4]:
        return False
    old_names, new_names = cast(tuple[str, ...], old[4]), cast(tuple[str, ...], new[4])
    gained = set(new_names) - set(old_names)
    lost = set(old_names) - set(new_names)
    return not lost and gained <= {"committed"} and all(
        _committed_marker(f"{rel}/{g}", before) for g in gained
    )


class Kit:
    """The helpers above, for test modules."""

    Blob = Blob
    blob = staticmethod(blob)
    sha256 = staticmethod(sha256)
    capture = staticmethod(capture)
    assert_unchanged = staticmethod(assert_unchanged)
    store_files = staticmethod(store_files)
    release_mounts = staticmethod(release_mounts)
    driver_unsupported = staticmethod(driver_unsupported)


@pytest.fixture
def rk() -> Kit:
    return Kit()
