"""The store oracle: what a layer store holds, captured before an operation and compared after.

A failed import, a refused hostile layer or an interrupted operation must leave a
:class:`~graphdriver.layers.store.LayerStore` exactly as it was. :func:`capture` records:

- every metadata record (all states, names, mount counts), from the database;
- every path under the store root with its type, mode, owner and, for a non-directory, size,
  mtime (ns) and content (sha256 of a file's bytes, a link's target, a device's number); a
  directory is described by the names it holds (its times and size move when entries come and
  go). Not recorded: the SQLite files (their bytes change with every checkpoint) and ``locks/``
  (see below). Symlinks are not followed and mounts are not entered;
- the mount points below the root.

:func:`assert_unchanged` says the store is as captured: equal, ``staging/`` empty, no lock file but
the store's and those of layers that have a record, ``check()`` clean. The one difference allowed
is overlay2's ``<parent>/committed`` marker: creating a child on a layer writes it and keeps it (a
layer that once had a child mounts read-only), so a failed child import leaves it by design.
:func:`assert_only_layer_added` is the oracle of a successful import: one new record, and every new
path the new layer's own.

Use::

    before = capture(store)
    with pytest.raises(DigestMismatch):
        store.import_layer(...)
    assert_unchanged(store, before)

The store tests share their setup too: :func:`driver_unsupported` (whether a driver works here,
probed once per process), :func:`require_driver` (the same, or skip the test) and
:func:`release_mounts` (teardown: detach everything below a root).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from graphdriver import mount as kmount
from graphdriver.errors import GraphDriverError, NotSupported
from graphdriver.fs.remove import remove_tree
from graphdriver.layers.metadata import Layer
from graphdriver.layers.store import LayerStore

__all__ = [
    "PathState",
    "StoreCapture",
    "assert_only_layer_added",
    "assert_unchanged",
    "capture",
    "driver_unsupported",
    "release_mounts",
    "require_driver",
    "store_files",
]

PathState = tuple[object, ...]
"""How :func:`store_files` describes one path: ``("dir", mode, uid, gid, names)`` or
``("node", mode, uid, gid, size, mtime_ns, detail)`` (sha256, link target, rdev or None)."""

_DB_FILES = ("layers.db", "layers.db-wal", "layers.db-shm", "layers.db-journal")
_COMMITTED = "committed"

_support: dict[str, str | None] = {}


# -- setup and teardown ----------------------------------------------------------------------------


def driver_unsupported(name: str, scratch: Path) -> str | None:
    """None if driver ``name`` works here, else why not. Probed once per process, by opening the
    driver in ``scratch/probe-<name>`` (removed again, mounts included)."""
    if name not in _support:
        from graphdriver.drivers.registry import open_driver

        probe = scratch / f"probe-{name}"
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


def require_driver(name: str, scratch: Path, *, need: str | None = None) -> str:
    """``name`` if that driver works here, else skip the test with the driver's reason (saying
    what the test ``need``-s it for, e.g. ``"a mounting driver"``)."""
    reason = driver_unsupported(name, scratch)
    if reason is not None:
        if need is not None:
            pytest.skip(f"needs {need}; {name} does not work here: {reason}")
        pytest.skip(f"driver {name} does not work here: {reason}")
    return name


def release_mounts(root: Path) -> None:
    """Detach everything mounted below ``root`` (teardown); nothing if ``root`` does not exist."""
    if root.exists():
        for m in kmount.mounts_under(root):
            kmount.unmount(m.mount_point, detach=True)


# -- the oracle --------------------------------------------------------------------------------------


def _describe(path: str) -> PathState:
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


def store_files(root: Path) -> dict[str, PathState]:
    """Every path under the store root, relative to it (symlinks not followed, mounts not
    entered; the SQLite files and ``locks/`` left out)."""
    out: dict[str, PathState] = {}
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
class StoreCapture:
    """What :func:`capture` saw: the records, the paths under the root, the mounts below it."""

    records: tuple[Layer, ...]
    files: dict[str, PathState]
    mounts: tuple[str, ...]


def capture(store: LayerStore) -> StoreCapture:
    """Everything ``store`` holds now (see the module docstring)."""
    with store.db.read() as txn:
        records = tuple(txn.all())
    files = store_files(store.root)
    mounts = tuple(m.mount_point for m in kmount.mounts_under(store.root))
    return StoreCapture(records, files, mounts)


def _committed_marker(rel: str) -> bool:
    """Whether ``rel`` is overlay2's ``<parent>/committed`` marker (kept by design)."""
    parts = rel.split("/")
    return len(parts) == 3 and parts[0] == "overlay2" and parts[2] == _COMMITTED


def _dir_only_gained_marker(rel: str, before: StoreCapture, after: StoreCapture) -> bool:
    old, new = before.files[rel], after.files[rel]
    if old[0] != "dir" or new[0] != "dir" or old[:4] != new[:4]:
        return False
    old_names, new_names = cast(tuple[str, ...], old[4]), cast(tuple[str, ...], new[4])
    gained = set(new_names) - set(old_names)
    lost = set(old_names) - set(new_names)
    return not lost and gained <= {_COMMITTED} and all(_committed_marker(f"{rel}/{g}") for g in gained)


def _assert_clean(store: LayerStore) -> None:
    report = store.check()
    assert report.clean, [str(p) for p in report.problems]


def assert_unchanged(store: LayerStore, before: StoreCapture) -> None:
    """The store is as ``before``: same records, same files, same mounts, and clean."""
    after = capture(store)
    assert after.records == before.records, "metadata changed"
    extra = {k for k in set(after.files) - set(before.files) if not _committed_marker(k)}
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
    _assert_clean(store)


def assert_only_layer_added(store: LayerStore, before: StoreCapture, layer_id: str) -> None:
    """After a successful import of ``layer_id``: one new record, and every new path the new
    layer's own (its id in the path or in a link's target), or a ``committed`` marker; clean."""
    after = capture(store)
    assert [la for la in after.records if la.id != layer_id] == list(before.records)
    new = [p for p in after.files if p not in before.files]
    own = []
    for path in new:
        detail = after.files[path]
        target = detail[-1] if detail[0] == "node" else None
        if layer_id in path or (isinstance(target, str) and layer_id in target):
            own.append(path)
    foreign = sorted(set(new) - set(own))
    assert foreign == [] or all(p.endswith("/committed") for p in foreign), foreign
    _assert_clean(store)
