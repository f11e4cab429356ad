"""The layer store: content-addressed layers over one driver, shared by many processes.

On-disk layout (the root is 0700)::

    <root>/
        layers.db            SQLite metadata (graphdriver.layers.metadata), WAL files beside it
        locks/               flock files (graphdriver.layers.locks): store.lock, layer-<id>.lock,
                             chain-<algo>-<hex>.lock
        staging/             scratch directories of running operations, each with its lock
        tarsplit/<id>.tsplit.zst   what it takes to rebuild an imported layer's original tar
                             (graphdriver.layers.tarsplit)
        <driver>/            the driver's home; a layer's driver id is its store id

Every layer has a random 64-hex store id (also its driver id) and, when it is an image layer with
a known diff ID, a chain ID (OCI image spec), so importing a stack twice stores nothing twice.

**Import** (:meth:`LayerStore.import_layer`) follows containerd's unpacker and containers/storage's
incomplete flag:

1. With the chain ID known up front (an expected diff ID), take the chain's lock; a complete layer
   with that chain ID is the answer, and nothing new is stored.
2. Record the layer ``incomplete`` (one transaction) holding its layer lock, *before* any work.
3. ``driver.create(id, parent)``; stream the blob through a digest of the compressed bytes, the
   decompressor, the tar-split recorder and a digest of the tar, into ``driver.apply_diff``;
   drain both streams to their end (trailing bytes count, gzip CRC and length / zstd checksum
   are checked).
4. Verify the diff ID, the compressed digest and size: any mismatch is
   :class:`~graphdriver.errors.DigestMismatch` and the layer is removed.
5. ``syncfs`` the driver's filesystem, so the data is durable *before* the metadata says so.
6. Commit ``complete`` in one transaction. If another process committed the same chain ID in the
   meantime, ours is dropped and theirs returned (containerd's Commit AlreadyExists -> success).

A crash anywhere leaves an ``incomplete`` (or ``removing``) record whose layer lock nobody holds;
the next :meth:`LayerStore.open` removes it (:mod:`graphdriver.layers.recovery`). **Removal** is
crash-safe the same way: mark ``removing``, ``driver.remove``, delete the record.

**Mount counts** live in the database with the mount point, whether the driver mounted anything
there, and the boot id. A count is believed only while the kernel agrees: after an external
``umount`` or a reboot the next mount remounts and counts from 1. The driver is asked to mount
only on the first mount and to unmount only on the last; both are marked pending in the
database first, so a crash between the driver's work and the new count is settled by recovery
(the driver's get is released) instead of leaving a count that nobody can drop.

Locks (see :mod:`graphdriver.layers.locks` for the order): the store lock is held only around
metadata transactions; a layer's own lock around its build, mount, unmount and removal; a shared
lock on a layer (and its parent) while it is diffed; a chain lock around an import.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import io
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from graphdriver import mount as kmount
from graphdriver.archive.types import Change, Limits
from graphdriver.drivers.base import Driver
from graphdriver.drivers.registry import ENV_DRIVER, open_driver
from graphdriver.errors import (
    AlreadyExists,
    Busy,
    DigestMismatch,
    GraphDriverError,
    InvalidArgument,
    NotFound,
    StoreCorrupt,
)
from graphdriver.ids import validate_id
from graphdriver.layers import faults
from graphdriver.layers.digests import algorithm, chain_id, new_layer_id, validate_digest
from graphdriver.layers.locks import FileLock, LockDir
from graphdriver.layers.metadata import Layer, LayerKind, LayerState, MetadataDB, Txn, validate_name
from graphdriver.layers.mountstate import boot_id, mount_alive
from graphdriver.layers.tarsplit import Recorder, TeeReader, reassemble

if TYPE_CHECKING:
    from graphdriver.layers.check import CheckReport
    from graphdriver.layers.recovery import RecoveryReport

__all__ = ["DiskUsage", "LayerBlob", "LayerStore"]

DB_NAME = "layers.db"
LOCKS_DIR = "locks"
STAGING_DIR = "staging"
TARSPLIT_DIR = "tarsplit"


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> None:
    """Flush every dirty page and inode of the filesystem holding ``path`` (``syncfs(2)``)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc().syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class DiskUsage:
    """What ``df`` reports, from the sizes recorded at commit (no tree is walked)."""

    layers: int
    image_layers: int
    container_layers: int
    size: int
    """bytes of every layer's own changes"""
    compressed_size: int
    """bytes of the compressed blobs the image layers were imported from"""
    uncompressed_size: int
    """bytes of their uncompressed tars"""
    mounted: int

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LayerBlob:
    """One layer of :meth:`LayerStore.import_layers`: an open blob and what it must hash to
    (as :meth:`LayerStore.import_layer`'s ``expected_*`` arguments)."""

    blob: BinaryIO
    diff_id: str | None = None
    digest: str | None = None
    size: int | None = None
    reopen: Callable[[], BinaryIO] | None = None
    """a fresh stream of the same blob from its start, for a layer that has to be applied again
    once its lower layers are complete (None: ``blob.seek(0)``)"""


class _OneByOne(Exception):
    """Inside LayerStore._build_stack: the driver cannot apply these layers on their own."""


@dataclass(frozen=True)
class _Applied:
    """What a worker of :meth:`LayerStore.import_layers` measured while applying one blob."""

    diff_id: str
    digest: str
    size: int
    uncompressed_size: int


class _VerifiedStream(io.RawIOBase):
    """A reader over byte chunks that checks their digest when the end is reached."""

    def __init__(self, chunks: Iterator[bytes], digest: str) -> None:
        super().__init__()
        self._chunks = chunks
        self._pending = b""
        self._expected = digest
        self._hash = hashlib.new(digest.partition(":")[0])
        self._checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        while not self._pending:
            nxt = next(self._chunks, None)
            if nxt is None:
                if not self._checked:
                    self._checked = True
                    got = f"{self._expected.partition(':')[0]}:{self._hash.hexdigest()}"
                    if got != self._expected:
                        raise DigestMismatch(f"stored layer content hashes to {got}, not {self._expected}")
                return 0
            self._pending = nxt
            self._hash.update(nxt)
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


class _FaultReader:
    """Passes reads through and reaches the ``import.apply-start``/``apply-mid`` fault points."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._reads = 0

    def read(self, n: int = -1) -> bytes:
        faults.fault("import.apply-start" if self._reads == 0 else "import.apply-mid")
        self._reads += 1
        return self._raw.read(n)

    def readinto(self, buf: bytearray | memoryview) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True


class _SplitWriter:
    """Writes a layer's tar-split file (zstd) and makes it durable; deleted if not finished."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self.path = path
        self._file = open(path, "xb")  # noqa: SIM115 - closed in finish or __exit__
        self._zstd = zstandard.ZstdCompressor(level=3).stream_writer(self._file, closefd=False)
        self.recorder = Recorder(cast(BinaryIO, self._zstd))
        self._done = False

    def finish(self) -> None:
        import zstandard

        self.recorder.finish()
        self._zstd.flush(zstandard.FLUSH_FRAME)
        self._zstd.close()  # type: ignore[no-untyped-call]
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        _fsync_dir(self.path.parent)
        self._done = True

    def __enter__(self) -> _SplitWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self._file.close()
            self.path.unlink(missing_ok=True)


class LayerStore:
    """Layers over one driver. Open with :meth:`open`; use as a context manager to close."""

    def __init__(self, root: Path, driver: Driver, db: MetadataDB, locks: LockDir) -> None:
        self.root = root
        self.driver = driver
        self.db = db
        self.locks = locks
        self.staging_root = root / STAGING_DIR
        self.tarsplit_root = root / TARSPLIT_DIR
        self._held = threading.local()
        self.recovery: RecoveryReport | None = None
        """what the recovery run by :meth:`open` did (None when it was not run)"""

    # -- opening and closing ----------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        root: Path | str,
        driver: str | None = None,
        options: dict[str, str] | None = None,
        *,
        recover: bool = True,
    ) -> LayerStore:
        """Open (creating if needed) the store at ``root``, on ``driver`` (None: the registry's
        selection: the driver already in use under ``root``, else the first that works here).

        Unless ``recover=False``, what crashed operations left behind is cleaned up first
        (:func:`graphdriver.layers.recovery.recover`).
        """
        root = Path(os.path.abspath(root))
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(root)
        if stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.geteuid():
            os.chmod(root, 0o700)
        locks = LockDir(root / LOCKS_DIR)
        (root / STAGING_DIR).mkdir(mode=0o700, exist_ok=True)
        (root / TARSPLIT_DIR).mkdir(mode=0o700, exist_ok=True)
        new_db = not (root / DB_NAME).exists()
        with locks.holding(locks.store()):
            db = MetadataDB(root / DB_NAME)
            if new_db:
                _fsync_dir(root)
        try:
            with db.read() as txn:
                recorded = txn.get_meta("driver")
            requested = driver or os.environ.get(ENV_DRIVER) or None
            if requested and recorded and requested != recorded:
                raise InvalidArgument(
                    f"the store at {root} was created with driver {recorded};"
                    f" it cannot be opened with {requested}"
                )
            drv = open_driver(root, driver or recorded, options)
            if recorded is None:
                with locks.holding(locks.store()), db.write() as wtxn:
                    if wtxn.get_meta("driver") is None:
                        wtxn.set_meta("driver", drv.name)
                    recorded = wtxn.get_meta("driver")
            if recorded != drv.name:
                raise InvalidArgument(
                    f"the store at {root} was created with driver {recorded};"
                    f" it cannot be opened with {drv.name}"
                )
            store = cls(root, drv, db, locks)
        except BaseException:
            db.close()
            raise
        if recover:
            from graphdriver.layers.recovery import recover as run_recovery

            try:
                store.recovery = run_recovery(store)
            except BaseException:
                store.close()
                raise
        return store

    def close(self) -> None:
        """Close the database. Mounts are not touched: their counts live on."""
        self.db.close()

    def __enter__(self) -> LayerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LayerStore root={str(self.root)!r} driver={self.driver.name}>"

    # -- transactions and locks (used by recovery and check too) ---------------------------------

    @contextmanager
    def store_locked(self) -> Iterator[None]:
        """Hold the store lock (re-entrant within a thread)."""
        depth = getattr(self._held, "depth", 0)
        if depth:
            self._held.depth = depth + 1
            try:
                yield
            finally:
                self._held.depth = depth
            return
        with self.locks.holding(self.locks.store()):
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0

    @contextmanager
    def write(self) -> Iterator[Txn]:
        """A metadata write transaction under the store lock."""
        with self.store_locked(), self.db.write() as txn:
            yield txn

    @contextmanager
    def layer_locked(self, layer_id: str, *, shared: bool = False) -> Iterator[None]:
        """Hold ``layer_id``'s lock (exclusive unless ``shared``) for the block."""
        lock = self.locks.layer(layer_id)
        lock.acquire(shared=shared)
        try:
            yield
        finally:
            lock.release()

    # -- lookups ----------------------------------------------------------------------------------

    def _resolve(self, txn: Txn, id_or_name: str) -> Layer:
        layer = txn.resolve(id_or_name)
        if layer is None or layer.state is not LayerState.COMPLETE:
            raise NotFound(f"layer not known: {id_or_name}")
        return layer

    def get(self, id_or_name: str) -> Layer:
        """The complete layer with this id or name; NotFound otherwise."""
        with self.db.read() as txn:
            return self._resolve(txn, id_or_name)

    def layers(self) -> list[Layer]:
        """Every complete layer, oldest first (incomplete and removing ones are never listed)."""
        with self.db.read() as txn:
            return txn.all(LayerState.COMPLETE)

    def by_chain_id(self, chain: str) -> Layer | None:
        """The layer with chain ID ``chain``, if the store has it."""
        with self.db.read() as txn:
            return txn.by_chain_id(validate_digest(chain))

    def add_names(self, id_or_name: str, names: Iterable[str]) -> Layer:
        """Give a layer more names (each unique in the store)."""
        with self.write() as txn:
            layer = self._resolve(txn, id_or_name)
            txn.add_names(layer.id, names)
        return self.get(layer.id)

    def remove_names(self, id_or_name: str, names: Iterable[str]) -> Layer:
        with self.write() as txn:
            layer = self._resolve(txn, id_or_name)
            txn.remove_names(layer.id, names)
        return self.get(layer.id)

    # -- import -----------------------------------------------------------------------------------

    def import_layer(
        self,
        blob: BinaryIO,
        parent: str | None = None,
        *,
        expected_diff_id: str | None = None,
        expected_digest: str | None = None,
        expected_size: int | None = None,
        names: Iterable[str] = (),
        limits: Limits | None = None,
    ) -> Layer:
        """Import a layer blob (tar, gzip or zstd) on ``parent`` (id or name; None: a base layer).

        ``expected_diff_id`` is the digest of the uncompressed tar, ``expected_digest`` and
        ``expected_size`` those of the blob as given (an OCI descriptor's digest and size). When
        the diff ID is given and the resulting chain ID is already stored, nothing is read or
        stored and the existing layer is returned (with ``names`` added). A mismatch raises
        :class:`DigestMismatch` and leaves nothing behind.
        """
        names = tuple(validate_name(n) for n in names)
        if expected_diff_id is not None:
            validate_digest(expected_diff_id)
        if expected_digest is not None:
            validate_digest(expected_digest)
        if expected_size is not None and expected_size < 0:
            raise InvalidArgument(f"invalid expected size {expected_size}")
        with self.db.read() as txn:
            parent_layer = None if parent is None else self._resolve(txn, parent)
        known_chain: str | None = None
        if expected_diff_id is not None and (parent_layer is None or parent_layer.chain_id is not None):
            known_chain = chain_id(None if parent_layer is None else parent_layer.chain_id, expected_diff_id)
        with ExitStack() as stack:
            if known_chain is not None:
                stack.enter_context(self.locks.holding(self.locks.chain(known_chain), unlink=True))
                existing = self._existing_chain(known_chain, names)
                if existing is not None:
                    return existing
            return self._build_import(
                blob,
                parent_layer,
                known_chain,
                expected_diff_id=expected_diff_id,
                expected_digest=expected_digest,
                expected_size=expected_size,
                names=names,
                limits=limits,
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def _existing_chain(self, chain: str, names: tuple[str, ...]) -> Layer | None:
        with self.db.read() as txn:
            layer = txn.by_chain_id(chain)
        if layer is None:
            return None
        if names:
            with self.write() as wtxn:
                again = wtxn.by_chain_id(chain)
                if again is None:
                    return None
                wtxn.add_names(again.id, names)
            layer = self.get(again.id)
        return layer

    def _build_import(
        self,
        blob: BinaryIO,
        parent: Layer | None,
        known_chain: str | None,
        *,
        expected_diff_id: str | None,
        expected_digest: str | None,
        expected_size: int | None,
        names: tuple[str, ...],
        limits: Limits | None,
    ) -> Layer:
        from graphdriver.archive.compression import DigestReader, drain, open_decompressed

        layer_id = new_layer_id()
        parent_id = None if parent is None else parent.id
        lock = self.locks.layer(layer_id)
        lock.acquire()
        try:
            faults.fault("import.before-record")
            with self.write() as txn:
                for n in names:
                    owner = txn.name_owner(n)
                    if owner is not None:
                        raise AlreadyExists(f"name {n!r} is already used by layer {owner}")
                txn.insert(layer_id, parent_id, LayerKind.IMAGE, chain_id=known_chain)
            try:
                faults.fault("import.after-record")
                with ExitStack() as stack:
                    if parent_id is not None:
                        stack.enter_context(self.layer_locked(parent_id, shared=True))
                    self.driver.create(layer_id, parent_id)
                    faults.fault("import.after-create")
                    split = stack.enter_context(_SplitWriter(self.tarsplit_path(layer_id)))
                    compressed = DigestReader(
                        cast(BinaryIO, _FaultReader(blob)),
                        algorithm(expected_digest) if expected_digest else "sha256",
                    )
                    with open_decompressed(cast(BinaryIO, compressed), limits or Limits()) as tar:
                        tar_digest = DigestReader(
                            cast(BinaryIO, TeeReader(tar, split.recorder)),
                            algorithm(expected_diff_id) if expected_diff_id else "sha256",
                        )
                        size = self.driver.apply_diff(
                            layer_id, parent_id, cast(BinaryIO, tar_digest), limits=limits
                        )
                        faults.fault("import.after-apply")
                        drain(cast(BinaryIO, tar_digest))
                    drain(cast(BinaryIO, compressed))
                    split.finish()
                faults.fault("import.after-drain")
                diff_id = str(tar_digest.digest)
                if expected_diff_id is not None and diff_id != expected_diff_id:
                    raise DigestMismatch(
                        f"layer diff ID mismatch: expected {expected_diff_id},"
                        f" the uncompressed tar is {diff_id}"
                    )
                if expected_digest is not None and compressed.digest != expected_digest:
                    raise DigestMismatch(
                        f"layer blob digest mismatch: expected {expected_digest}, got {compressed.digest}"
                    )
                if expected_size is not None and compressed.size != expected_size:
                    raise DigestMismatch(
                        f"layer blob size mismatch: expected {expected_size} bytes, got {compressed.size}"
                    )
                faults.fault("import.after-verify")
                syncfs(self.driver.home)
                faults.fault("import.after-sync")
                chain: str | None = None
                if parent is None or parent.chain_id is not None:
                    chain = chain_id(None if parent is None else parent.chain_id, diff_id)
                with self.write() as txn:
                    other = None if chain is None else txn.by_chain_id(chain)
                    if other is None:
                        txn.complete(
                            layer_id,
                            size=size,
                            chain_id=chain,
                            diff_id=diff_id,
                            compressed_digest=str(compressed.digest),
                            compressed_size=int(compressed.size),
                            uncompressed_size=int(tar_digest.size),
                        )
                        txn.add_names(layer_id, names)
                    else:
                        # another process committed the same layer meanwhile: theirs wins
                        txn.set_state(layer_id, LayerState.REMOVING)
                        txn.add_names(other.id, names)
                    faults.fault("import.in-commit")
            except BaseException:
                self._discard(layer_id)
                raise
            if other is not None:
                try:
                    self.finish_removal(layer_id)
                except (OSError, GraphDriverError):
                    pass  # marked removing: the next open's recovery finishes it
                faults.fault("import.after-discard")
                return self.get(other.id)
            faults.fault("import.after-commit")
            return self.get(layer_id)
        finally:
            lock.release(unlink=True)

    def import_layers(
        self,
        blobs: Sequence[LayerBlob],
        parent: str | None = None,
        *,
        limits: Limits | None = None,
        workers: int | None = None,
        on_event: Callable[[int, str], None] | None = None,
    ) -> list[Layer]:
        """Import a stack of layer blobs, each on the previous one (the first on ``parent``): the
        same layers, records and errors as :meth:`import_layer` called for each in turn.

        When every blob has its ``diff_id`` and the driver applies each layer into its own
        directory without reading the others (overlay2's native path, ``applies_alone``), the
        blobs are applied at the same time in up to ``workers`` forked processes (default: the
        CPU count), then measured, synced once and committed bottom-up. A layer that turns out to
        need its lower layers' content while it is applied (an entry under a directory that only
        a lower layer has, e.g. ``lib/x`` below a ``lib -> usr/lib`` symlink:
        :class:`~graphdriver.archive.apply.LowerLayersNeeded`) is applied again from the start of
        its blob (``LayerBlob.reopen``) once the layers below it are complete, and so are the
        layers above it. Layers whose chain ID is stored already are reused and not read.
        Otherwise this is the loop over :meth:`import_layer`. On any failure nothing of this call
        is left behind.

        A worker reads its blob in a forked process: a blob must be readable there (a file, or a
        reader that needs no thread of this process). ``on_event(i, what)`` is called in this
        process with ``what`` = ``"applying"`` when layer ``blobs[i]`` starts and ``"applied"``
        when its content is in place (verification and commit follow).
        """
        limits = limits or Limits()
        for spec in blobs:
            for d in (spec.diff_id, spec.digest):
                if d is not None:
                    validate_digest(d)
        with self.db.read() as txn:
            parent_layer = None if parent is None else self._resolve(txn, parent)
        applies_alone = getattr(self.driver, "apply_unmeasured", None) and getattr(
            self.driver, "applies_alone", None
        )
        workers = workers or os.cpu_count() or 1
        chains: list[str] = []
        if all(b.diff_id for b in blobs) and (parent_layer is None or parent_layer.chain_id is not None):
            below = None if parent_layer is None else parent_layer.chain_id
            for spec in blobs:
                below = chain_id(below, cast(str, spec.diff_id))
                chains.append(below)
        if not applies_alone or workers < 2 or len(blobs) < 2 or len(chains) != len(blobs):
            return self._import_one_by_one(blobs, parent, limits, on_event=on_event)
        with ExitStack() as stack:
            for chain in chains:  # bottom-up, as every import takes them
                stack.enter_context(self.locks.holding(self.locks.chain(chain), unlink=True))
            done: list[Layer] = []
            for chain in chains:
                existing = self._existing_chain(chain, ())
                if existing is None:
                    break
                done.append(existing)
            below_layer = done[-1] if done else parent_layer
            todo = list(blobs[len(done) :])
            skip = len(done)

            def shifted(k: int, what: str) -> None:
                if on_event is not None:
                    on_event(skip + k, what)

            if len(todo) < 2:
                below_id = None if below_layer is None else below_layer.id
                return done + self._import_one_by_one(
                    todo, below_id, limits, locked_chains=chains[len(done) :], on_event=shifted
                )
            return done + self._build_stack(
                todo, chains[len(done) :], below_layer, limits, workers, on_event=shifted
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def _import_one_by_one(
        self,
        blobs: Sequence[LayerBlob],
        parent: str | None,
        limits: Limits,
        *,
        locked_chains: Sequence[str] | None = None,
        on_event: Callable[[int, str], None] | None = None,
    ) -> list[Layer]:
        """:meth:`import_layer` for each blob in turn; on a failure the layers this call added
        are removed again (best effort). With ``locked_chains`` (the blobs' chain IDs) the caller
        holds those chain locks, which an import must not take again, and no layer exists yet."""
        before = set() if locked_chains is not None else {la.id for la in self.layers()}
        out: list[Layer] = []
        try:
            for k, spec in enumerate(blobs):
                below = out[-1].id if out else parent
                if on_event is not None:
                    on_event(k, "applying")
                if locked_chains is not None:
                    with self.db.read() as txn:
                        below_layer = None if below is None else self._resolve(txn, below)
                    layer = self._build_import(
                        spec.blob,
                        below_layer,
                        locked_chains[k],
                        expected_diff_id=spec.diff_id,
                        expected_digest=spec.digest,
                        expected_size=spec.size,
                        names=(),
                        limits=limits,
                    )
                else:
                    layer = self.import_layer(
                        spec.blob,
                        below,
                        expected_diff_id=spec.diff_id,
                        expected_digest=spec.digest,
                        expected_size=spec.size,
                        limits=limits,
                    )
                out.append(layer)
                if on_event is not None:
                    on_event(k, "applied")
        except BaseException:
            for layer in reversed(out):
                if layer.id not in before:
                    try:
                        self.remove(layer.id)
                    except (OSError, GraphDriverError):
                        pass  # in use meanwhile by another import: it stays
            raise
        return out

    def _build_stack(
        self,
        blobs: list[LayerBlob],
        chains: list[str],
        below: Layer | None,
        limits: Limits,
        workers: int,
        *,
        on_event: Callable[[int, str], None] | None = None,
    ) -> list[Layer]:
        """:meth:`import_layers` once the chain locks are held and nothing of ``blobs`` is stored."""
        from graphdriver.archive.apply import LowerLayersNeeded

        ids = [new_layer_id() for _ in blobs]
        parents = [None if below is None else below.id, *ids[:-1]]
        locks = [self.locks.layer(i) for i in ids]
        recorded: list[str] = []
        try:
            for layer_id, lock, parent_id in zip(ids, locks, parents, strict=True):
                lock.acquire()
                with self.write() as txn:
                    # the parent is complete (``below``) or the previous layer of this stack
                    txn.insert(
                        layer_id, parent_id, LayerKind.IMAGE, parent_in_build=parent_id in recorded
                    )
                recorded.append(layer_id)
            with ExitStack() as stack:
                if below is not None:
                    stack.enter_context(self.layer_locked(below.id, shared=True))
                for layer_id, parent_id in zip(ids, parents, strict=True):
                    self.driver.create(layer_id, parent_id)
                alone = self.driver.applies_alone  # type: ignore[attr-defined]
                outcome: list[_Applied | BaseException]
                if not all(alone(i, p) for i, p in zip(ids, parents, strict=True)):
                    raise _OneByOne  # e.g. no native diff here
                outcome = self._apply_in_workers(blobs, ids, parents, limits, workers, on_event=on_event)
                again = [k for k, got in enumerate(outcome) if isinstance(got, LowerLayersNeeded)]
                if again:
                    redone, results = self._apply_again(blobs, ids, parents, limits, again, on_event=on_event)
                    for k, result in zip(redone, results, strict=True):
                        outcome[k] = result
                applied: list[_Applied] = []
                for done in outcome:
                    assert isinstance(done, _Applied)
                    applied.append(done)
                for spec, got in zip(blobs, applied, strict=True):
                    if got.diff_id != spec.diff_id:
                        raise DigestMismatch(
                            f"layer diff ID mismatch: expected {spec.diff_id},"
                            f" the uncompressed tar is {got.diff_id}"
                        )
                    if spec.digest is not None and got.digest != spec.digest:
                        raise DigestMismatch(
                            f"layer blob digest mismatch: expected {spec.digest}, got {got.digest}"
                        )
                    if spec.size is not None and got.size != spec.size:
                        raise DigestMismatch(
                            f"layer blob size mismatch: expected {spec.size} bytes, got {got.size}"
                        )
                measure = getattr(self.driver, "applied_size", None)
                sizes = [
                    measure(i, p) if measure else self.driver.diff_size(i, p)
                    for i, p in zip(ids, parents, strict=True)
                ]
                syncfs(self.driver.home)
                for layer_id, chain, got, size in zip(ids, chains, applied, sizes, strict=True):
                    with self.write() as txn:
                        txn.complete(
                            layer_id,
                            size=size,
                            chain_id=chain,
                            diff_id=got.diff_id,
                            compressed_digest=got.digest,
                            compressed_size=got.size,
                            uncompressed_size=got.uncompressed_size,
                        )
            return [self.get(i) for i in ids]
        except _OneByOne:
            for layer_id in reversed(recorded):
                self._discard(layer_id)  # created, nothing applied yet
        except BaseException:
            for layer_id in reversed(recorded):
                self._discard(layer_id)
            raise
        finally:
            for lock in locks:
                lock.release(unlink=True)
        # Each layer needs its parent complete, and a child's create makes its parent's mounts
        # read-only (overlay2's ``committed``): create and apply one after the other instead.
        below_id = None if below is None else below.id
        return self._import_one_by_one(blobs, below_id, limits, locked_chains=chains, on_event=on_event)

    def _apply_again(
        self,
        blobs: list[LayerBlob],
        ids: list[str],
        parents: list[str | None],
        limits: Limits,
        needed: list[int],
        *,
        on_event: Callable[[int, str], None] | None,
    ) -> tuple[list[int], list[_Applied]]:
        """Apply again, bottom-up with ``apply_diff``, the layers ``needed`` that needed their
        lower layers while they were applied on their own (their records stay incomplete, their
        locks held); returns those indexes and their results. Each is first emptied with the
        driver's ``reset`` (overlay2's; the drivers that apply layers on their own have it),
        which keeps the layer's identity: the layers above it stay as they were applied."""
        reset = self.driver.reset  # type: ignore[attr-defined]
        redo = list(needed)
        for j in redo:
            reset(ids[j])
            self.tarsplit_path(ids[j]).unlink(missing_ok=True)
        out: list[_Applied] = []
        for j in redo:
            spec = blobs[j]
            if spec.reopen is not None:
                blob = spec.reopen()
            else:
                spec.blob.seek(0)
                blob = spec.blob
            if on_event is not None:
                on_event(j, "applying")
            try:
                again = dataclasses.replace(spec, blob=blob)
                out.append(self._apply_here(again, ids[j], parents[j], limits, measure=True))
            finally:
                if spec.reopen is not None:
                    blob.close()
            if on_event is not None:
                on_event(j, "applied")
        return redo, out

    def _apply_here(
        self, spec: LayerBlob, layer_id: str, parent_id: str | None, limits: Limits, *, measure: bool
    ) -> _Applied:
        """One blob through the digests, the decompressor and the tar-split recorder into the
        driver: ``apply_diff``, or with ``measure=False`` the driver's ``apply_unmeasured``."""
        from graphdriver.archive.compression import DigestReader, drain, open_decompressed

        with _SplitWriter(self.tarsplit_path(layer_id)) as split:
            compressed = DigestReader(spec.blob, algorithm(spec.digest) if spec.digest else "sha256")
            with open_decompressed(cast(BinaryIO, compressed), limits) as tar:
                tar_digest = DigestReader(
                    cast(BinaryIO, TeeReader(tar, split.recorder)),
                    algorithm(spec.diff_id) if spec.diff_id else "sha256",
                )
                if measure:
                    self.driver.apply_diff(layer_id, parent_id, cast(BinaryIO, tar_digest), limits=limits)
                else:
                    self.driver.apply_unmeasured(  # type: ignore[attr-defined]
                        layer_id, parent_id, cast(BinaryIO, tar_digest), limits=limits
                    )
                drain(cast(BinaryIO, tar_digest))
            drain(cast(BinaryIO, compressed))
            split.finish()
        return _Applied(
            str(tar_digest.digest), str(compressed.digest), int(compressed.size), int(tar_digest.size)
        )

    def _apply_in_workers(
        self,
        blobs: list[LayerBlob],
        ids: list[str],
        parents: list[str | None],
        limits: Limits,
        workers: int,
        *,
        on_event: Callable[[int, str], None] | None = None,
    ) -> list[_Applied | BaseException]:
        """Apply each blob in a forked process of its own, at most ``workers`` at a time. A worker
        touches only its layer's directory and tar-split file (never the database) and sends back
        its :class:`_Applied` or its exception, pickled. A layer that needs its lower layers
        (:class:`~graphdriver.archive.apply.LowerLayersNeeded`) comes back as that exception, for
        the caller to apply again; any other failure stops the workers still running and the
        first such failure (bottom-up) is raised once every worker has ended.

        This process may have threads (a pull's downloads): what a worker runs is imported here
        first, and a worker does only file I/O, decompression, digests and the apply; it dies
        with this process (``PR_SET_PDEATHSIG``), so a killed import leaves no writer behind."""
        import pickle
        import signal

        import zstandard  # noqa: F401 - imported before forking: the workers write tar-splits

        import graphdriver.archive.apply
        import graphdriver.archive.compression  # noqa: F401
        from graphdriver.archive.apply import LowerLayersNeeded

        results: dict[int, Any] = {}
        running: dict[int, tuple[int, int]] = {}  # pid -> (index, read fd)
        killed: set[int] = set()
        pending = list(range(len(blobs)))
        me = os.getpid()
        libc = _libc()

        def reap() -> None:
            pid, _ = os.wait()
            index, rfd = running.pop(pid)
            with os.fdopen(rfd, "rb") as r:
                data = r.read()
            try:
                results[index] = pickle.loads(data) if data else OSError(f"layer worker {pid} died")
            except Exception as exc:  # an exception that does not unpickle
                results[index] = GraphDriverError(f"layer worker failed: {exc}")
            got = results[index]
            if isinstance(got, BaseException) and not isinstance(got, LowerLayersNeeded):
                pending.clear()
                for other, (k, _fd) in running.items():
                    killed.add(k)
                    os.kill(other, signal.SIGKILL)
            elif on_event is not None and not isinstance(got, BaseException):
                on_event(index, "applied")

        try:
            while pending or running:
                while pending and len(running) < workers:
                    index = pending.pop(0)
                    rfd, wfd = os.pipe()
                    pid = os.fork()
                    if pid == 0:  # pragma: no cover - runs in the child
                        os.close(rfd)
                        code = 0
                        try:
                            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
                            if os.getppid() != me:
                                os._exit(1)
                            out: Any = self._apply_here(
                                blobs[index], ids[index], parents[index], limits, measure=False
                            )
                        except BaseException as exc:
                            out, code = exc, 1
                        try:
                            with os.fdopen(wfd, "wb") as w:
                                try:
                                    w.write(pickle.dumps(out))
                                except Exception:
                                    w.write(pickle.dumps(GraphDriverError(f"{type(out).__name__}: {out}")))
                        finally:
                            os._exit(code)
                    os.close(wfd)
                    running[pid] = (index, rfd)
                    if on_event is not None:
                        on_event(index, "applying")
                reap()
        except BaseException:  # interrupted (Ctrl-C) or failed here: the workers' work is lost
            for other, (k, _fd) in running.items():
                killed.add(k)
                os.kill(other, signal.SIGKILL)
            raise
        finally:
            while running:
                reap()
        failures = [k for k in sorted(results) if isinstance(results[k], BaseException)]
        for k in failures:
            if k not in killed and not isinstance(results[k], LowerLayersNeeded):
                raise results[k]
        for k in failures:
            if not isinstance(results[k], LowerLayersNeeded):
                raise results[k]
        return [results[i] for i in range(len(blobs))]

    def _discard(self, layer_id: str) -> None:
        """Undo a failed build whose lock this process holds: its data first, then its record.

        The data goes first because the failure may be a full disk: the partial layer holds the
        space the metadata write needs. Meanwhile the record stays ``incomplete``, which every
        reader skips and recovery removes like ``removing``. Best effort: whatever an error here
        leaves (a busy mount, an I/O error) is the next open's recovery's.
        """
        try:
            if self.driver.exists(layer_id):
                self.driver.remove(layer_id)
            self.tarsplit_path(layer_id).unlink(missing_ok=True)
        except (OSError, GraphDriverError):
            pass
        try:
            with self.write() as txn:
                if txn.get(layer_id) is not None:
                    txn.delete(layer_id)
        except (OSError, GraphDriverError):
            pass

    # -- container (and empty) layers -------------------------------------------------------------

    def create_layer(
        self,
        parent: str | None = None,
        *,
        id: str | None = None,
        names: Iterable[str] = (),
        read_write: bool = True,
    ) -> Layer:
        """Create a layer on ``parent`` with no changes of its own: a container's read-write layer
        (``read_write=True``), or an empty image layer. ``id`` is the caller's, or random."""
        names = tuple(validate_name(n) for n in names)
        layer_id = new_layer_id() if id is None else validate_id(id)
        kind = LayerKind.CONTAINER if read_write else LayerKind.IMAGE
        with self.db.read() as txn:
            parent_layer = None if parent is None else self._resolve(txn, parent)
        parent_id = None if parent_layer is None else parent_layer.id
        lock = self.locks.layer(layer_id)
        if not lock.try_acquire():
            raise AlreadyExists(f"layer {layer_id} is being created or removed by another process")
        created = False
        try:
            with self.write() as txn:
                for n in names:
                    owner = txn.name_owner(n)
                    if owner is not None:
                        raise AlreadyExists(f"name {n!r} is already used by layer {owner}")
                txn.insert(layer_id, parent_id, kind)
            created = True
            faults.fault("create.after-record")
            with ExitStack() as stack:
                if parent_id is not None:
                    stack.enter_context(self.layer_locked(parent_id, shared=True))
                self.driver.create(layer_id, parent_id)
            faults.fault("create.after-create")
            syncfs(self.driver.home)
            with self.write() as txn:
                txn.complete(layer_id, size=0)
                txn.add_names(layer_id, names)
            faults.fault("create.after-commit")
            return self.get(layer_id)
        except BaseException:
            if created:
                self._discard(layer_id)
            raise
        finally:
            lock.release(unlink=not created)

    # -- removal ----------------------------------------------------------------------------------

    def remove(self, id_or_name: str) -> None:
        """Remove a layer. Busy while it is mounted, has child layers, or an image, a container or
        a running operation's lease uses it.

        Crash-safe: the layer is marked ``removing`` first; a crash after that leaves it to the
        next open's recovery, and it is never listed again.
        """
        with self.db.read() as txn:
            layer = txn.resolve(id_or_name)
        if layer is None:
            raise NotFound(f"layer not known: {id_or_name}")
        lock = self.locks.layer(layer.id)
        if layer.state is LayerState.COMPLETE:
            lock.acquire()
        elif not lock.try_acquire():
            raise Busy(
                f"layer {layer.id} is being {'built' if layer.state is LayerState.INCOMPLETE else 'removed'}"
            )
        try:
            with self.db.read() as txn:
                found = txn.get(layer.id)
            if found is not None:
                self.settle_pending(found)
            with self.write() as txn:
                cur = txn.get(layer.id)
                if cur is None:
                    raise NotFound(f"layer not known: {id_or_name}")
                if cur.state is LayerState.COMPLETE:
                    kids = txn.children(cur.id)
                    if kids:
                        raise Busy(f"layer {cur.id} has {len(kids)} child layer(s)")
                    if cur.mount_count > 0 and self.mount_alive(cur):
                        raise Busy(f"layer {cur.id} is mounted ({cur.mount_count} mount(s))")
                    users, leases = txn.layer_users(cur)
                    users += [f"a running operation (lease {x})" for x in leases if self.lease_alive(x)]
                    if users:
                        raise Busy(f"layer {cur.id} is used by {', '.join(users)}")
                    if cur.mount_count > 0:
                        txn.set_mount(cur.id, 0)
                # incomplete or removing with our lock held: its builder or remover died
                txn.set_state(cur.id, LayerState.REMOVING)
            faults.fault("remove.after-mark")
            try:
                self.finish_removal(layer.id)
            except Busy:
                # the driver refused before deleting anything: the layer stays as it was
                if cur.state is LayerState.COMPLETE and self.driver.exists(layer.id):
                    with self.write() as txn:
                        txn.set_state(layer.id, LayerState.COMPLETE)
                raise
        finally:
            lock.release(unlink=True)

    def finish_removal(self, layer_id: str) -> None:
        """Delete a ``removing`` layer's data, then its record. The caller holds its lock."""
        if self.driver.exists(layer_id):
            self.driver.remove(layer_id)
        self.tarsplit_path(layer_id).unlink(missing_ok=True)
        faults.fault("remove.after-driver-remove")
        with self.write() as txn:
            if txn.get(layer_id) is not None:
                txn.delete(layer_id)
        faults.fault("remove.after-delete")

    # -- leases -----------------------------------------------------------------------------------

    def lease_lock(self, lease_id: str) -> FileLock:
        """The lock that keeps lease ``lease_id`` alive while its operation runs
        (``locks/lease-<id>.lock``; see :mod:`graphdriver.layers.metadata`, table ``leases``)."""
        return FileLock(self.locks.path / f"lease-{validate_id(lease_id)}.lock")

    def lease_alive(self, lease_id: str) -> bool:
        """Whether the operation that took lease ``lease_id`` is still running (holds its lock).
        Never waits: safe under the store lock."""
        lock = self.lease_lock(lease_id)
        if not lock.path.exists():
            return False
        if lock.try_acquire():
            lock.release()
            return False
        return True

    # -- mounting ---------------------------------------------------------------------------------

    @staticmethod
    def mount_alive(layer: Layer) -> bool:
        """Whether a layer's recorded mount count is still true
        (:func:`graphdriver.layers.mountstate.mount_alive`)."""
        return mount_alive(layer)

    def settle_pending(self, layer: Layer) -> Layer:
        """Finish what a process that died between marking a mount (or last unmount) pending
        and recording its outcome left: release the driver's get, if it happened, and record
        count 0. The caller holds the layer's lock. Returns the layer as it is now."""
        if layer.mount_pending is None:
            return layer
        try:
            self.driver.put(layer.id)  # a put without a get is harmless for every driver here
        except (OSError, GraphDriverError):
            pass
        with self.write() as txn:
            txn.set_mount(layer.id, 0)
            now = txn.get(layer.id)
        assert now is not None
        return now

    def mount(self, id_or_name: str, label: str = "") -> Path:
        """Mount a layer (count one more user) and return the path of its full filesystem.

        The driver is asked to mount only on the first mount (or when the recorded count turns
        out stale: unmounted behind the store's back, or counted before a reboot); later mounts
        only count. The count is marked pending before the driver mounts, so a crash in between
        is settled by recovery rather than leaving a get nobody can put.
        """
        layer = self.get(id_or_name)
        with self.layer_locked(layer.id):
            with self.db.read() as txn:
                cur = self.settle_pending(self._resolve(txn, layer.id))
            if self.mount_alive(cur):
                assert cur.mount_point is not None
                with self.write() as txn:
                    txn.set_mount(
                        cur.id, cur.mount_count + 1, cur.mount_point, cur.mount_kind, cur.mount_boot
                    )
                return Path(cur.mount_point)
            if not self.driver.exists(cur.id):
                raise StoreCorrupt(f"layer {cur.id} is recorded but the driver has no data for it; run check")
            with self.write() as txn:
                txn.set_mount_pending(cur.id, "get")
            try:
                path = self.driver.get(cur.id, label)
            except BaseException:
                with self.write() as txn:
                    txn.set_mount(cur.id, 0)
                raise
            try:
                faults.fault("mount.after-get")
                kind = "mount" if kmount.is_mountpoint(path) else "plain"
                with self.write() as txn:
                    txn.set_mount(cur.id, 1, os.path.abspath(path), kind, boot_id())
            except BaseException:
                self.settle_pending(cur)
                raise
            faults.fault("mount.after-record")
            return Path(path)

    def unmount(self, id_or_name: str, force: bool = False) -> int:
        """Release one mount of a layer (``force``: all of them); the last one unmounts.

        Returns the remaining count. A layer that is not mounted is InvalidArgument. A count
        the kernel no longer agrees with (an external ``umount``) is released at once.
        """
        layer = self.get(id_or_name)
        with self.layer_locked(layer.id):
            with self.db.read() as txn:
                cur = self.settle_pending(self._resolve(txn, layer.id))
            if cur.mount_count == 0:
                raise InvalidArgument(f"layer {cur.id} is not mounted")
            if self.mount_alive(cur) and cur.mount_count > 1 and not force:
                with self.write() as txn:
                    txn.set_mount(
                        cur.id, cur.mount_count - 1, cur.mount_point, cur.mount_kind, cur.mount_boot
                    )
                return cur.mount_count - 1
            with self.write() as txn:
                txn.set_mount_pending(cur.id, "put")
            self.driver.put(cur.id)  # for a stale count this resyncs the driver's own count
            faults.fault("unmount.after-put")
            with self.write() as txn:
                txn.set_mount(cur.id, 0)
            return 0

    @contextmanager
    def mounted(self, id_or_name: str, label: str = "") -> Iterator[Path]:
        """mount/unmount as a context manager."""
        path = self.mount(id_or_name, label)
        try:
            yield path
        finally:
            self.unmount(id_or_name)

    # -- diffs ------------------------------------------------------------------------------------

    @contextmanager
    def _reading(self, id_or_name: str) -> Iterator[Layer]:
        """Hold shared locks on a layer and its parent (child first) while it is read."""
        layer = self.get(id_or_name)
        with ExitStack() as stack:
            stack.enter_context(self.layer_locked(layer.id, shared=True))
            if layer.parent is not None:
                stack.enter_context(self.layer_locked(layer.parent, shared=True))
            yield self.get(layer.id)

    @contextmanager
    def diff(self, id_or_name: str) -> Iterator[BinaryIO]:
        """An uncompressed OCI layer tar of the layer's changes against its recorded parent."""
        with self._reading(id_or_name) as layer, self.driver.diff(layer.id, layer.parent) as stream:
            yield stream

    def changes(self, id_or_name: str) -> list[Change]:
        with self._reading(id_or_name) as layer:
            return self.driver.changes(layer.id, layer.parent)

    def diff_size(self, id_or_name: str) -> int:
        with self._reading(id_or_name) as layer:
            return self.driver.diff_size(layer.id, layer.parent)

    def tarsplit_path(self, layer_id: str) -> Path:
        """Where the tar-split of an imported layer is kept (:mod:`graphdriver.layers.tarsplit`)."""
        return self.tarsplit_root / f"{validate_id(layer_id)}.tsplit.zst"

    @contextmanager
    def original_tar(self, id_or_name: str) -> Iterator[BinaryIO]:
        """The exact tar an image layer was imported from (uncompressed), rebuilt from its
        tar-split and the stored files. Reading it to the end verifies it against the diff ID
        (:class:`DigestMismatch` if the stored content changed). NotFound for layers that were
        not imported (container layers)."""
        with self._reading(id_or_name) as layer:
            split = self.tarsplit_path(layer.id)
            if layer.diff_id is None or not split.exists():
                raise NotFound(f"layer {layer.id} was not imported from a tar; use diff() for its changes")
            with self.driver.mounted(layer.id) as root:
                yield cast(BinaryIO, _VerifiedStream(reassemble(split, root), layer.diff_id))

    # -- usage, staging, check --------------------------------------------------------------------

    def df(self) -> DiskUsage:
        """Usage totals from the recorded sizes."""
        layers = self.layers()
        return DiskUsage(
            layers=len(layers),
            image_layers=sum(1 for la in layers if la.kind is LayerKind.IMAGE),
            container_layers=sum(1 for la in layers if la.kind is LayerKind.CONTAINER),
            size=sum(la.size for la in layers),
            compressed_size=sum(la.compressed_size or 0 for la in layers),
            uncompressed_size=sum(la.uncompressed_size or 0 for la in layers),
            mounted=sum(1 for la in layers if la.mount_count > 0),
        )

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A scratch directory under ``staging/``, removed afterwards, and by recovery if the
        process dies (its lock tells recovery it is still in use)."""
        from graphdriver.fs.remove import remove_tree

        path = Path(tempfile.mkdtemp(prefix="stage-", dir=self.staging_root))
        lock = FileLock(self.staging_root / (path.name + ".lock"))
        lock.acquire()
        try:
            yield path
        finally:
            try:
                remove_tree(path)
            finally:
                lock.release(unlink=True)

    def check(self, *, verify_content: bool = False, repair: bool = False) -> CheckReport:
        """Every inconsistency between the metadata, the driver and the kernel; see
        :mod:`graphdriver.layers.check`."""
        from graphdriver.layers.check import check

        return check(self, verify_content=verify_content, repair=repair)

    def recover(self) -> RecoveryReport:
        """Clean up after crashed operations (done by :meth:`open` already)."""
        from graphdriver.layers.recovery import recover

        return recover(self)
