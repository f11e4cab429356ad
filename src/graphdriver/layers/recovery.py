"""Recovery: what opening a store does about operations that crashed.

A crashed import, create or remove leaves a record in state ``incomplete`` or ``removing`` whose
layer lock nobody holds (a flock dies with its process). A record whose lock *is* held belongs to
an operation still running in another process and is left alone. Under the store lock, recovery:

1. marks every crashed ``incomplete``/``removing`` layer ``removing``, keeping its layer lock;
2. settles mounts and unmounts that died half way (``mount_pending``: the driver's get is
   released) and resets stale mount counts: counted in an earlier boot, or "mounted" where the
   kernel's mount table has nothing any more (an external ``umount``);
3. unmounts leaked mounts of this store's layers, deepest first: mounts below the root that
   belong to a layer whose count is zero (a process died between mounting and counting) or
   to a crashed layer;

then, with the store lock released (removing data can take long), deletes each crashed layer's
data and record, deepest first, and removes ``staging/`` entries whose lock nobody holds.
Everything is idempotent: a crash during recovery is recovered by the next open. Orphan driver
directories (data with no record at all) are not touched here; ``check`` reports them.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from graphdriver import mount as kmount
from graphdriver.errors import GraphDriverError
from graphdriver.layers import faults
from graphdriver.layers.locks import FileLock
from graphdriver.layers.metadata import Layer, LayerState

if TYPE_CHECKING:
    from graphdriver.layers.store import LayerStore

__all__ = ["RecoveryReport", "layer_of_path", "recover"]


@dataclass
class RecoveryReport:
    """What recovery did."""

    removed: list[str] = field(default_factory=list)
    """crashed layers (incomplete or half-removed) whose data and record were deleted"""
    reset_mounts: list[str] = field(default_factory=list)
    """layers whose stale mount count was reset to 0"""
    unmounted: list[str] = field(default_factory=list)
    """leaked mount points that were unmounted"""
    staging_removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """what could not be cleaned up (left for the next open or ``check --repair``)"""

    @property
    def nothing_done(self) -> bool:
        return not (
            self.removed or self.reset_mounts or self.unmounted or self.staging_removed or self.errors
        )


def layer_of_path(store: LayerStore, path: str, ids: set[str]) -> str | None:
    """The id of the layer a path below the store root belongs to (the first path component
    that is a layer id), or None."""
    root = os.path.realpath(store.root)
    rel = os.path.relpath(path, root)
    if rel.startswith(".."):
        return None
    for part in Path(rel).parts:
        if part in ids:
            return part
    return None


def _depth(layer: Layer, by_id: dict[str, Layer]) -> int:
    n, cur = 0, layer
    seen = set()
    while cur.parent is not None and cur.parent in by_id and cur.id not in seen:
        seen.add(cur.id)
        cur = by_id[cur.parent]
        n += 1
    return n


def reset_stale_mount(store: LayerStore, layer: Layer) -> None:
    """Set a stale count to 0 and release the driver's own count for it (best effort). The
    caller holds the layer's lock."""
    with store.write() as txn:
        txn.set_mount(layer.id, 0)
    if layer.mount_kind == "plain":
        try:
            store.driver.put(layer.id)
        except GraphDriverError:
            pass


def unmount_leaked(
    store: LayerStore, by_id: dict[str, Layer], held: set[str], report: RecoveryReport
) -> None:
    """Unmount mounts below the root that belong to a layer with no live count and no running
    operation (its lock free, or held by us in ``held``), deepest first."""
    ids = set(by_id)
    for m in kmount.mounts_under(store.root):
        lid = layer_of_path(store, m.mount_point, ids)
        if lid is None:
            continue
        layer = by_id[lid]
        if layer.state is LayerState.COMPLETE and store.mount_alive(layer):
            continue
        lock: FileLock | None = None
        if lid not in held:
            lock = store.locks.layer(lid)
            if not lock.try_acquire():
                continue
        try:
            with store.db.read() as txn:
                cur = txn.get(lid)
            if cur is not None and cur.state is LayerState.COMPLETE and store.mount_alive(cur):
                continue
            try:
                kmount.unmount(m.mount_point)
            except GraphDriverError:
                kmount.unmount(m.mount_point, detach=True)
            report.unmounted.append(m.mount_point)
        except GraphDriverError as exc:
            report.errors.append(f"unmount {m.mount_point}: {exc}")
        finally:
            if lock is not None:
                lock.release()


def clean_staging(store: LayerStore, report: RecoveryReport) -> None:
    """Remove ``staging/`` entries whose lock no process holds."""
    from graphdriver.fs.remove import remove_tree

    try:
        entries = sorted(os.listdir(store.staging_root))
    except FileNotFoundError:
        return
    for name in entries:
        if name.endswith(".lock"):
            continue
        try:
            lock = _staging_lock(store.staging_root / (name + ".lock"))
        except (OSError, GraphDriverError) as exc:
            report.errors.append(f"staging/{name}.lock: {exc}")
            continue
        if lock is None:
            continue
        try:
            path = store.staging_root / name
            for m in kmount.mounts_under(path):
                kmount.unmount(m.mount_point, detach=True)
            remove_tree(path)
            report.staging_removed.append(name)
        except (OSError, GraphDriverError) as exc:
            report.errors.append(f"staging/{name}: {exc}")
        finally:
            lock.release(unlink=True)
    # lock files left by a crash between mkdtemp and its lock, or after its removal
    for name in entries:
        if name.endswith(".lock") and not os.path.lexists(store.staging_root / name[: -len(".lock")]):
            try:
                lock = _staging_lock(store.staging_root / name)
            except (OSError, GraphDriverError) as exc:
                report.errors.append(f"staging/{name}: {exc}")
                continue
            if lock is not None:
                lock.release(unlink=True)


def _staging_lock(path: Path) -> FileLock | None:
    """The lock of a staging entry, taken; None while a live process holds it.

    A lock is always a regular file this store made. Anything else at its name (a symlink, a
    directory: planted, never followed) is removed first, as it cannot be any process's lock.
    """
    from graphdriver.fs.remove import remove_tree

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            remove_tree(path)
        else:
            os.unlink(path)
    lock = FileLock(path)
    return lock if lock.try_acquire() else None


def recover(store: LayerStore) -> RecoveryReport:
    """Clean up after crashed operations; see the module docstring."""
    report = RecoveryReport()
    crashed: list[tuple[Layer, FileLock]] = []
    try:
        with store.store_locked():
            with store.db.read() as txn:
                everything = txn.all()
            by_id = {la.id: la for la in everything}
            for layer in everything:
                if layer.state is LayerState.COMPLETE:
                    continue
                lock = store.locks.layer(layer.id)
                if lock.try_acquire():
                    crashed.append((layer, lock))
            if crashed:
                with store.write() as wtxn:
                    for layer, _ in crashed:
                        if wtxn.get(layer.id) is not None:
                            wtxn.set_state(layer.id, LayerState.REMOVING)
            for layer in everything:
                if layer.state is not LayerState.COMPLETE or layer.mount_pending is None:
                    continue
                lock = store.locks.layer(layer.id)
                if not lock.try_acquire():
                    continue  # a mount or unmount is running
                try:
                    with store.db.read() as txn:
                        cur = txn.get(layer.id)
                    if cur is not None and cur.mount_pending is not None:
                        store.settle_pending(cur)
                        report.reset_mounts.append(cur.id)
                finally:
                    lock.release()
            with store.db.read() as txn:
                everything = txn.all()
            for layer in everything:
                if (
                    layer.state is not LayerState.COMPLETE
                    or layer.mount_count == 0
                    or store.mount_alive(layer)
                ):
                    continue
                lock = store.locks.layer(layer.id)
                if not lock.try_acquire():
                    continue
                try:
                    with store.db.read() as txn:
                        cur = txn.get(layer.id)
                    if cur is not None and cur.mount_count > 0 and not store.mount_alive(cur):
                        reset_stale_mount(store, cur)
                        report.reset_mounts.append(cur.id)
                finally:
                    lock.release()
            unmount_leaked(store, by_id, {la.id for la, _ in crashed}, report)
        faults.fault("recovery.after-mark")
        crashed.sort(key=lambda item: -_depth(item[0], by_id))
        while crashed:
            layer, lock = crashed.pop(0)
            try:
                store.finish_removal(layer.id)
                report.removed.append(layer.id)
            except (OSError, GraphDriverError) as exc:
                report.errors.append(f"layer {layer.id}: {exc}")
                lock.release()
            else:
                lock.release(unlink=True)
            faults.fault("recovery.after-remove-one")
    finally:
        for _, lock in crashed:
            lock.release()
    clean_staging(store, report)
    return report
