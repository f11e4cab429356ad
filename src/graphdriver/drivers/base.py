"""The driver contract: the seed's graphdriver interface, in Python.

A *driver* stores layers. A layer has an id and at most one parent; its visible content is its
parent's content plus its own changes. The model, method by method:

``create(id, parent)``
    Make a new, empty-of-changes layer whose visible content equals ``parent``'s (or an empty
    root directory, mode 0755 owned by the caller, when there is no parent). An existing id is
    :class:`~graphdriver.errors.AlreadyExists`; a missing parent is :class:`NotFound`.
``remove(id)``
    Delete the layer and its storage. A layer that is still mounted (gets not balanced by puts)
    is :class:`~graphdriver.errors.Busy`.
``get(id, mount_label) -> Path``
    Return an absolute path where the layer's full filesystem is visible, mounting it if the
    driver mounts. Calls nest: every ``get`` must be matched by one ``put``; the first mounts,
    the last ``put`` unmounts. Counts survive the process (drivers that mount keep them on disk).
``put(id)``
    Release one ``get``.
``exists(id)``, ``status()``, ``cleanup()``
    Whether the layer exists; key/value diagnostics; unmount everything this driver mounted.

The diff methods compare a layer with its parent (``parent=None``: the whole tree, all Adds):

``diff(id, parent)``
    A context manager yielding an uncompressed OCI layer tar stream of the changes.
``changes(id, parent)``
    The sorted change list (:class:`~graphdriver.archive.types.Change`).
``apply_diff(id, parent, tar) -> int``
    Apply a layer tar (compressed or not) onto a layer freshly created on ``parent``; returns
    the size in bytes of the layer's changes.
``diff_size(id, parent)``
    Size in bytes of the changes.

The diff methods here are the *naive* defaults of the seed's ``NaiveDiffDriver``: mount both
layers and walk and compare the two trees. Drivers that know their own changes (overlay2's
``diff/`` dir) override them; there is no wrapper class. What a driver can do is declared in
:class:`Capabilities`, and callers (and the conformance suite) decide by capability, never by
name.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, ClassVar

from graphdriver.archive.types import Change, Limits


@dataclass(frozen=True)
class Capabilities:
    """What a driver can do; the conformance suite and callers select behaviour from this."""

    requires_root: bool = False
    """init refuses to run without CAP_SYS_ADMIN (mounts or ioctls)."""
    mounts: bool = False
    """get() mounts a filesystem, so get/put counts matter across processes."""
    counts_gets: bool = False
    """get/put are counted on disk even without a mount, so remove of a gotten layer is Busy
    (always true when ``mounts`` is)."""
    writable_parents: bool = True
    """a layer that has children can still be written, and its children do not see the writes
    (false for overlay-family drivers, whose parents are their children's lower dirs)."""
    native_diff: bool = False
    """diff/changes/diff_size read only the layer's own changes (O(size of the change))."""
    copy_on_write: bool = False
    """create() is O(1) in the parent's data (no full copy)."""
    max_depth: int | None = None
    """the longest parent chain the driver supports; None means unbounded."""
    preserves_ownership: bool = True
    """chown and mknod of device nodes work (False when running unprivileged)."""


class Driver(abc.ABC):
    """A storage backend for layers. See the module docstring for the model.

    Subclasses set ``name`` and ``capabilities``, implement the abstract methods, and may
    override the naive diff methods. The constructor takes the driver's home directory
    (``<root>/<name>``) and the ``--storage-opt`` options, and raises
    :class:`~graphdriver.errors.NotSupported` when the driver cannot work here.
    """

    name: ClassVar[str]
    capabilities: Capabilities = Capabilities()

    def __init__(self, home: Path | str, options: Mapping[str, str] | None = None) -> None:
        self.home = Path(os.path.abspath(home))
        self.options: dict[str, str] = dict(options or {})

    @classmethod
    def check_support(cls, home: Path) -> None:
        """Raise :class:`NotSupported` (with the reason) if the driver cannot work for ``home``.

        Must not create anything. ``graphdriver drivers`` calls it for every known driver.
        """

    def __repr__(self) -> str:
        return f"<{type(self).__name__} home={str(self.home)!r}>"

    # -- the proto-driver ----------------------------------------------------------------------

    @abc.abstractmethod
    def create(self, id: str, parent: str | None = None) -> None:
        """Create layer ``id`` on ``parent`` (None: an empty root)."""

    @abc.abstractmethod
    def remove(self, id: str) -> None:
        """Remove layer ``id`` and its storage."""

    @abc.abstractmethod
    def get(self, id: str, mount_label: str = "") -> Path:
        """Return the path of the layer's full filesystem, mounting on the first get."""

    @abc.abstractmethod
    def put(self, id: str) -> None:
        """Release one get; the last put unmounts."""

    @abc.abstractmethod
    def exists(self, id: str) -> bool:
        """Whether the driver has layer ``id``."""

    def status(self) -> list[tuple[str, str]]:
        """Key/value diagnostics (``graphdriver status``)."""
        return []

    def cleanup(self) -> None:
        """Release everything this driver holds (unmount all its mounts)."""

    def parent_of(self, id: str) -> str | None:
        """The parent recorded for ``id`` if the driver records one, else None."""
        return None

    @contextmanager
    def mounted(self, id: str, mount_label: str = "") -> Iterator[Path]:
        """``get`` as a context manager: yields the path and always ``put``s."""
        path = self.get(id, mount_label)
        try:
            yield path
        finally:
            self.put(id)

    # -- the naive diff methods (defaults, overridden by drivers with a native diff) ------------

    @contextmanager
    def diff(self, id: str, parent: str | None = None) -> Iterator[BinaryIO]:
        """Yield an uncompressed OCI layer tar of ``id``'s changes relative to ``parent``."""
        from graphdriver.archive.changes import changes_dirs
        from graphdriver.archive.export import open_export

        with self.mounted(id) as new:
            if parent is None:
                with open_export(new, None) as stream:
                    yield stream
                return
            with self.mounted(parent) as old:
                changes = changes_dirs(new, old)
            with open_export(new, changes) as stream:
                yield stream

    def changes(self, id: str, parent: str | None = None) -> list[Change]:
        """The sorted list of changes of ``id`` relative to ``parent``."""
        from graphdriver.archive.changes import changes_dirs

        with self.mounted(id) as new:
            if parent is None:
                return changes_dirs(new, None)
            with self.mounted(parent) as old:
                return changes_dirs(new, old)

    def apply_diff(
        self, id: str, parent: str | None, tar: BinaryIO, *, limits: Limits | None = None
    ) -> int:
        """Apply the layer tar ``tar`` onto ``id`` (created on ``parent``); return the change size.

        ``limits`` bound what the tar may hold (entries, entry size, path depth and length,
        decompressed bytes): :class:`~graphdriver.errors.LimitExceeded` past one; default
        :class:`~graphdriver.archive.types.Limits`."""
        from graphdriver.archive.apply import apply_layer
        from graphdriver.archive.changes import changes_dirs, changes_size, tree_size

        with self.mounted(id) as root:
            apply_layer(root, tar, limits=limits)
            if parent is None:
                return tree_size(root)
            with self.mounted(parent) as old:
                return changes_size(root, changes_dirs(root, old))

    def verify_records(self, id: str, ancestors: Sequence[str], *, repair: bool) -> list[str]:
        """Check the driver's own records of layer ``id`` that repeat what the layer store knows
        (``ancestors``: its parent, grandparent... uppermost first, the source of truth); return
        what is wrong, one line each, rewriting it when ``repair``. Drivers that keep no such
        records (the default) have nothing to check. overlay2 keeps ``link``/``parent``/``lower``
        files that its create does not fsync."""
        return []

    def diff_size(self, id: str, parent: str | None = None) -> int:
        """Size in bytes of ``id``'s changes relative to ``parent``."""
        from graphdriver.archive.changes import changes_size

        changes = self.changes(id, parent)
        with self.mounted(id) as root:
            return changes_size(root, changes)
