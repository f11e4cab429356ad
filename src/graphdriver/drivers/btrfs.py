"""The btrfs driver: every layer is a btrfs subvolume, and a child is a snapshot of its parent.

On-disk layout (``<home>`` = ``<root>/btrfs``, which must be on btrfs)::

    <home>/                          0700
    |-- subvolumes/                  0700
    |   |-- <base>/                  a btrfs subvolume, created empty (root directory 0755)
    |   `-- <child>/                 a writable snapshot of subvolumes/<parent>: O(1), copy-on-write
    |-- meta/                        0700
    |   `-- <id>                     {"parent": "<id>" | null}; written after the subvolume
    `-- counts/                      get/put counts (MountCounter, "plain": nothing is mounted)
        `-- <id>

The model, as in the seed's btrfs backend:

- ``create(id, None)`` is ``BTRFS_IOC_SUBVOL_CREATE``; ``create(id, parent)`` is
  ``BTRFS_IOC_SNAP_CREATE_V2`` of the parent's subvolume (writable, flags 0). A snapshot shares
  every extent with its parent, so it costs the same for a 1 KiB and a 100 GiB layer. Nested
  subvolumes (made inside a layer by its user) are not part of a snapshot: btrfs leaves an empty
  directory in their place.
- ``get`` returns ``subvolumes/<id>``; nothing is mounted. Gets are still counted (on disk, so
  across processes), and ``remove`` of a layer with outstanding gets is :class:`Busy`.
- ``remove`` destroys the nested subvolumes first, deepest first, then the layer's subvolume, then
  removes anything left with :func:`remove_tree`, then the metadata. Nested subvolumes are found in
  the root tree (``ROOT_REF`` items, ``BTRFS_IOC_TREE_SEARCH``) and destroyed by subvolume id
  (``BTRFS_IOC_SNAP_DESTROY_V2`` with ``BTRFS_SUBVOL_SPEC_BY_ID``), so no path inside the layer,
  which its user controls, is ever followed.
- ``size=<bytes>`` (``100M``, ``1G``, ``1.5GiB``; binary units) turns quotas on and gives every
  new layer a qgroup limit on *referenced* bytes, like ``docker --storage-opt size=``: the limit
  counts all the data the layer's tree references, its parent's included. Writing past it fails
  with ``EDQUOT``. ``status`` reports the limit.
- The diff methods are the naive defaults (two-tree comparison with the parent's subvolume).

All calls are ioctls on directory file descriptors (``fcntl.ioctl``), not a subprocess per call.
Subvolume destroy, quota control and tree search need ``CAP_SYS_ADMIN`` in the initial user
namespace, so the driver requires root. (A filesystem mounted with ``user_subvol_rm_allowed``
lets a user destroy their own subvolumes, but not search the tree for nested ones or set quotas;
that mode is not supported.)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import ClassVar

from graphdriver.drivers.base import Capabilities, Driver
from graphdriver.drivers.mountcount import MountCounter
from graphdriver.errors import (
    AlreadyExists,
    Busy,
    GraphDriverError,
    InvalidArgument,
    NotFound,
    NotSupported,
    PermissionDenied,
    PrerequisitesNotMet,
)
from graphdriver.fs.remove import remove_tree
from graphdriver.fs.statfs import BTRFS_SUPER_MAGIC, fs_magic
from graphdriver.ids import validate_id, validate_parent
from graphdriver.mount import mounts, mounts_under

__all__ = ["BTRFS_SUPER_MAGIC", "BtrfsDriver", "parse_size"]

# -- the kernel interface (include/uapi/linux/btrfs.h, btrfs_tree.h) ---------------------------

_BTRFS_IOCTL_MAGIC = 0x94
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (_BTRFS_IOCTL_MAGIC << 8) | nr


_VOL_ARGS_SIZE = 4096  # struct btrfs_ioctl_vol_args: __s64 fd; char name[4088]
_VOL_ARGS_NAME_MAX = 4087
_VOL_ARGS_V2_SIZE = 4096  # fd, transid, flags, union{size, qgroup_inherit; unused[4]}, union{name; subvolid}
_VOL_ARGS_V2_NAME_OFFSET = 56
_VOL_ARGS_V2_NAME_MAX = 4039
_INO_LOOKUP_SIZE = 4096  # __u64 treeid; __u64 objectid; char name[4080]
_SEARCH_KEY = struct.Struct("=7Q4I4Q")  # struct btrfs_ioctl_search_key (104 bytes)
_SEARCH_HEADER = struct.Struct("=3Q2I")  # struct btrfs_ioctl_search_header (32 bytes)
_SEARCH_ARGS_SIZE = 4096
_QUOTA_CTL = struct.Struct("=2Q")  # cmd, status
_QGROUP_CREATE = struct.Struct("=2Q")  # create, qgroupid
_QGROUP_LIMIT = struct.Struct("=6Q")  # qgroupid, lim{flags, max_rfer, max_excl, rsv_rfer, rsv_excl}

BTRFS_IOC_SUBVOL_CREATE = _ioc(_IOC_WRITE, 14, _VOL_ARGS_SIZE)
BTRFS_IOC_SNAP_DESTROY = _ioc(_IOC_WRITE, 15, _VOL_ARGS_SIZE)
BTRFS_IOC_TREE_SEARCH = _ioc(_IOC_READ | _IOC_WRITE, 17, _SEARCH_ARGS_SIZE)
BTRFS_IOC_INO_LOOKUP = _ioc(_IOC_READ | _IOC_WRITE, 18, _INO_LOOKUP_SIZE)
BTRFS_IOC_SNAP_CREATE_V2 = _ioc(_IOC_WRITE, 23, _VOL_ARGS_V2_SIZE)
BTRFS_IOC_QUOTA_CTL = _ioc(_IOC_READ | _IOC_WRITE, 40, _QUOTA_CTL.size)
BTRFS_IOC_QGROUP_CREATE = _ioc(_IOC_WRITE, 42, _QGROUP_CREATE.size)
BTRFS_IOC_QGROUP_LIMIT = _ioc(_IOC_READ, 43, _QGROUP_LIMIT.size)
BTRFS_IOC_QUOTA_RESCAN_WAIT = _ioc(0, 46, 0)
BTRFS_IOC_SNAP_DESTROY_V2 = _ioc(_IOC_WRITE, 63, _VOL_ARGS_V2_SIZE)

_BTRFS_SUBVOL_SPEC_BY_ID = 1 << 4
_BTRFS_QUOTA_CTL_ENABLE = 1
_BTRFS_QGROUP_LIMIT_MAX_RFER = 1 << 0
_BTRFS_ROOT_TREE_OBJECTID = 1
_BTRFS_FIRST_FREE_OBJECTID = 256  # the inode number of every subvolume's root directory
_BTRFS_ROOT_REF_KEY = 156
_U64_MAX = 2**64 - 1

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _ioctl(fd: int, request: int, buf: bytearray) -> None:
    import fcntl

    fcntl.ioctl(fd, request, buf, True)


def _vol_args(name: str) -> bytearray:
    raw = os.fsencode(name)
    if len(raw) > _VOL_ARGS_NAME_MAX:
        raise InvalidArgument(f"subvolume name too long: {name!r}")
    buf = bytearray(_VOL_ARGS_SIZE)
    buf[8 : 8 + len(raw)] = raw
    return buf


def _vol_args_v2(*, fd: int = 0, flags: int = 0, name: str = "", subvolid: int = 0) -> bytearray:
    buf = bytearray(_VOL_ARGS_V2_SIZE)
    struct.pack_into("=qQQ", buf, 0, fd, 0, flags)
    if subvolid:
        struct.pack_into("=Q", buf, _VOL_ARGS_V2_NAME_OFFSET, subvolid)
    else:
        raw = os.fsencode(name)
        if len(raw) > _VOL_ARGS_V2_NAME_MAX:
            raise InvalidArgument(f"subvolume name too long: {name!r}")
        buf[_VOL_ARGS_V2_NAME_OFFSET : _VOL_ARGS_V2_NAME_OFFSET + len(raw)] = raw
    return buf


def subvol_create(dir_fd: int, name: str) -> None:
    """Create an empty subvolume ``name`` in the directory ``dir_fd``."""
    _ioctl(dir_fd, BTRFS_IOC_SUBVOL_CREATE, _vol_args(name))


def snapshot(source_fd: int, dir_fd: int, name: str) -> None:
    """Create ``name`` in ``dir_fd`` as a writable snapshot of the subvolume open at ``source_fd``."""
    _ioctl(dir_fd, BTRFS_IOC_SNAP_CREATE_V2, _vol_args_v2(fd=source_fd, name=name))


def subvol_destroy(dir_fd: int, name: str) -> None:
    """Destroy the subvolume ``name`` in ``dir_fd`` (it must have no nested subvolumes)."""
    _ioctl(dir_fd, BTRFS_IOC_SNAP_DESTROY, _vol_args(name))


def subvol_destroy_by_id(fs_fd: int, subvol_id: int) -> None:
    """Destroy subvolume ``subvol_id`` of the filesystem of ``fs_fd`` (no path is looked up)."""
    _ioctl(fs_fd, BTRFS_IOC_SNAP_DESTROY_V2, _vol_args_v2(flags=_BTRFS_SUBVOL_SPEC_BY_ID, subvolid=subvol_id))


def subvol_id(fd: int) -> int:
    """The id (tree id) of the subvolume that holds the file open at ``fd``."""
    buf = bytearray(_INO_LOOKUP_SIZE)
    struct.pack_into("=QQ", buf, 0, 0, _BTRFS_FIRST_FREE_OBJECTID)
    _ioctl(fd, BTRFS_IOC_INO_LOOKUP, buf)
    tree_id: int = struct.unpack_from("=Q", buf, 0)[0]
    return tree_id


def child_subvolumes(fs_fd: int, parent_id: int) -> list[int]:
    """Ids of the subvolumes directly inside subvolume ``parent_id`` (its ``ROOT_REF`` items)."""
    children: list[int] = []
    min_offset = 0
    while True:
        buf = bytearray(_SEARCH_ARGS_SIZE)
        _SEARCH_KEY.pack_into(
            buf, 0,
            _BTRFS_ROOT_TREE_OBJECTID, parent_id, parent_id,  # tree, min/max objectid
            min_offset, _U64_MAX, 0, _U64_MAX,  # min/max offset (the child id), min/max transid
            _BTRFS_ROOT_REF_KEY, _BTRFS_ROOT_REF_KEY, 4096, 0,  # min/max type, nr_items, unused
            0, 0, 0, 0,
        )  # fmt: skip
        _ioctl(fs_fd, BTRFS_IOC_TREE_SEARCH, buf)
        nr_items = _SEARCH_KEY.unpack_from(buf, 0)[9]
        if nr_items == 0:
            return children
        pos = _SEARCH_KEY.size
        offset = min_offset
        for _ in range(nr_items):
            _transid, objectid, offset, item_type, length = _SEARCH_HEADER.unpack_from(buf, pos)
            pos += _SEARCH_HEADER.size + length
            if objectid == parent_id and item_type == _BTRFS_ROOT_REF_KEY:
                children.append(offset)
        if offset == _U64_MAX:
            return children
        min_offset = offset + 1


def nested_subvolumes(fs_fd: int, subvol: int) -> list[int]:
    """Every subvolume below ``subvol``, deepest first (the order to destroy them in)."""
    out: list[int] = []
    for child in child_subvolumes(fs_fd, subvol):
        out.extend(nested_subvolumes(fs_fd, child))
        out.append(child)
    return out


def quota_enable(fs_fd: int) -> None:
    """Turn quota accounting on for the filesystem (a no-op if it is on) and wait for the rescan."""
    _ioctl(fs_fd, BTRFS_IOC_QUOTA_CTL, bytearray(_QUOTA_CTL.pack(_BTRFS_QUOTA_CTL_ENABLE, 0)))
    import fcntl

    fcntl.ioctl(fs_fd, BTRFS_IOC_QUOTA_RESCAN_WAIT)


def qgroup_limit(subvol_fd: int, max_referenced: int) -> None:
    """Limit the referenced bytes of the subvolume open at ``subvol_fd`` (qgroup ``0/<its id>``)."""
    buf = bytearray(_QGROUP_LIMIT.pack(0, _BTRFS_QGROUP_LIMIT_MAX_RFER, max_referenced, 0, 0, 0))
    _ioctl(subvol_fd, BTRFS_IOC_QGROUP_LIMIT, buf)


def qgroup_destroy(fs_fd: int, qgroupid: int) -> None:
    """Delete qgroup ``qgroupid`` (the kernel may already have dropped it with its subvolume)."""
    _ioctl(fs_fd, BTRFS_IOC_QGROUP_CREATE, bytearray(_QGROUP_CREATE.pack(0, qgroupid)))


# -- helpers -------------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"(?i)\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``1048576``, ``100M``, ``100MB``, ``1.5GiB`` (units are binary)."""
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise InvalidArgument(f"invalid size {text!r}: use a number of bytes or e.g. 100M, 10G")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise InvalidArgument(f"invalid size {text!r}: must be more than 0 bytes")
    return value


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest existing ancestor; PermissionError if one cannot be reached."""
    while path != path.parent:
        try:
            os.stat(path)
            return path
        except (FileNotFoundError, NotADirectoryError):
            path = path.parent
    return path


def _fstype_name(path: Path) -> str:
    """The filesystem type of the mount holding ``path``, from the mount table."""
    real = os.path.realpath(path)
    best = ""
    name = "unknown"
    for m in mounts():
        point = m.mount_point
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, name = point, m.fstype
    return name


def _privileged() -> bool:
    """Whether this process has CAP_SYS_ADMIN in the initial user namespace."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            cap_eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
        with open("/proc/self/uid_map", encoding="ascii") as f:
            init_ns = f.read().split() == ["0", "0", "4294967295"]
    except (OSError, StopIteration, ValueError):
        return False
    return init_ns and bool(cap_eff & (1 << 21))


@contextlib.contextmanager
def _open_dir(path: Path | str, *, dir_fd: int | None = None) -> Iterator[int]:
    fd = os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _os_error(exc: OSError, what: str) -> GraphDriverError:
    text = f"{what}: {os.strerror(exc.errno) if exc.errno else exc}"
    if exc.errno == errno.EEXIST:
        return AlreadyExists(text)
    if exc.errno in (errno.EPERM, errno.EACCES):
        return PermissionDenied(text)
    if exc.errno == errno.EBUSY:
        return Busy(text)
    if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
        return NotSupported(text, "btrfs")
    return GraphDriverError(text)


# -- the driver ----------------------------------------------------------------------------------


class BtrfsDriver(Driver):
    """Layers as btrfs subvolumes and snapshots; see the module docstring for the layout."""

    name: ClassVar[str] = "btrfs"
    capabilities = Capabilities(
        requires_root=True, mounts=False, counts_gets=True, native_diff=False, copy_on_write=True
    )

    def __init__(self, home: Path | str, options: Mapping[str, str] | None = None) -> None:
        super().__init__(home, options)
        self.size_limit: int | None = None
        for key, value in self.options.items():
            if key in ("size", "btrfs.size"):
                self.size_limit = parse_size(value)
            else:
                raise InvalidArgument(f"btrfs: unknown option {key!r} (known: size)")
        self.check_support(self.home)
        for d in (self.home, self._subvolumes, self._meta):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        self._counts = MountCounter(self.home / "counts")
        if self.size_limit is not None:
            with _open_dir(self.home) as fd:
                try:
                    quota_enable(fd)
                except OSError as exc:
                    raise _os_error(exc, f"btrfs: enable quotas on {self.home}") from exc

    @classmethod
    def check_support(cls, home: Path) -> None:
        """The home's nearest existing ancestor must be on btrfs, and we must be root."""
        try:
            anchor = _existing_ancestor(Path(os.path.abspath(home)))
            magic = fs_magic(anchor)
        except OSError as exc:
            raise PrerequisitesNotMet(f"cannot reach {exc.filename}: {exc.strerror}", cls.name) from exc
        if magic != BTRFS_SUPER_MAGIC:
            raise PrerequisitesNotMet(
                f"{anchor} is on {_fstype_name(anchor)} (statfs magic {magic:#x}), not btrfs", cls.name
            )
        if not _privileged():
            raise PrerequisitesNotMet(
                "btrfs subvolume destroy, tree search and quotas need CAP_SYS_ADMIN "
                "in the initial user namespace (run as root)",
                cls.name,
            )

    # -- paths and metadata -------------------------------------------------------------------------

    @property
    def _subvolumes(self) -> Path:
        return self.home / "subvolumes"

    @property
    def _meta(self) -> Path:
        return self.home / "meta"

    def _path(self, id: str) -> Path:
        return self._subvolumes / validate_id(id)

    def _write_meta(self, id: str, parent: str | None) -> None:
        final = self._meta / id
        tmp = self._meta / f".{id}.tmp"
        data = json.dumps({"parent": parent}).encode() + b"\n"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, final)  # durability is the layer store's syncfs, once per committed layer

    def _unlink_meta(self, id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._meta / id)

    def parent_of(self, id: str) -> str | None:
        try:
            with open(self._meta / validate_id(id), encoding="utf-8") as f:
                parent = json.load(f).get("parent")
        except (FileNotFoundError, ValueError):
            return None
        return parent if isinstance(parent, str) else None

    # -- the proto-driver -------------------------------------------------------------------------

    def exists(self, id: str) -> bool:
        try:
            st = os.lstat(self._path(id))
        except FileNotFoundError:
            return False
        return stat.S_ISDIR(st.st_mode)

    def create(self, id: str, parent: str | None = None) -> None:
        validate_id(id)
        parent = validate_parent(parent)
        if self.exists(id):
            raise AlreadyExists(f"layer {id} already exists")
        if parent is not None and not self.exists(parent):
            raise NotFound(f"parent layer {parent} does not exist")
        with _open_dir(self._subvolumes) as dfd:
            try:
                if parent is None:
                    subvol_create(dfd, id)
                else:
                    with _open_dir(parent, dir_fd=dfd) as src:
                        snapshot(src, dfd, id)
            except OSError as exc:  # EEXIST (a concurrent create) becomes AlreadyExists
                what = f"create subvolume {id}" if parent is None else f"snapshot {parent} as {id}"
                raise _os_error(exc, f"btrfs: {what}") from exc
            try:
                with _open_dir(id, dir_fd=dfd) as fd:
                    if parent is None:
                        os.fchmod(fd, 0o755)
                    if self.size_limit is not None:
                        try:
                            qgroup_limit(fd, self.size_limit)
                        except OSError as exc:
                            raise _os_error(exc, f"btrfs: limit {id} to {self.size_limit} bytes") from exc
                self._write_meta(id, parent)
            except BaseException:
                with contextlib.suppress(GraphDriverError, OSError):
                    self._destroy(id)
                raise

    def _require(self, id: str) -> Path:
        if not self.exists(id):
            raise NotFound(f"layer {id} does not exist")
        return self._path(id)

    def get(self, id: str, mount_label: str = "") -> Path:
        path = self._require(id)

        def still_there() -> None:  # checked again under the layer's lock: a remove may have won
            self._require(id)

        self._counts.acquire(id, path, still_there, mounts=False)
        return path

    def put(self, id: str) -> None:
        self._counts.release(id, self._path(id), lambda: None)

    def remove(self, id: str) -> None:
        path = self._require(id)

        def destroy_if_present() -> None:
            if mounts_under(path):
                raise Busy(f"layer {id} has a mount below {path}")
            self._require(id)
            self._destroy(id)

        # under the layer's count lock, so no get can slip in between the check and the destroy
        gets = self._counts.run_if_idle(id, destroy_if_present)
        if gets > 0:
            raise Busy(f"layer {id} is in use: {gets} get(s) not yet put")

    def _destroy(self, id: str) -> None:
        """Destroy nested subvolumes, the layer's subvolume, whatever remains, and its metadata."""
        with _open_dir(self._subvolumes) as dfd:
            with _open_dir(id, dir_fd=dfd) as fd:
                is_subvol = os.fstat(fd).st_ino == _BTRFS_FIRST_FREE_OBJECTID
                try:
                    own = subvol_id(fd) if is_subvol else 0
                    nested = nested_subvolumes(fd, own) if is_subvol else []
                    for child in nested:
                        subvol_destroy_by_id(dfd, child)
                except OSError as exc:
                    raise _os_error(exc, f"btrfs: destroy nested subvolumes of {id}") from exc
            if is_subvol:
                try:
                    subvol_destroy(dfd, id)
                except OSError as exc:
                    raise _os_error(exc, f"btrfs: destroy subvolume {id}") from exc
                if self.size_limit is not None:
                    for qgroup in (own, *nested):
                        with contextlib.suppress(OSError):  # newer kernels drop it themselves
                            qgroup_destroy(dfd, qgroup)
        remove_tree(self._path(id))
        self._unlink_meta(id)

    # -- diagnostics ------------------------------------------------------------------------------

    def status(self) -> list[tuple[str, str]]:
        try:
            layers = sum(1 for e in os.scandir(self._subvolumes) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            layers = 0
        st = os.statvfs(self.home)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        if self.size_limit is None:
            quota = "none"
        else:
            quota = f"{self.size_limit} bytes referenced per layer (qgroup max_rfer)"
        return [
            ("Backing Filesystem", "btrfs"),
            ("Subvolumes", str(self._subvolumes)),
            ("Layers", str(layers)),
            ("Size Limit", quota),
            ("Filesystem Used", f"{used} of {st.f_blocks * st.f_frsize} bytes"),
        ]

    def cleanup(self) -> None:
        """Nothing is mounted; drop the get counts this home holds."""
        for id in self._counts.active():
            self._counts.forget(id)
