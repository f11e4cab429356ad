"""``check``: every inconsistency between the metadata, the driver's data and the kernel.

What is looked for, and what ``repair=True`` does about it:

=================  ================================================  ================================
kind               meaning                                           repair
=================  ================================================  ================================
database           SQLite integrity_check / foreign_key_check fail   a name of a missing layer is
                                                                     deleted; else none (use a backup)
incomplete         a layer whose build died (its lock is free)       remove it
removing           a removal that died half way                      finish it
dangling-parent    a layer whose parent has no record                remove it and its descendants
missing-data       a complete layer the driver has no data for       remove it and its descendants
orphan-data        driver data (or a tar-split) with no record       driver.remove (unlink)
chain-id           a chain ID that is not sha256(parent chain, diff) remove it and its descendants
content            (``verify_content``) the stored content no        remove it and its descendants
                   longer hashes to its diff ID
driver-records     the driver's own records of a layer (overlay2:    rewrite them from the
                   ``link``, ``parent``, ``lower``) torn or not      record's parent chain
                   matching the record's parent chain
bad-mount-count    a count the kernel does not agree with, one from  reset it to 0 (releasing the
                   an earlier boot, or a mount that died half way    driver's get)
leaked-mount       a mount of a layer whose count is 0               unmount it
staging            a staging leftover no process holds               remove it
=================  ================================================  ================================

Layers that an operation in another process is working on (their lock is held) are skipped, so
``check`` is safe to run on a store in use. Removal during repair never touches a layer that is
mounted or in use: such problems stay, marked unrepaired, with the reason.
"""

from __future__ import annotations

import enum
import hashlib
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from graphdriver import mount as kmount
from graphdriver.errors import GraphDriverError
from graphdriver.ids import validate_id
from graphdriver.layers.digests import chain_id
from graphdriver.layers.locks import FileLock
from graphdriver.layers.metadata import Layer, LayerKind, LayerState
from graphdriver.layers.mountstate import boot_id
from graphdriver.layers.recovery import RecoveryReport, clean_staging, layer_of_path, reset_stale_mount
from graphdriver.layers.tarsplit import reassemble

if TYPE_CHECKING:
    from graphdriver.layers.store import LayerStore

__all__ = ["CheckReport", "Problem", "ProblemKind", "check", "driver_layer_ids"]


class ProblemKind(enum.StrEnum):
    DATABASE = "database"
    INCOMPLETE = "incomplete"
    REMOVING = "removing"
    DANGLING_PARENT = "dangling-parent"
    MISSING_DATA = "missing-data"
    ORPHAN_DATA = "orphan-data"
    CHAIN_ID = "chain-id"
    CONTENT = "content"
    DRIVER_RECORDS = "driver-records"
    BAD_MOUNT_COUNT = "bad-mount-count"
    LEAKED_MOUNT = "leaked-mount"
    STAGING = "staging"


@dataclass
class Problem:
    """One inconsistency; ``repaired`` and ``action`` say what ``repair=True`` did about it."""

    kind: ProblemKind
    layer: str | None
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
            "kind": str(self.kind),
            "layer": self.layer,
            "message": self.message,
            "repaired": self.repaired,
            "action": self.action,
        }


@dataclass
class CheckReport:
    """The result of :func:`check`. ``clean`` means nothing was found at all."""

    problems: list[Problem] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    """layers (records and data) that repair removed"""
    layers_checked: int = 0
    notes: list[str] = field(default_factory=list)
    """what could not be checked, and why"""

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def unrepaired(self) -> list[Problem]:
        return [p for p in self.problems if not p.repaired]

    def of_kind(self, kind: ProblemKind) -> list[Problem]:
        return [p for p in self.problems if p.kind is kind]

    def to_json(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "layers_checked": self.layers_checked,
            "problems": [p.to_json() for p in self.problems],
            "removed": list(self.removed),
            "notes": list(self.notes),
        }


def driver_layer_ids(store: LayerStore) -> list[str]:
    """Every layer id the driver has data for.

    The driver contract has no listing method yet: a driver's ``list_layers()`` or ``layers()``
    (vfs) is used when it has one; otherwise every entry of its home that is a valid id and that
    ``exists()`` says is a layer (overlay2 keeps a layer's data at ``<home>/<id>``).
    """
    for method in ("list_layers", "layers"):
        lister = getattr(store.driver, method, None)
        if callable(lister):
            return sorted(str(i) for i in lister())
    found = []
    try:
        names = sorted(os.listdir(store.driver.home))
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith("."):
            continue
        try:
            validate_id(name)
            if store.driver.exists(name):
                found.append(name)
        except GraphDriverError:
            continue
    return found


@contextmanager
def _try_lock(store: LayerStore, layer_id: str) -> Iterator[bool]:
    lock: FileLock = store.locks.layer(layer_id)
    got = lock.try_acquire()
    try:
        yield got
    finally:
        if got:
            lock.release()


def _content_digest(store: LayerStore, layer: Layer) -> str:
    """The diff ID recomputed from the stored content: the original tar rebuilt from the layer's
    tar-split and its files, or, for a layer without one, the driver's diff against its parent."""
    algo = (layer.diff_id or "sha256:").partition(":")[0]
    h = hashlib.new(algo)
    split = store.tarsplit_path(layer.id)
    if split.exists():
        with store.driver.mounted(layer.id) as root:
            for chunk in reassemble(split, root):
                h.update(chunk)
    else:
        with store.driver.diff(layer.id, layer.parent) as stream:
            while chunk := stream.read(1 << 20):
                h.update(chunk)
    return f"{algo}:{h.hexdigest()}"


class _Checker:
    def __init__(self, store: LayerStore, *, verify_content: bool, repair: bool) -> None:
        self.store = store
        self.verify_content = verify_content
        self.repair = repair
        self.report = CheckReport()
        self.gone: set[str] = set()
        """layers removed by repair during this run (not checked again)"""

    def add(self, kind: ProblemKind, layer: str | None, message: str) -> Problem:
        p = Problem(kind, layer, message)
        self.report.problems.append(p)
        return p

    # -- removal used by repair ----------------------------------------------------------------

    def _descendants(self, layer_id: str, by_id: dict[str, Layer]) -> list[str]:
        """``layer_id`` and every layer above it, deepest first."""
        kids: dict[str, list[str]] = {}
        for la in by_id.values():
            if la.parent is not None:
                kids.setdefault(la.parent, []).append(la.id)
        order: list[str] = []
        stack = [layer_id]
        while stack:
            cur = stack.pop()
            if cur in order:
                continue
            order.append(cur)
            stack.extend(kids.get(cur, []))
        return list(reversed(order))

    def remove_tree_of(self, problem: Problem, layer_id: str, by_id: dict[str, Layer]) -> None:
        """Repair by removing a layer and its descendants (records and whatever data exists)."""
        doomed = [i for i in self._descendants(layer_id, by_id) if i not in self.gone]
        busy = [i for i in doomed if by_id.get(i) is not None and self.store.mount_alive(by_id[i])]
        if busy:
            problem.action = f"not removed: layer {busy[0]} is mounted"
            return
        removed = []
        for lid in doomed:
            lock = self.store.locks.layer(lid)
            if not lock.try_acquire():
                problem.action = f"not removed: layer {lid} is in use"
                return
            try:
                for m in kmount.mounts_under(self.store.root):
                    if layer_of_path(self.store, m.mount_point, {lid}) == lid:
                        kmount.unmount(m.mount_point, detach=True)
                with self.store.write() as txn:
                    if txn.get(lid) is not None:
                        txn.set_state(lid, LayerState.REMOVING)
                self.store.finish_removal(lid)
                removed.append(lid)
            except (OSError, GraphDriverError) as exc:
                problem.action = f"removal of {lid} failed: {exc}"
                lock.release()
                self.report.removed.extend(removed)
                return
            lock.release(unlink=True)
            self.gone.add(lid)
        self.report.removed.extend(removed)
        problem.repaired = True
        problem.action = "removed " + ", ".join(removed)

    # -- the checks ----------------------------------------------------------------------------

    def database(self) -> bool:
        conn = self.store.db.conn
        with self.store.db.read():
            ok = [r[0] for r in conn.execute("PRAGMA integrity_check")]
            fk = list(conn.execute("PRAGMA foreign_key_check"))
        if ok != ["ok"]:
            self.add(ProblemKind.DATABASE, None, "SQLite integrity_check: " + "; ".join(map(str, ok[:5])))
            return False
        for table, rowid, parent_table, _ in fk:
            if table == "layers":
                continue  # dangling parents are reported per layer below
            p = self.add(
                ProblemKind.DATABASE, None, f"{table} row {rowid} refers to a missing {parent_table} row"
            )
            if self.repair and table == "names":
                with self.store.write() as txn:
                    txn.conn.execute("DELETE FROM names WHERE rowid = ?", (rowid,))
                p.repaired, p.action = True, f"deleted {table} row {rowid}"
        return True

    def run(self) -> CheckReport:
        store = self.store
        if not self.database():
            return self.report
        driver_ids = driver_layer_ids(store)
        if driver_ids is None:
            self.report.notes.append(
                f"driver {store.driver.name} cannot list its layers: orphans not checked"
            )
        with store.db.read() as txn:
            everything = txn.all()
        by_id = {la.id: la for la in everything}
        self.report.layers_checked = len(everything)

        for layer in everything:
            if layer.state is LayerState.COMPLETE:
                continue
            with _try_lock(store, layer.id) as free:
                if not free:
                    continue  # being built or removed right now
            kind = ProblemKind.INCOMPLETE if layer.state is LayerState.INCOMPLETE else ProblemKind.REMOVING
            what = "was never completed" if kind is ProblemKind.INCOMPLETE else "was being removed"
            p = self.add(kind, layer.id, f"layer {layer.id} {what} (its process died)")
            if self.repair:
                self.remove_tree_of(p, layer.id, by_id)

        self.driver_records(everything, by_id)
        for layer in everything:
            if layer.state is not LayerState.COMPLETE or layer.id in self.gone:
                continue
            self.complete_layer(layer, by_id)

        self.orphans(driver_ids, by_id)
        self.orphan_tarsplits()
        self.mounts(by_id)
        self.staging()
        return self.report

    def complete_layer(self, layer: Layer, by_id: dict[str, Layer]) -> None:
        store = self.store
        if layer.parent is not None and layer.parent not in by_id:
            p = self.add(
                ProblemKind.DANGLING_PARENT,
                layer.id,
                f"layer {layer.id}: parent {layer.parent} has no record",
            )
            if self.repair:
                self.remove_tree_of(p, layer.id, by_id)
            return
        if not store.driver.exists(layer.id):
            p = self.add(
                ProblemKind.MISSING_DATA, layer.id, f"layer {layer.id}: the driver has no data for it"
            )
            if self.repair:
                self.remove_tree_of(p, layer.id, by_id)
            return
        if layer.kind is LayerKind.IMAGE and layer.diff_id is not None and layer.chain_id is not None:
            parent = by_id.get(layer.parent) if layer.parent is not None else None
            expected = None
            if parent is None or parent.chain_id is not None:
                expected = chain_id(None if parent is None else parent.chain_id, layer.diff_id)
            if expected != layer.chain_id:
                p = self.add(
                    ProblemKind.CHAIN_ID,
                    layer.id,
                    f"layer {layer.id}: chain ID {layer.chain_id} does not follow from its parent and diff ID"
                    f" (expected {expected})",
                )
                if self.repair:
                    self.remove_tree_of(p, layer.id, by_id)
                return
        pending = False
        if layer.mount_pending is not None:
            with _try_lock(store, layer.id) as free:
                if free:
                    with store.db.read() as txn:
                        cur = txn.get(layer.id)
                    if cur is not None and cur.mount_pending is not None:
                        p = self.add(
                            ProblemKind.BAD_MOUNT_COUNT,
                            layer.id,
                            f"layer {layer.id}: a {'mount' if cur.mount_pending == 'get' else 'unmount'}"
                            " died half way",
                        )
                        if self.repair:
                            store.settle_pending(cur)
                            p.repaired, p.action = True, "driver's get released, count reset to 0"
                        pending = True
        if not pending and layer.mount_count > 0 and not store.mount_alive(layer):
            with _try_lock(store, layer.id) as free:
                if free:
                    with store.db.read() as txn:
                        cur = txn.get(layer.id)
                    if cur is not None and cur.mount_count > 0 and not store.mount_alive(cur):
                        p = self.add(
                            ProblemKind.BAD_MOUNT_COUNT,
                            layer.id,
                            f"layer {layer.id}: mount count {cur.mount_count} but "
                            + (
                                "it was counted in an earlier boot"
                                if cur.mount_boot != boot_id()
                                else f"{cur.mount_point} is not mounted"
                            ),
                        )
                        if self.repair:
                            reset_stale_mount(store, cur)
                            p.repaired, p.action = True, "count reset to 0"
        if self.verify_content and layer.kind is LayerKind.IMAGE and layer.diff_id is not None:
            try:
                with ExitStack() as stack:  # as LayerStore.diff does: the layer, then its parent
                    stack.enter_context(store.layer_locked(layer.id, shared=True))
                    if layer.parent is not None:
                        stack.enter_context(store.layer_locked(layer.parent, shared=True))
                    got = _content_digest(store, layer)
            except (OSError, GraphDriverError) as exc:
                got = f"unreadable ({exc})"
            if got != layer.diff_id:
                p = self.add(
                    ProblemKind.CONTENT,
                    layer.id,
                    f"layer {layer.id}: stored content hashes to {got}, its diff ID is {layer.diff_id}",
                )
                if self.repair:
                    self.remove_tree_of(p, layer.id, by_id)

    def driver_records(self, everything: list[Layer], by_id: dict[str, Layer]) -> None:
        """The driver's derived records of each layer against the store's parent chain
        (``Driver.verify_records``; overlay2's create does not fsync them), parents first, so
        that a child is compared with its repaired parent."""
        verify = self.store.driver.verify_records

        def ancestors(layer: Layer) -> list[str] | None:
            chain: list[str] = []
            cur = layer.parent
            while cur is not None:
                if cur not in by_id or len(chain) > len(by_id):
                    return None  # dangling (reported below) or a cycle
                chain.append(cur)
                cur = by_id[cur].parent
            return chain

        chains = {la.id: ancestors(la) for la in everything if la.state is LayerState.COMPLETE}
        exists = {la.id: self.store.driver.exists(la.id) for la in everything}
        for layer_id, chain in sorted(chains.items(), key=lambda item: len(item[1] or ())):
            if chain is None or layer_id in self.gone or not all(exists[i] for i in (layer_id, *chain)):
                continue  # a missing layer (its own or an ancestor's data) is reported below
            with _try_lock(self.store, layer_id) as free:
                if not free:
                    continue
                try:
                    wrong = verify(layer_id, chain, repair=self.repair)
                except (OSError, GraphDriverError) as exc:
                    wrong = [f"cannot be checked: {exc} (not repaired)"]
                if wrong:
                    text = f"layer {layer_id}: " + "; ".join(wrong)
                    p = self.add(ProblemKind.DRIVER_RECORDS, layer_id, text)
                    if self.repair and "(not repaired)" not in text:
                        p.repaired, p.action = True, "driver records rewritten from the parent chain"

    def orphans(self, driver_ids: list[str], by_id: dict[str, Layer]) -> None:
        store = self.store
        with store.db.read() as txn:
            recorded = {la.id for la in txn.all()}
        for did in driver_ids:
            if did in recorded:
                continue
            with _try_lock(store, did) as free:
                if not free:
                    continue
                with store.db.read() as txn:
                    if txn.get(did) is not None:
                        continue
                if not store.driver.exists(did):
                    continue
                p = self.add(ProblemKind.ORPHAN_DATA, did, f"driver data {did} has no layer record")
                if self.repair:
                    try:
                        for m in kmount.mounts_under(store.root):
                            if layer_of_path(store, m.mount_point, {did}) == did:
                                kmount.unmount(m.mount_point, detach=True)
                        store.driver.remove(did)
                        p.repaired, p.action = True, f"removed driver data {did}"
                        self.report.removed.append(did)
                    except (OSError, GraphDriverError) as exc:
                        p.action = f"driver.remove failed: {exc}"

    def orphan_tarsplits(self) -> None:
        store = self.store
        try:
            names = sorted(os.listdir(store.tarsplit_root))
        except FileNotFoundError:
            return
        with store.db.read() as txn:
            recorded = {la.id for la in txn.all()}
        for name in names:
            lid = name.removesuffix(".tsplit.zst")
            if lid in recorded:
                continue
            with store.db.read() as txn:
                if txn.get(lid) is not None:
                    continue
            p = self.add(ProblemKind.ORPHAN_DATA, None, f"tarsplit/{name} belongs to no layer")
            if self.repair:
                (store.tarsplit_root / name).unlink(missing_ok=True)
                p.repaired, p.action = True, f"removed tarsplit/{name}"

    def mounts(self, by_id: dict[str, Layer]) -> None:
        store = self.store
        with store.db.read() as txn:
            current = {la.id: la for la in txn.all()}
        ids = set(current) | set(by_id)
        for m in kmount.mounts_under(store.root):
            lid = layer_of_path(store, m.mount_point, ids)
            if lid is None:
                continue
            layer = current.get(lid)
            if layer is not None and layer.state is LayerState.COMPLETE and store.mount_alive(layer):
                continue
            with _try_lock(store, lid) as free:
                if not free:
                    continue
                with store.db.read() as txn:
                    cur = txn.get(lid)
                if cur is not None and cur.state is LayerState.COMPLETE and store.mount_alive(cur):
                    continue
                p = self.add(
                    ProblemKind.LEAKED_MOUNT, lid, f"{m.mount_point} is mounted but layer {lid} is not"
                )
                if self.repair:
                    try:
                        kmount.unmount(m.mount_point)
                        p.repaired, p.action = True, f"unmounted {m.mount_point}"
                    except GraphDriverError as exc:
                        p.action = f"unmount failed: {exc}"

    def staging(self) -> None:
        store = self.store
        try:
            entries = sorted(os.listdir(store.staging_root))
        except FileNotFoundError:
            return
        for name in entries:
            if name.endswith(".lock"):
                continue
            lock = FileLock(store.staging_root / (name + ".lock"))
            if not lock.try_acquire():
                continue
            lock.release()
            p = self.add(ProblemKind.STAGING, None, f"staging/{name} is left over from a crashed operation")
            if self.repair:
                rep = RecoveryReport()
                clean_staging(store, rep)
                if name in rep.staging_removed:
                    p.repaired, p.action = True, f"removed staging/{name}"
                else:
                    p.action = "; ".join(rep.errors)


def check(store: LayerStore, *, verify_content: bool = False, repair: bool = False) -> CheckReport:
    """Look for every inconsistency (see the module docstring); with ``repair``, fix what can be."""
    return _Checker(store, verify_content=verify_content, repair=repair).run()
