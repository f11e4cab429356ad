"""The vfs driver: every layer is a complete, plain copy of its parent. No mounts, no root needed.

On-disk layout (``<home>`` is ``<root>/vfs``)::

    <home>/                        0700: no other user may reach into a layer (CVE-2021-41091)
    |-- dir/                       0700
    |   |-- <id>/                  the layer's whole tree; this directory's own owner, mode,
    |   |                          xattrs and times are the layer's "/"
    |   |-- .tmp-<id>-<random>/    a layer being created (flock'ed while it is built); renamed
    |   |                          to <id> when complete, so a half-built layer is never visible
    |   `-- .rm-<id>-<random>/     a layer being removed: renamed away first, then deleted
    `-- parents/<id>               the parent's id (no file: no parent), written before the
                                   layer is renamed into place, removed after it is gone

``create(id, parent)`` copies the parent's tree with :func:`~graphdriver.fs.copy.copy_tree`
(reflinks where the filesystem has them, so data is shared until written) into a ``.tmp-``
directory and renames it into place without replacing anything (``renameat2`` with
``RENAME_NOREPLACE``). A crash leaves at most a ``.tmp-`` or ``.rm-`` directory, which
:meth:`VfsDriver.cleanup` deletes (a ``.tmp-`` one only if no process holds its lock) and which
:meth:`VfsDriver.exists` never reports: ids never begin with a dot. Durability (``syncfs``) is
the layer store's job, done once per layer it commits.

``get`` returns ``dir/<id>`` and ``put`` does nothing: there is nothing to mount and nothing to
count (removing a layer that is in use is the caller's to prevent; the layer store does). The
diff methods are the naive ones of :class:`~graphdriver.drivers.base.Driver`. A parent record
left by a crash is harmless: create rewrites (or removes) it before a layer of that id appears.

Without root the driver still works, but it cannot keep owners (copies belong to the caller) and
cannot copy a device node: creating a child of a layer that holds one raises
:class:`~graphdriver.errors.PermissionDenied` naming the node, and leaves no partial layer.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from graphdriver.drivers.base import Capabilities, Driver
from graphdriver.errors import AlreadyExists, Busy, InvalidArgument, NotFound
from graphdriver.fs.copy import copy_tree, supports_reflink
from graphdriver.fs.remove import mount_points_under, remove_tree
from graphdriver.fs.statfs import filesystem_type
from graphdriver.ids import validate_id, validate_parent

__all__ = ["VfsDriver", "filesystem_type"]

LAYERS_DIR = "dir"
PARENTS_DIR = "parents"
TMP_PREFIX = ".tmp-"
RM_PREFIX = ".rm-"

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists, even as an empty directory."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    # no RENAME_NOREPLACE here: rename() would silently replace an empty directory
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


class VfsDriver(Driver):
    """Layers as full copies (module docstring). Works everywhere, with or without root."""

    name = "vfs"

    def __init__(self, home: Path | str, options: Mapping[str, str] | None = None) -> None:
        super().__init__(home, options)
        if self.options:
            raise InvalidArgument(f"vfs: unknown options: {', '.join(sorted(self.options))} (vfs takes none)")
        self.home.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(self.home, 0o700)
        except FileExistsError:
            if stat.S_IMODE(os.stat(self.home).st_mode) != 0o700:
                os.chmod(self.home, 0o700)
        self.layers_dir = self.home / LAYERS_DIR
        self.parents_dir = self.home / PARENTS_DIR
        self.capabilities = Capabilities(
            requires_root=False,
            mounts=False,
            native_diff=False,
            copy_on_write=supports_reflink(self.home),
            max_depth=None,
            preserves_ownership=os.geteuid() == 0,
        )

    @classmethod
    def check_support(cls, home: Path) -> None:
        """vfs works on any filesystem, with or without root."""

    def _path(self, id: str) -> Path:
        return self.layers_dir / validate_id(id)

    def _is_layer(self, path: Path) -> bool:
        try:
            return stat.S_ISDIR(os.lstat(path).st_mode)
        except FileNotFoundError:
            return False

    def _require(self, id: str) -> Path:
        path = self._path(id)
        if not self._is_layer(path):
            raise NotFound(f"vfs: no layer {id}")
        return path

    # -- the proto-driver ----------------------------------------------------------------------

    def exists(self, id: str) -> bool:
        """Whether layer ``id`` exists (an invalid id is :class:`InvalidArgument`)."""
        return self._is_layer(self._path(id))

    def create(self, id: str, parent: str | None = None) -> None:
        """Make layer ``id``: a copy of ``parent``'s tree, or an empty 0755 root owned by the caller."""
        path = self._path(id)
        parent = validate_parent(parent)
        if self._is_layer(path):
            raise AlreadyExists(f"vfs: layer {id} already exists")
        parent_path = self._require(parent) if parent is not None else None
        self.layers_dir.mkdir(mode=0o700, exist_ok=True)
        tmp, lock_fd = self._new_tmp(id)
        try:
            if parent_path is None:
                os.chmod(tmp, 0o755)
            else:
                copy_tree(parent_path, tmp)
            self._record_parent(id, parent)
            try:
                _rename_noreplace(tmp, path)
            except FileExistsError:
                raise AlreadyExists(f"vfs: layer {id} already exists") from None
        except BaseException:
            try:
                remove_tree(tmp)
            except Exception:  # keep the original error; cleanup() retries
                pass
            finally:
                os.close(lock_fd)
            raise
        os.close(lock_fd)

    def _record_parent(self, id: str, parent: str | None) -> None:
        self.parents_dir.mkdir(mode=0o700, exist_ok=True)
        record = self.parents_dir / id
        if parent is None:
            record.unlink(missing_ok=True)
            return
        tmp = self.parents_dir / f"{TMP_PREFIX}{id}-{secrets.token_hex(6)}"
        tmp.write_text(parent)
        os.replace(tmp, record)

    def parent_of(self, id: str) -> str | None:
        """The parent ``id`` was created on (None for a base layer)."""
        self._require(id)
        try:
            return (self.parents_dir / id).read_text() or None
        except FileNotFoundError:
            return None

    def _new_tmp(self, id: str) -> tuple[Path, int]:
        """A fresh ``.tmp-<id>-<random>`` directory, locked so that cleanup() leaves it alone."""
        while True:
            tmp = self.layers_dir / f"{TMP_PREFIX}{id}-{secrets.token_hex(6)}"
            os.mkdir(tmp, 0o700)
            try:
                fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # a concurrent cleanup() removed it before we could lock it
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink > 0:  # a concurrent cleanup() did not take it first
                return tmp, fd
            os.close(fd)

    def remove(self, id: str) -> None:
        """Delete layer ``id``: it disappears at once (rename), then its tree is removed."""
        path = self._require(id)
        mounts = mount_points_under(path)
        if mounts:
            raise Busy(f"vfs: layer {id} has a mount inside it: {mounts[0]}")
        trash = self.layers_dir / f"{RM_PREFIX}{id}-{secrets.token_hex(6)}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            raise NotFound(f"vfs: no layer {id}") from None
        (self.parents_dir / id).unlink(missing_ok=True)
        remove_tree(trash)

    def get(self, id: str, mount_label: str = "") -> Path:
        """The layer's directory (``mount_label`` is ignored: nothing is mounted)."""
        return self._require(id)

    def put(self, id: str) -> None:
        """Nothing to release; an unknown layer is :class:`NotFound`."""
        self._require(id)

    def layers(self) -> list[str]:
        """The ids of every layer, sorted."""
        try:
            names = os.listdir(self.layers_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not n.startswith(".") and self._is_layer(self.layers_dir / n))

    def status(self) -> list[tuple[str, str]]:
        """Backing filesystem, reflink support and the number of layers."""
        return [
            ("Backing Filesystem", filesystem_type(self.home)),
            ("Supports reflink", "true" if self.capabilities.copy_on_write else "false"),
            ("Layers", str(len(self.layers()))),
        ]

    def cleanup(self) -> None:
        """Delete what an interrupted create or remove left behind (never a create in progress)."""
        try:
            names = os.listdir(self.layers_dir)
        except FileNotFoundError:
            return
        for name in names:
            path = self.layers_dir / name
            if name.startswith(RM_PREFIX):
                remove_tree(path)
            elif name.startswith(TMP_PREFIX):
                self._remove_unlocked(path)

    @staticmethod
    def _remove_unlocked(path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        except (NotADirectoryError, OSError) as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            os.unlink(path)  # never a create of ours (those are directories): removed, not followed
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # a create in progress, in this or another process
            remove_tree(path)
        finally:
            os.close(fd)
