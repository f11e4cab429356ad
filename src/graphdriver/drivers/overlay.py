"""overlay: the seed's 2014 overlay driver (one lowerdir, hard-link farms), on today's kernel.

This is Docker's ``overlayfs`` graph backend as committed in 453552c838 (Alexander Larsson, 2014),
kept faithfully as a reference point; ``overlay2`` is the design that replaced it. The kernel of
2014 could stack only **one** lower directory, so every overlay mount must sit on one fully
materialised tree. The driver therefore has two shapes of layer::

    <home>/                          0700
        .mounts/                     mount counts shared by every process (MountCounter)
        <id>/                        0700
            root/                    EITHER a complete filesystem tree: a "root layer"
                                     (a layer without a parent, or an image layer after apply_diff)
        <id>/                        0700   OR an "overlay layer" (-init and container layers,
            upper/                          and image layers until apply_diff converts them):
                                     overlay upperdir; owner, mode, times, xattrs of the parent's
                                     root/ (case A) or a deep copy of the parent's upper/ (case B)
            work/                    overlay workdir, 0700
            merged/                  mount point of the overlay, 0700
            lower-id                 the id whose root/ is the single lowerdir (no newline)
            tmproot-<random>/        transient, only while apply_diff builds the new root/
            parent                   (either shape) the id the layer was created on; not in the
                                     seed, which kept no parents: for parent_of / ``graphdriver diff``

``create(id, parent)`` has the seed's two cases:

- **A, the parent has root/** (``<cid>-init`` on an image, a fresh image layer): an empty upper on
  the parent's root; ``lower-id`` is the parent.
- **B, the parent has no root/** (``<cid>`` on ``<cid>-init``): the layer inherits the parent's
  ``lower-id`` and gets a deep copy of the parent's ``upper/`` (:func:`~graphdriver.fs.copy.copy_tree`,
  which keeps the kernel's 0/0 char-device whiteouts and every ``trusted.overlay.*`` xattr, the
  opaque marker included), so both layers overlay the same image root.

``apply_diff(id, parent, tar)`` converts image layers into root layers: when the parent has a
``root/``, it hard-links every regular file of the parent's ``root/`` into ``<id>/tmproot-<random>``
(directories, symlinks and devices are recreated), applies the layer on top with OCI whiteouts (a
deletion is a real unlink; :func:`~graphdriver.archive.apply.apply_layer` never writes into an
existing file, it unlinks and recreates, so the parent's shared inodes are never modified),
renames the result to ``root/`` and drops ``upper/``, ``work/``, ``merged/`` and ``lower-id``.
Otherwise (no parent, or a parent without ``root/``) it is the base class's naive apply through
the layer's mounted view, where the kernel writes the whiteouts into ``upper/``. The seed assumed
that apply_diff runs once on a freshly created layer; here an apply that would replace an upper
holding changes is refused. Diff, Changes and DiffSize are the base class's naive two-tree walk,
as in the seed.

``get`` returns ``root/`` for a root layer (counted, nothing mounted) and mounts ``overlay`` on
``merged/`` for an overlay layer on the first get:
``lowerdir=<home>/<lower-id>/root,upperdir=<home>/<id>/upper,workdir=<home>/<id>/work``, plus
``context="<label>"`` when a mount label is given and SELinux is on (without SELinux the label is
dropped, as libcontainer's ``label.FormatMountLabel`` did for the seed). The last ``put``
unmounts. Counts are kept on disk and checked against the kernel's mount table, so a get in one
process and a put in another balance (the seed kept them in memory and forgot them on restart).

Differences from the 2014 code, all deliberate:

- The filesystem type is ``overlay``: the seed mounted ``overlayfs`` (the out-of-tree patch set,
  v22+); mainline 3.18 renamed the type to ``overlay`` and Docker renamed the driver after it
  (c57317893a, Dec 2014). The kernel whiteout format is the one both used: 0/0 char devices and
  ``trusted.overlay.opaque=y``. Kernels with the new mount API get the same single lower through
  ``fsconfig`` (``lowerdir+``, :func:`~graphdriver.mount.mount_overlay`).
- Case A copies the parent root's owner, times and xattrs to the new upper as well as its mode,
  so the merged root directory equals the parent's exactly.
- ``remove`` refuses a mounted layer, and a layer that is the lower of a mounted layer
  (:class:`~graphdriver.errors.Busy`); ``cleanup`` unmounts everything; ``check_support``
  refuses a backing filesystem that cannot hold an upper dir (overlay itself, aufs, nfs...).
  The hard-link copy does not rewrite the shared inodes' metadata, and directory times are set
  after their children (the seed's copyDir bugs, fixed upstream in 2015 and 2017).

Why the design was superseded (spec section 6.6), measured with ``bench/overlay_footprint.py`` on
the bench image (three layers: Debian minbase, python3 + a Django venv, a 15-entry edit layer; the
final rootfs has 11,445 files, 3,491 directories and 837 symlinks), each driver on a fresh
loop-mounted 8 GiB ext4, kernel 6.18; ``statvfs`` deltas after ``syncfs``; containers made as the
daemon does (``<c>-init`` on the image with SetupInitLayer's files, ``<c>`` on it), 3 averaged:

| driver   | image inodes | per layer 1 / 2 / 3     | image MiB | layer 3 KiB | nlink | per container  |
|----------|-------------:|-------------------------|----------:|------------:|------:|----------------|
| overlay  |       23,479 | 6,661 / 12,490 / 4,328  |     278.0 |      14,480 |     6 | 34 ino, 76 KiB |
| overlay2 |       18,798 | 6,663 / 12,113 / 22     |     262.6 |          92 |     2 | 28 ino, 68 KiB |
| vfs      |       38,189 | 6,660 / 15,765 / 15,764 |     557.7 |     220,620 |     2 | 31,542 ino, 431 MiB |

(nlink: the highest link count of a file in the driver's home; ino: inodes.)

- **Inodes.** Every image layer is a full directory skeleton of the whole image: layer 3 changes
  15 entries, yet costs 4,328 inodes (exactly the image's 3,491 directories and 837 symlinks, all
  recreated) and 14 MiB of directory blocks, against 22 inodes and 92 KiB under overlay2. Each
  further layer of an image pays its whole skeleton again, so inode use grows as
  layers x directories; overlay2 stores only each layer's own changes.
- **Link counts.** Every regular file is linked once more by every image layer above it: the
  highest count here, 6, is a file with two names in layer 1, linked by layers 2 and 3. Counts
  grow with the depth of the chain until the filesystem's cap (ext4: 65,000) ends an apply in
  EMLINK, "too many links".
- **Containers copy the init layer.** A container's upper is a deep copy of its ``-init`` layer's
  upper (create case B), paid again for every container (6 inodes and 8 KiB more than overlay2
  here, where the init layer is small; it grows with whatever the init layer holds), where
  overlay2 simply lists the init layer as one more lower.
- Two shapes of layer converted in place, invariants the code merely assumed (one apply per layer,
  no in-place writes), and the naive two-tree diff: overlay2 replaced all of it with one shape,
  many lowers and a native diff of ``diff/``.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from graphdriver.archive.types import Limits
from graphdriver.drivers.base import Capabilities, Driver
from graphdriver.drivers.overlayutils import UNSUPPORTED_BACKING, backing_fs, overlay_in_kernel
from graphdriver.errors import (
    AlreadyExists,
    Busy,
    IncompatibleFilesystem,
    InvalidArgument,
    MountError,
    NotFound,
    NotSupported,
    StoreCorrupt,
)
from graphdriver.ids import validate_id, validate_parent

ROOT = "root"
UPPER = "upper"
WORK = "work"
MERGED = "merged"
LOWER_ID = "lower-id"
PARENT = "parent"
TMPROOT_PREFIX = "tmproot-"
MOUNTS_DIR = ".mounts"

_OVERLAY_DIRS = (UPPER, WORK, MERGED)


def _selinux_enabled() -> bool:
    """Whether SELinux is active (selinuxfs is there); a mount label means nothing otherwise,
    and overlay refuses ``context=`` from fsconfig(2) when no LSM claims it."""
    return os.path.exists("/sys/fs/selinux/enforce")


def _copy_dir_metadata(src: Path, dst: Path) -> None:
    """Give directory ``dst`` the owner, mode, xattrs and times of directory ``src``."""
    st = os.lstat(src)
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    for name in os.listxattr(src, follow_symlinks=False):
        os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


class OverlayDriver(Driver):
    """The seed's overlay driver: root layers and single-lower overlay layers (module docstring)."""

    name = "overlay"
    capabilities = Capabilities(
        requires_root=True,
        mounts=True,
        native_diff=False,
        copy_on_write=True,
        writable_parents=False,
        max_depth=None,
    )

    def __init__(self, home: Path | str, options: Mapping[str, str] | None = None) -> None:
        super().__init__(home, options)
        if not overlay_in_kernel():  # as the seed: load the module, best effort
            subprocess.run(["modprobe", "overlay"], capture_output=True, check=False)
        if self.options:
            raise InvalidArgument(
                f"overlay takes no options (got {', '.join(sorted(self.options))})"
            )
        self.check_support(self.home)
        os.makedirs(self.home, mode=0o700, exist_ok=True)
        os.chmod(self.home, 0o700)
        from graphdriver.drivers.mountcount import MountCounter

        self._counter = MountCounter(self.home / MOUNTS_DIR)
        self._lock = threading.RLock()

    # -- support -------------------------------------------------------------------------------

    @classmethod
    def check_support(cls, home: Path) -> None:
        """Root, the kernel's ``overlay`` filesystem, and a backing filesystem that is not overlay."""
        if os.geteuid() != 0:
            raise NotSupported("needs root (mounts overlay, writes trusted.* xattrs)", cls.name)
        if not overlay_in_kernel():
            raise NotSupported(
                "the kernel has no overlay filesystem (not in /proc/filesystems; try modprobe overlay)",
                cls.name,
            )
        fstype = backing_fs(Path(home))
        if fstype in UNSUPPORTED_BACKING:
            raise IncompatibleFilesystem(
                f"{home} is on {fstype}, which cannot hold an overlay upper dir", cls.name
            )

    # -- paths ---------------------------------------------------------------------------------

    def _dir(self, id: str) -> Path:
        return self.home / validate_id(id)

    def _existing(self, id: str) -> Path:
        d = self._dir(id)
        if not d.is_dir():
            raise NotFound(f"overlay: no such layer: {id}")
        return d

    def _lower_id(self, id: str, d: Path) -> str:
        try:
            value = (d / LOWER_ID).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise StoreCorrupt(f"overlay: layer {id} has neither root/ nor lower-id") from None
        try:
            return validate_id(value)
        except InvalidArgument:
            raise StoreCorrupt(f"overlay: layer {id} has an invalid lower-id {value!r}") from None

    def is_root_layer(self, id: str) -> bool:
        """Whether ``id`` is a root layer (a complete tree in ``root/``) rather than an overlay layer."""
        return (self._existing(id) / ROOT).is_dir()

    def lower_of(self, id: str) -> str | None:
        """The id whose ``root/`` is ``id``'s lowerdir; None for a root layer."""
        d = self._existing(id)
        if (d / ROOT).is_dir():
            return None
        return self._lower_id(id, d)

    def _layer_ids(self) -> list[str]:
        try:
            names = sorted(os.listdir(self.home))
        except FileNotFoundError:
            return []
        return [n for n in names if not n.startswith(".") and (self.home / n).is_dir()]

    # -- create / remove -----------------------------------------------------------------------

    def create(self, id: str, parent: str | None = None) -> None:
        d = self._dir(id)
        parent = validate_parent(parent)
        with self._lock:
            pdir = self._existing(parent) if parent is not None else None
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                raise AlreadyExists(f"overlay: layer already exists: {id}") from None
            try:
                os.chmod(d, 0o700)
                if parent is not None:
                    (d / PARENT).write_text(parent)
                if pdir is None:
                    os.mkdir(d / ROOT, 0o755)
                    os.chmod(d / ROOT, 0o755)
                    return
                assert parent is not None
                if (pdir / ROOT).is_dir():
                    self._create_on_root(d, parent, pdir)
                else:
                    self._create_on_overlay(d, parent, pdir)
            except BaseException:
                from graphdriver.fs.remove import remove_tree

                remove_tree(d)
                raise

    def _create_on_root(self, d: Path, parent: str, pdir: Path) -> None:
        """Case A: an empty upper on the parent's root/."""
        os.mkdir(d / UPPER, 0o700)
        _copy_dir_metadata(pdir / ROOT, d / UPPER)
        self._make_work_dirs(d)
        self._write_lower_id(d, parent)

    def _create_on_overlay(self, d: Path, parent: str, pdir: Path) -> None:
        """Case B: inherit the parent's lower-id and deep-copy its upper/."""
        from graphdriver.fs.copy import copy_tree

        lower = self._lower_id(parent, pdir)
        if not (self.home / lower / ROOT).is_dir():
            raise StoreCorrupt(f"overlay: layer {parent} sits on {lower}, which has no root/")
        if not (pdir / UPPER).is_dir():
            raise StoreCorrupt(f"overlay: layer {parent} has a lower-id but no upper/")
        self._write_lower_id(d, lower)
        copy_tree(pdir / UPPER, d / UPPER)
        self._make_work_dirs(d)

    @staticmethod
    def _make_work_dirs(d: Path) -> None:
        for name in (WORK, MERGED):
            os.mkdir(d / name, 0o700)
            os.chmod(d / name, 0o700)

    @staticmethod
    def _write_lower_id(d: Path, lower: str) -> None:
        fd = os.open(d / LOWER_ID, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, lower.encode())
        finally:
            os.close(fd)

    def parent_of(self, id: str) -> str | None:
        """The id ``id`` was created on (None for a layer without a parent)."""
        d = self._existing(id)
        try:
            return (d / PARENT).read_text() or None
        except FileNotFoundError:
            return None

    def remove(self, id: str) -> None:
        from graphdriver.fs.remove import remove_tree

        with self._lock:
            d = self._existing(id)
            if self._counter.count(id) > 0:
                raise Busy(f"overlay: layer {id} is in use ({self._counter.count(id)} gets not put)")
            for other in self._counter.active():
                if other == id:
                    continue
                lower_file = self.home / other / LOWER_ID
                try:
                    lower = lower_file.read_text(encoding="utf-8")
                except OSError:
                    continue
                if lower == id:
                    raise Busy(f"overlay: layer {id} is the lower of mounted layer {other}")
            remove_tree(d)
            self._counter.forget(id)

    def exists(self, id: str) -> bool:
        return self._dir(id).is_dir()

    # -- get / put -----------------------------------------------------------------------------

    def get(self, id: str, mount_label: str = "") -> Path:
        with self._lock:
            d = self._existing(id)
            if (d / ROOT).is_dir():
                path = d / ROOT
                self._counter.acquire(id, path, lambda: None, mounts=False)
                return path
            lower = self._lower_id(id, d)
            lower_root = self.home / lower / ROOT
            if not lower_root.is_dir():
                raise StoreCorrupt(f"overlay: layer {id} sits on {lower}, which has no root/")
            options: list[str] = []
            if mount_label:
                if '"' in mount_label or "," in mount_label:
                    raise InvalidArgument(f"invalid mount label {mount_label!r}")
                if _selinux_enabled():  # as libcontainer's label.FormatMountLabel: else dropped
                    options.append(f'context="{mount_label}"')
            merged = d / MERGED

            def do_mount() -> None:
                from graphdriver.mount import mount_overlay

                mount_overlay(
                    merged, lowers=[lower_root], upper=d / UPPER, work=d / WORK, options=options
                )

            self._counter.acquire(id, merged, do_mount)
            return merged

    def put(self, id: str) -> None:
        with self._lock:
            d = self._dir(id)
            root = (d / ROOT).is_dir()
            path = d / ROOT if root else d / MERGED

            def do_unmount() -> None:
                if root:
                    return
                from graphdriver.mount import unmount

                unmount(path)

            self._counter.release(id, path, do_unmount)

    def cleanup(self) -> None:
        from graphdriver.mount import mounts_under, unmount

        with self._lock:
            errors = []
            for m in mounts_under(self.home):
                try:
                    unmount(m.mount_point)
                except MountError:
                    try:
                        unmount(m.mount_point, detach=True)
                    except MountError as exc:
                        errors.append(str(exc))
            for id in self._counter.active():
                self._counter.forget(id)
            if errors:
                raise MountError("overlay cleanup: " + "; ".join(errors))

    # -- status --------------------------------------------------------------------------------

    def status(self) -> list[tuple[str, str]]:
        fstype = backing_fs(self.home)
        ids = self._layer_ids()
        roots = sum(1 for i in ids if (self.home / i / ROOT).is_dir())
        return [
            ("Backing Filesystem", fstype),
            ("Layers", str(len(ids))),
            ("Root Layers", str(roots)),
            ("Overlay Layers", str(len(ids) - roots)),
            ("Mounted", str(sum(1 for i in self._counter.active() if not (self.home / i / ROOT).is_dir()))),
        ]

    # -- apply_diff: the hard-link farm ----------------------------------------------------------

    def apply_diff(
        self, id: str, parent: str | None, tar: BinaryIO, *, limits: Limits | None = None
    ) -> int:
        """Apply ``tar`` onto ``id``; onto a parent with ``root/``, build a hard-linked ``root/``.

        See the module docstring. Returns the size in bytes of the layer's changes.
        """
        d = self._existing(id)
        parent = validate_parent(parent)
        pdir = self._existing(parent) if parent is not None else None
        if pdir is None or not (pdir / ROOT).is_dir():
            return super().apply_diff(id, parent, tar, limits=limits)
        assert parent is not None
        with self._lock:
            if (d / ROOT).is_dir():
                raise InvalidArgument(
                    f"overlay: layer {id} already holds a complete tree; apply_diff runs once, "
                    f"on a layer freshly created on {parent}"
                )
            lower = self._lower_id(id, d)
            if lower != parent:
                raise InvalidArgument(f"overlay: layer {id} was created on {lower}, not on {parent}")
            if self._counter.count(id) > 0:
                raise Busy(f"overlay: layer {id} is mounted; apply_diff needs it unmounted")
            with os.scandir(d / UPPER) as it:
                if any(True for _ in it):
                    raise InvalidArgument(
                        f"overlay: layer {id} has changes in its upper; apply_diff runs once, "
                        "on a freshly created layer"
                    )
            return self._apply_hardlinked(id, d, pdir / ROOT, tar, limits)

    def _apply_hardlinked(
        self, id: str, d: Path, parent_root: Path, tar: BinaryIO, limits: Limits | None
    ) -> int:
        from graphdriver.archive.apply import apply_layer
        from graphdriver.archive.changes import changes_dirs, changes_size
        from graphdriver.fs.copy import copy_tree
        from graphdriver.fs.remove import remove_tree

        tmp = d / (TMPROOT_PREFIX + secrets.token_hex(8))
        try:
            copy_tree(parent_root, tmp, hardlink_files=True)
            apply_layer(tmp, tar, limits=limits)
            os.rename(tmp, d / ROOT)
        except BaseException:
            remove_tree(tmp)
            raise
        # the layer is a root layer from here on: get() looks at root/ first, so a crash before
        # the overlay parts are gone leaves only garbage that remove() deletes with the layer
        for name in _OVERLAY_DIRS:
            remove_tree(d / name)
        try:
            os.unlink(d / LOWER_ID)
        except FileNotFoundError:
            pass
        root = d / ROOT
        size: int = changes_size(root, changes_dirs(root, parent_root))
        return size


__all__ = ["OverlayDriver"]
