"""Apply a layer tar onto a directory: securely, whiteout-aware, streaming.

:func:`apply_layer` is the seed's ``ApplyLayer`` (spec §2.9) rebuilt on file descriptors. The
decisions below are the contract; tests/archive/test_apply.py and test_hostile.py check each one.

Resolution. The root is opened once; an entry's *parent* is resolved with
:func:`~graphdriver.fs.inroot.open_in_root` (``openat2`` ``RESOLVE_IN_ROOT``: symlinks are followed
but clamped inside the root, ``..`` stops at the root), and the last component is acted on with
``*at`` calls that never follow it. Nothing resolved is kept across an entry that could change it
(CVE-2025-47290): the only thing kept is the parent fd of the previous entry, and only when that
parent was reached through real directories (``RESOLVE_NO_SYMLINKS``); it is reused by the next
entry only when that is a plain (non-whiteout) entry of the same parent directory, since a plain
entry acts only on ``parent/<name>`` and below, which no symlink-free path to ``parent`` crosses;
any other entry (another parent, a whiteout or opaque marker, the root) drops it before it acts.
Metadata goes through fds we hold (``fchown``/``fchmod``/``futimens``) or
``*at(AT_SYMLINK_NOFOLLOW)``, never through a symlink (CVE-2021-32760).

Names. Leading ``/`` and ``./`` are stripped and ``a/../b`` is cleaned; a name whose ``..`` climbs
above the root is a :class:`BreakoutError` (moby go-archive >= 0.3). A directory entry naming the
root itself applies its metadata to the root; any other type there is a :class:`BreakoutError`
(umoci CVE-2021-29136). A component over 255 bytes is :class:`InvalidArchive`, never truncated; a
directory component starting with ``.wh.`` is :class:`InvalidArchive` (such names cannot exist in a
layer). Symlinks are created with their target verbatim.

Hard links. The link name is cleaned like an entry name (absolute = relative to the root, kaniko
style; climbing above the root = :class:`BreakoutError`), its parent resolved in the root and the
last component linked without following (a link to a symlink is a second name of the symlink). The
target may come from a lower layer; a missing one is :class:`InvalidArchive`. The hard-link
header's own uid/gid/mode/times are ignored.

Existing paths. A directory onto a directory merges (metadata re-applied; existing xattrs not named
by the entry are removed, except overlay markers and SELinux labels). Anything else is removed
without following (a directory tree through fds) and replaced. A non-directory where a parent
directory is needed is :class:`InvalidArchive`. Missing parents are created 0755, owned 0:0 when
chown is on, whatever the umask.

Whiteouts (``WhiteoutFormat.OCI``). ``.wh.``, ``.wh..``, ``.wh...`` are :class:`InvalidArchive`.
``.wh.x`` removes the lower ``x`` (a symlink itself, never its target; a directory with its whole
tree); ``.wh..wh..opq`` in ``d`` removes every child of ``d`` not created by this layer. Whiteouts
hide only lower content: whatever this layer created (tracked by parent directory inode and name,
so aliases through symlinked parents are recognised) survives, in either order, and a directory
both whited out and re-created by the layer keeps only the layer's children. A missing target is
no error. Nothing of the whiteout remains.

Whiteouts (``WhiteoutFormat.OVERLAY``, an overlay upper/diff dir). ``.wh.x`` becomes a 0/0 char
device at ``x`` (owned as the entry, mode 0), replacing what is there and made even when nothing is
there (the target lives in a lower dir); an opaque marker sets ``trusted.overlay.opaque=y``
(``user.overlay.opaque`` with ``ApplyOptions.userxattr``) on its directory, created if needed. Plain
whiteouts inside a directory made opaque by the same layer are dropped (and earlier ones removed);
a directory re-created over a whiteout of the same layer is made opaque; a whiteout of something the
layer created itself leaves it, and of a directory holding such things leaves them (with the
directories holding them) and makes the directory opaque, as OCI keeps them.

Lower layers (``WhiteoutFormat.OVERLAY`` with ``lowers``: the lower layers' dirs, top-most first;
overlay2's native apply). The upper dir alone is not the tree the layer applies onto: the merged
view is (upper over the lowers: a 0/0 char device hides what is below, a directory with the opaque
xattr ``=y`` hides the lowers' content below it, the root merges every layer). Every path is first
resolved in the upper dir as above; only where that fails (a component missing there, or not a
directory) it is resolved again in the merged view, component by component, following symlinks of
any layer with the same in-root rules (absolute targets restart at the root, ``..`` stops there; more
than 40 is :class:`InvalidArchive`), reading the lower dirs only. The upper dir then gets the
directory the merged path resolves to, as overlayfs copy-up would: each directory on the way that
only a lower holds is copied up (made with the top-most lower dir's mode, owner, times and xattrs,
not overlay's own; lower content, not created by this layer; the parent's times are put back, a
copy-up being no change); missing components of the entry's own path are made as above (0755,
0:0; over a whiteout device, opaque); a missing one reached through a symlink is a dangling
symlink (:class:`InvalidArchive`), as with OCI. A merged-usr ``lib -> usr/lib`` in a lower and an
entry ``lib/systemd/unit`` thus give ``usr/lib/systemd/unit``, never a real ``lib`` directory
shadowing the symlink. Whiteouts and opaque markers go where their directory resolves; a whiteout
is made only where a lower shows the name (elsewhere it hides nothing, as with OCI, and overlay
would list the device as an entry of a directory that merges nothing), an opaque marker does
nothing where the merged view has no directory, and one on the root (which overlayfs always
merges) whites out each name the lowers show there instead (a directory of this layer there is
made opaque). A directory entry replacing a non-directory of the upper dir is made opaque (the
non-directory had hidden any lower directory there). A hard-link target the upper dir lacks is
looked up in the merged view: a lower non-directory is copied up (data, mode, owner, times,
xattrs) and linked; a whiteout or opaque dir hides it (:class:`InvalidArchive`). Nothing is ever
written into a lower dir. With ``ApplyOptions.lowers_unavailable`` (the layers of a stack applied
at the same time) any entry that would need the merged view raises :class:`LowerLayersNeeded`
(whiteouts are then made whether or not a lower shows the name, as without lowers).

aufs. Regular files under the top-level ``.wh..wh.plnk/`` are kept in a private temporary directory
outside the root; a hard link into it creates a file from that data and that header's metadata.
Other top-level ``.wh..wh.*`` entries are skipped.

Metadata, in order: ownership (when ``ApplyOptions.chown``; numeric ids only, no name lookups),
xattrs, mode (after chown, which clears setuid), times with nanoseconds (atime = the PAX atime, else
the mtime). ``trusted.overlay.*`` and ``user.overlay.*`` xattrs from a layer are never applied
(counted in ``xattrs_dropped``); xattrs the filesystem does not support, ``user.*`` on symlinks and
devices, and (when unprivileged) xattrs this process may not set are skipped (``xattrs_skipped``).
Directory modes that would lock the owner out (e.g. 0555, 0000) and all directory times are applied
after the last entry, each directory re-resolved in the root and only if it is still the same inode.
Regular files are created ``O_CREAT|O_EXCL|O_NOFOLLOW`` with the entry's mode; one ``fstat`` after
the data shows whether a chown or chmod is still needed (umask, default ACLs, grpid mounts), so a
file in the directory of the previous entry costs open, write, fstat, futimens, close (the first
entry of a directory also an openat2 and an fstat of it).

Devices. Numbers must fit Linux's dev_t (major < 4096, minor < 2**20): :class:`InvalidArchive`
otherwise. ``ApplyOptions.devices``: ``create`` (default; :class:`PermissionDenied` naming the
entry when mknod is not permitted), ``skip`` (create when permitted, else skip and count), ``error``
(any char/block entry is :class:`InvalidArchive`). FIFOs are always created.

Errors. Archive problems raise the typed errors of :mod:`graphdriver.errors` naming the entry;
permission problems :class:`PermissionDenied`; environmental failures (ENOSPC, EIO, EROFS...) are
re-raised as :class:`OSError`. On any error the partially applied tree is left as it is: callers
apply into a staging directory and throw it away. After the tar's end the rest of the decompressed
stream is drained, so a bad gzip CRC or zstd checksum fails the apply.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from graphdriver.archive.compression import drain, open_decompressed
from graphdriver.archive.tarformat import EntryKind, TarEntry, iter_entries
from graphdriver.archive.types import Limits, WhiteoutFormat
from graphdriver.errors import (
    BreakoutError,
    Busy,
    GraphDriverError,
    InvalidArchive,
    InvalidArgument,
    LimitExceeded,
    PermissionDenied,
)
from graphdriver.fs.inroot import MAX_SYMLINKS, open_in_root

__all__ = ["ApplyOptions", "ApplyStats", "LowerLayersNeeded", "apply_layer"]

WH_PREFIX = ".wh."
WH_META_PREFIX = ".wh..wh."
WH_OPAQUE = ".wh..wh..opq"
WH_PLNK = ".wh..wh.plnk"
NAME_MAX = 255
OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")

_O_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_O_DIR_READ = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_O_LOOK = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_INVALID_ERRNOS = frozenset(
    (
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ELOOP,
        errno.ENAMETOOLONG,
        errno.ENOENT,
        errno.EINVAL,
        errno.EMLINK,
        errno.E2BIG,
        errno.ERANGE,
        errno.EEXIST,
        errno.ENOTEMPTY,
        errno.EXDEV,
    )
)


_KEEP_ON_MERGE = ("trusted.overlay.", "user.overlay.", "security.selinux")
_COPY_UP_SKIP = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")
_COPY_UP_XATTR_SKIPPED = frozenset(
    (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES)
)


@dataclass(frozen=True)
class ApplyOptions:
    """How to apply.

    ``chown``: apply the entries' numeric uid/gid (None = only when running as euid 0).
    ``devices``: ``"create"`` char/block devices (PermissionDenied when not permitted), ``"skip"``
    them when not permitted, or ``"error"`` on any device entry.
    ``userxattr``: overlay format only: mark opaque dirs with ``user.overlay.opaque``.
    ``lowers_unavailable``: overlay format only, for applying the layers of a stack at the same
    time: the lower layers are not complete yet, so any entry whose path would have to be resolved
    in the merged view (see "Lower layers" in the module documentation) raises
    :class:`LowerLayersNeeded` instead; apply the layer again, into a fresh upper dir, with
    ``lowers`` once they are complete.
    """

    chown: bool | None = None
    devices: Literal["create", "skip", "error"] = "create"
    userxattr: bool = False
    lowers_unavailable: bool = False


class LowerLayersNeeded(GraphDriverError):
    """An apply with ``ApplyOptions.lowers_unavailable`` met an entry that needs the lower
    layers (a parent, opaque directory or hard-link target not present in the upper dir); the
    upper dir is left partially applied."""


@dataclass
class ApplyStats:
    """What an apply did.

    ``size``: regular-file sizes + symlink target lengths + hard-linked file sizes (the seed's
    ChangesSize of the applied entries); ``entries``: tar members read; ``tar_bytes``: bytes of
    uncompressed stream read (the tar and anything after its end marker); ``whiteouts``: whiteout
    and opaque entries; ``xattrs_dropped``: overlay xattrs refused; ``xattrs_skipped``: xattrs the
    filesystem or the privileges did not allow; ``devices_skipped``: device entries skipped.
    ``changes_size``: with ``lowers`` onto an empty upper dir, the seed's ChangesSize of the layer's
    change list against the lowers (exactly what
    :func:`~graphdriver.archive.changes.changes_size` of
    :func:`~graphdriver.archive.changes.changes_from_upper` gives, without walking the upper dir);
    None otherwise (then walk).
    """

    size: int = 0
    entries: int = 0
    tar_bytes: int = 0
    whiteouts: int = 0
    xattrs_dropped: int = 0
    xattrs_skipped: int = 0
    devices_skipped: int = 0
    changes_size: int | None = None


def clean_name(name: str, entry: str, limits: Limits) -> str:
    """``name`` relative to the root, cleaned; ``""`` is the root itself.

    Raises :class:`BreakoutError` when ``..`` climbs above the root, :class:`InvalidArchive` for a
    component over 255 bytes, :class:`LimitExceeded` past ``limits.max_path_depth``.
    """
    path = name.lstrip("/")
    parts = path.split("/")
    if "" in parts or "." in parts or ".." in parts:
        out: list[str] = []
        for part in parts:
            if not part or part == ".":
                continue
            if part == "..":
                if not out:
                    raise BreakoutError("name climbs above the layer root", entry)
                out.pop()
            else:
                out.append(part)
        parts = out
        path = "/".join(out)
    if len(parts) > limits.max_path_depth:
        raise LimitExceeded(f"path deeper than {limits.max_path_depth} components: {entry!r}")
    if len(path) > 63:
        for part in parts:
            if len(part) > 63 and len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
                raise InvalidArchive("name component longer than 255 bytes", entry)
    return path


class _Frame:
    __slots__ = ("dev", "fd", "ino", "keep", "kept", "name", "names", "parent_fd")

    def __init__(self, parent_fd: int, name: str, fd: int, st: os.stat_result, keep: bool) -> None:
        self.parent_fd = parent_fd
        self.name = name
        self.fd = fd
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.keep = keep
        self.kept = False
        self.names = os.listdir(fd)


_Node = tuple[int, os.stat_result]
"""A non-directory of the merged view: the fd of the layer dir that holds it, and its lstat."""


class _MergedDir:
    """A directory of the merged view: its name and, top-most first, the (layer index, O_PATH
    fd) of each layer dir merged there (index 0 is the upper dir, 1... the lowers)."""

    __slots__ = ("layers", "name")

    def __init__(self, name: str, layers: list[tuple[int, int]]) -> None:
        self.name = name
        self.layers = layers

    def close(self) -> None:
        for _, fd in self.layers:
            os.close(fd)
        self.layers = []


def _copy_data(src: int, dst: int, size: int) -> None:
    """Copy ``size`` bytes of the file ``src`` to ``dst`` (``copy_file_range``: a reflink or an
    in-kernel copy where the filesystem can, else read/write)."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src, dst, size - done)
            if n == 0:
                break
            done += n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
    os.lseek(src, done, os.SEEK_SET)
    os.lseek(dst, done, os.SEEK_SET)
    while chunk := os.read(src, 1 << 20):
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view) :]


class _Applier:
    """The state of one apply: the root fd, what this layer created, deferred directory metadata."""

    def __init__(
        self,
        root_fd: int,
        fmt: WhiteoutFormat,
        limits: Limits,
        options: ApplyOptions,
        *,
        lower_fds: list[int] | None = None,
        measure_against: list[str] | None = None,
    ) -> None:
        self.root_fd = root_fd
        self.fmt = fmt
        self.overlay = fmt is WhiteoutFormat.OVERLAY
        self.limits = limits
        self.options = options
        self.privileged = os.geteuid() == 0
        self.chown = self.privileged if options.chown is None else options.chown
        self.opaque_xattr = "user.overlay.opaque" if options.userxattr else "trusted.overlay.opaque"
        self.stats = ApplyStats()
        root_st = os.fstat(root_fd)
        self.root_key = (root_st.st_dev, root_st.st_ino)
        # (dev, parent dir inode, name) of everything this layer created or merged
        self.created: set[tuple[int, int, str]] = set()
        # overlay format: whiteout devices made by this layer, and dirs it made opaque
        self.whiteouts: set[tuple[int, int, str]] = set()
        self.opaque_dirs: set[tuple[int, int]] = set()
        # overlay format, by path in the root: dirs this layer made opaque; its whiteout devices
        self.opaque_paths: set[str] = set()
        self.whiteout_paths: set[str] = set()
        # (dev, ino) -> (path, mode, atime_ns, mtime_ns), applied at the end
        self.deferred: dict[tuple[int, int], tuple[str, int, int, int]] = {}
        self.plnk_dir: str | None = None
        self.plnk: dict[str, TarEntry] = {}
        # overlay format with lower layers (O_PATH fds, top-most first): paths the upper dir
        # cannot resolve are resolved in the merged view (or raise LowerLayersNeeded)
        self.lower_fds = lower_fds
        self.lowers_unavailable = options.lowers_unavailable
        self.merged_view = lower_fds is not None or options.lowers_unavailable
        # the upper dir path of the directory the last _parent call returned
        self.resolved = ""
        # the previous plain entry's parent: (parent, fd, dev, ino, resolved); see _entry_parent
        self.last_parent: tuple[str, int, int, int, str] | None = None
        # measuring the changes (lowers, an empty upper dir): the lower dirs' paths; the size of
        # each non-empty non-directory written and still there, by (dev, parent ino, name); the
        # upper paths of their parent dirs, by (dev, ino). See measured_changes_size.
        self.measure_against = measure_against
        self.written: dict[tuple[int, int, str], int] = {}
        self.dir_paths: dict[tuple[int, int], str] = {}
        self.root_real = os.readlink(f"/proc/self/fd/{root_fd}") if measure_against is not None else ""

    # -- helpers -------------------------------------------------------------------------

    def close(self) -> None:
        self.drop_last_parent()
        if self.plnk_dir is not None:
            shutil.rmtree(self.plnk_dir, ignore_errors=True)
            self.plnk_dir = None

    def _parent(self, parent: str, entry: str, *, create: bool) -> int:
        """An O_PATH fd of the directory ``parent`` (the root fd itself for ``""``); -1 if missing
        and ``create`` is false. ``self.resolved`` is then its path in the upper dir."""
        self.resolved = parent
        if not parent:
            return self.root_fd
        try:
            return open_in_root(self.root_fd, parent, _O_DIR_PATH)
        except FileNotFoundError:
            if self.merged_view:
                return self._merged_parent(parent, entry, create=create)
            if not create:
                return -1
            return self._make_parents(parent, entry)
        except NotADirectoryError:
            if self.merged_view:
                return self._merged_parent(parent, entry, create=create)
            if not create:
                return -1
            raise InvalidArchive("a parent of the entry is not a directory", entry) from None

    # -- the merged view (overlay format with lower layers) ------------------------------------

    def _need_lowers(self, entry: str) -> LowerLayersNeeded:
        return LowerLayersNeeded(f"entry {entry!r} needs the lower layers (its path leaves this layer)")

    def _merged_parent(self, path: str, entry: str, *, create: bool) -> int:
        """The upper dir at the merged path of ``path`` (an O_PATH or read fd), each directory on
        the way copied up or, if missing and ``create``, made; -1 when the merged view has no
        directory there and not ``create``. Sets ``self.resolved``."""
        if self.lowers_unavailable:
            raise self._need_lowers(entry)
        stack, missing, problem = self._resolve_merged(path, entry)
        try:
            if problem is not None or missing:
                if not create:
                    return -1
                if problem is not None:
                    raise InvalidArchive(f"a parent of the entry is {problem}", entry)
            return self._materialize(stack, missing, entry)
        finally:
            for d in stack[1:]:
                d.close()

    def _root_dir(self) -> _MergedDir:
        assert self.lower_fds is not None
        layers = [(0, self.root_fd), *((i + 1, fd) for i, fd in enumerate(self.lower_fds))]
        return _MergedDir("", layers)

    def _is_opaque(self, dir_fd: int, name: str) -> bool:
        try:
            value = os.getxattr(f"/proc/self/fd/{dir_fd}/{name}", self.opaque_xattr, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                return False
            raise
        return value == b"y"

    def _lookup(self, d: _MergedDir, name: str) -> tuple[_MergedDir | None, _Node | None]:
        """``name`` in the merged directory ``d``, as overlayfs looks it up: ``(dir, None)`` for a
        directory, ``(None, (dir fd, lstat))`` for a non-directory (the top-most; the fd is of the
        layer dir holding it), ``(None, None)`` when the merged view has no such name (none, or
        a 0/0 char device hides it). A directory merges the layers below that hold a directory
        there, down to a whiteout, a non-directory or an opaque directory (included)."""
        layers: list[tuple[int, int]] = []
        try:
            for index, dir_fd in d.layers:
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    if not layers and not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
                        return None, (dir_fd, st)
                    break
                layers.append((index, os.open(name, _O_LOOK, dir_fd=dir_fd)))
                if self._is_opaque(dir_fd, name):
                    break
        except BaseException:
            for _, fd in layers:
                os.close(fd)
            raise
        return (_MergedDir(name, layers) if layers else None), None

    def _resolve_merged(self, path: str, entry: str) -> tuple[list[_MergedDir], list[str], str | None]:
        """Walk the directory path ``path`` in the merged view, following symlinks as in a chroot
        (``..`` stops at the root, absolute targets restart there, at most MAX_SYMLINKS of them).

        Returns the merged directories from the root (close all but the first), the components
        of ``path`` itself that are missing from the first missing one on (to be created), and
        None or what is wrong: a symlink on the way leads nowhere, or a non-directory."""
        todo = [(part, False) for part in reversed(path.split("/"))]
        stack = [self._root_dir()]
        hops = 0
        try:
            while todo:
                name, linked = todo.pop()
                if not name or name == ".":
                    continue
                if name == "..":
                    if len(stack) > 1:
                        stack.pop().close()
                    continue
                child, node = self._lookup(stack[-1], name)
                if child is not None:
                    stack.append(child)
                    continue
                if node is None:
                    if linked:
                        return stack, [], "a dangling symlink"
                    # only components of the path itself are left (a symlink's are taken first)
                    return stack, [name, *(part for part, _ in reversed(todo))], None
                dir_fd, st = node
                if not stat.S_ISLNK(st.st_mode):
                    return stack, [], "not a directory"
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise InvalidArchive("too many levels of symbolic links in a parent of the entry", entry)
                target = os.readlink(name, dir_fd=dir_fd)
                if target.startswith("/"):
                    while len(stack) > 1:
                        stack.pop().close()
                todo.extend((part, True) for part in reversed(target.split("/")))
        except BaseException:
            for d in stack[1:]:
                d.close()
            raise
        return stack, [], None

    def _materialize(self, stack: list[_MergedDir], missing: list[str], entry: str) -> int:
        """Make the upper dir of the merged directory ``stack[-1]``/``missing``: copy up each dir
        of ``stack`` the upper dir lacks, then make the ``missing`` ones. Returns its fd."""
        fd = self.root_fd
        path = ""
        try:
            for d in stack[1:]:
                path = f"{path}/{d.name}" if path else d.name
                index, top_fd = d.layers[0]
                if index == 0:
                    nfd = os.open(d.name, _O_LOOK, dir_fd=fd)
                else:
                    nfd = self._copy_up_dir(fd, d.name, top_fd, path)
                if fd != self.root_fd:
                    os.close(fd)
                fd = nfd
            for name in missing:
                path = f"{path}/{name}" if path else name
                nfd = self._new_parent_dir(fd, name, path)
                if fd != self.root_fd:
                    os.close(fd)
                fd = nfd
        except BaseException:
            if fd != self.root_fd:
                os.close(fd)
            raise
        self.resolved = path
        return fd

    def _new_parent_dir(self, pfd: int, name: str, path: str) -> int:
        """A missing parent directory: 0755, root-owned; over a whiteout it is made opaque."""
        whiteout = False
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
                raise
            os.unlink(name, dir_fd=pfd)
            os.mkdir(name, 0o700, dir_fd=pfd)
            whiteout = True
        pst = os.fstat(pfd)
        key = (pst.st_dev, pst.st_ino, name)
        self.created.add(key)
        fd = os.open(name, _O_DIR_READ, dir_fd=pfd)
        try:
            if self.chown:
                os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o755)
            if whiteout:
                self.whiteouts.discard(key)
                self.whiteout_paths.discard(path)
                self._set_opaque(fd, path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _copy_xattrs(self, src: str, fd: int | None, dst: str | None, *, follow: bool = False) -> None:
        """Copy the xattrs of ``src`` (a path, followed only with ``follow``: a /proc/self/fd
        link) but overlay's own onto ``fd`` or the path ``dst`` (not followed), as copy-up does."""
        try:
            names = os.listxattr(src, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return
            raise
        for name in names:
            if name.startswith(_COPY_UP_SKIP):
                continue
            try:
                value = os.getxattr(src, name, follow_symlinks=follow)
                if fd is not None:
                    os.setxattr(fd, name, value)
                else:
                    assert dst is not None
                    os.setxattr(dst, name, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _COPY_UP_XATTR_SKIPPED:
                    raise
                self.stats.xattrs_skipped += 1
                self.measure_against = None  # the copy differs from its lower: walk the changes

    @staticmethod
    def _restore_times(dir_fd: int, st: os.stat_result) -> None:
        """Put back the times ``dir_fd`` had before a copy-up into it: as overlayfs, a copy-up
        is no change of the parent (``dir_fd`` may be O_PATH: through its /proc link)."""
        os.utime(f"/proc/self/fd/{dir_fd}", ns=(st.st_atime_ns, st.st_mtime_ns))

    def _copy_up_dir(self, pfd: int, name: str, src_fd: int, path: str) -> int:
        """Copy up the lower directory ``src_fd`` as ``name`` in ``pfd`` (not its content): its
        mode, owner, times and xattrs (not overlay's). Returns a read fd of the new dir."""
        st = os.fstat(src_fd)
        parent_st = os.fstat(pfd)
        os.mkdir(name, 0o700, dir_fd=pfd)
        self._restore_times(pfd, parent_st)
        fd = os.open(name, _O_DIR_READ, dir_fd=pfd)
        try:
            if self.chown:
                os.fchown(fd, st.st_uid, st.st_gid)
            self._copy_xattrs(f"/proc/self/fd/{src_fd}", fd, None, follow=True)
            mode = stat.S_IMODE(st.st_mode)
            if self.privileged or mode & 0o700 == 0o700:
                os.fchmod(fd, mode)
            else:  # keep the owner's access until the end (see finish)
                os.fchmod(fd, mode | 0o700)
                nst = os.fstat(fd)
                self.deferred[(nst.st_dev, nst.st_ino)] = (path, mode, st.st_atime_ns, st.st_mtime_ns)
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _copy_up_node(self, pfd: int, name: str, src_dir_fd: int, st: os.stat_result) -> None:
        """Copy up the lower non-directory ``name`` of ``src_dir_fd`` into ``pfd``: data or link
        target or device number, owner, xattrs (not overlay's), mode and times."""
        times = (st.st_atime_ns, st.st_mtime_ns)
        src_path = f"/proc/self/fd/{src_dir_fd}/{name}"
        if not self.chown:
            self.measure_against = None  # the copy's owner differs from its lower's
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISREG(st.st_mode):
            src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir_fd)
            try:
                fd = os.open(name, _O_NEW_FILE, 0o600, dir_fd=pfd)
                try:
                    _copy_data(src, fd, st.st_size)
                    if self.chown:
                        os.fchown(fd, st.st_uid, st.st_gid)
                    self._copy_xattrs(src_path, fd, None)
                    os.fchmod(fd, mode)
                    os.utime(fd, ns=times)
                finally:
                    os.close(fd)
            finally:
                os.close(src)
            return
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=src_dir_fd), name, dir_fd=pfd)
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(name, 0o600, dir_fd=pfd)
        else:
            os.mknod(name, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=pfd)
        if self.chown:
            os.chown(name, st.st_uid, st.st_gid, dir_fd=pfd, follow_symlinks=False)
        self._copy_xattrs(src_path, None, f"/proc/self/fd/{pfd}/{name}")
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(name, mode, dir_fd=pfd)
        os.utime(name, ns=times, dir_fd=pfd, follow_symlinks=False)

    def _lowers_show(self, dirpath: str, name: str, entry: str) -> bool:
        """Whether the lower layers show ``name`` in the merged directory ``dirpath`` (below the
        upper dir, which may be opaque)."""
        stack, missing, problem = self._resolve_merged(dirpath, entry)
        try:
            if missing or problem is not None:
                return False
            for index, dir_fd in stack[-1].layers:
                if index == 0:
                    continue
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                return not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0)
            return False
        finally:
            for d in stack[1:]:
                d.close()

    # -- measuring the changes (lowers, an empty upper dir) ------------------------------------

    def _record_written(self, pfd: int, key: tuple[int, int, str], size: int) -> None:
        """Note a non-directory of ``size`` bytes written at ``key``, and its parent's path."""
        pkey = key[:2]
        if pkey not in self.dir_paths:
            try:
                real = os.readlink(f"/proc/self/fd/{pfd}")
            except OSError:
                self.measure_against = None
                return
            root = self.root_real
            if real == root:
                self.dir_paths[pkey] = ""
            elif real.startswith(root + "/") and not real.endswith(" (deleted)"):
                self.dir_paths[pkey] = real[len(root) + 1 :]
            else:
                self.measure_against = None
                return
        self.written[key] = size

    def measured_changes_size(self) -> int | None:
        """What ``changes_size(changes_from_upper(upper, lowers))`` gives, from what was written.

        The upper dir was empty, so every non-directory in it with a size is one this apply wrote
        (``written``; removed ones were forgotten) or a copy-up, equal to its lower (else
        measuring was given up). Each written one counts unless the lowers' merged view (the
        parent layer's) has an entry at its path that the same rules as
        :func:`~graphdriver.archive.changes.changes_from_upper` find unchanged; a parent path
        the lowers do not hold as a directory makes all its entries additions."""
        from graphdriver.archive.changes import _differs, _UpperScan

        lowers = self.measure_against
        if lowers is None:
            return None
        scan = _UpperScan(self.opaque_xattr, {})
        stacks: dict[str, list[str]] = {"": lowers}

        def stack_of(path: str) -> list[str]:
            found = stacks.get(path)
            if found is None:
                head, _, name = path.rpartition("/")
                above = stack_of(head)
                hit = scan.lookup(above, name) if above else None
                if hit is None or not stat.S_ISDIR(hit[1].st_mode):
                    found = []
                else:
                    found = scan.dir_stack(above, hit[0], name, hit[2])
                stacks[path] = found
            return found

        total = 0
        root = self.root_real
        for (dev, ino, name), size in self.written.items():
            path = self.dir_paths[(dev, ino)]
            stack = stack_of(path)
            hit = scan.lookup(stack, name) if stack else None
            if hit is None:
                total += size
                continue
            upper = f"{root}/{path}/{name}" if path else f"{root}/{name}"
            st = os.lstat(upper)
            if _differs(st, upper, hit[1], hit[2]):
                total += st.st_size
        return total

    def _copy_up_link_target(self, tpfd: int, tbase: str, entry: TarEntry) -> os.stat_result:
        """The hard-link target ``tbase`` of the upper dir ``tpfd`` (at ``self.resolved``), copied
        up from the lower layers; InvalidArchive when the merged view has no such non-directory."""
        if self.lowers_unavailable:
            raise self._need_lowers(entry.name)
        not_found = f"hard link target {entry.linkname!r} not found"
        stack, missing, problem = self._resolve_merged(self.resolved, entry.name)
        try:
            if missing or problem is not None:
                raise InvalidArchive(not_found, entry.name)
            child, node = self._lookup(stack[-1], tbase)
            if child is not None:
                child.close()
                raise InvalidArchive("hard link to a directory", entry.name)
            if node is None:
                raise InvalidArchive(not_found, entry.name)
            parent_st = os.fstat(tpfd)
            self._copy_up_node(tpfd, tbase, *node)
            self._restore_times(tpfd, parent_st)
        finally:
            for d in stack[1:]:
                d.close()
        return os.stat(tbase, dir_fd=tpfd, follow_symlinks=False)

    def _make_parents(self, parent: str, entry: str) -> int:
        fd = self.root_fd
        done: list[str] = []
        try:
            for part in parent.split("/"):
                done.append(part)
                try:
                    nfd = open_in_root(self.root_fd, "/".join(done), _O_DIR_PATH)
                except FileNotFoundError:
                    try:
                        os.mkdir(part, 0o700, dir_fd=fd)
                    except FileExistsError:
                        raise InvalidArchive("a parent of the entry is a dangling symlink", entry) from None
                    pst = os.fstat(fd)
                    self.created.add((pst.st_dev, pst.st_ino, part))
                    nfd = os.open(part, _O_DIR_READ, dir_fd=fd)
                    if self.chown:
                        os.fchown(nfd, 0, 0)
                    os.fchmod(nfd, 0o755)
                except NotADirectoryError:
                    raise InvalidArchive("a parent of the entry is not a directory", entry) from None
                if fd != self.root_fd:
                    os.close(fd)
                fd = nfd
        except BaseException:
            if fd != self.root_fd:
                os.close(fd)
            raise
        return fd

    def _times(self, entry: TarEntry) -> tuple[int, int]:
        mtime = entry.mtime_ns
        return (mtime if entry.atime_ns is None else entry.atime_ns, mtime)

    def _xattrs(self, entry: TarEntry, fd: int | None, path: str | None) -> None:
        """Set ``entry.xattrs`` on ``fd``, or on ``path`` (no follow) when ``fd`` is None."""
        stats = self.stats
        for name, value in entry.xattrs.items():
            if name.startswith(OVERLAY_XATTR_PREFIXES):
                stats.xattrs_dropped += 1
                continue
            try:
                if fd is not None:
                    os.setxattr(fd, name, value)
                else:
                    assert path is not None
                    os.setxattr(path, name, value, follow_symlinks=False)
            except OSError as exc:
                denied = exc.errno in (errno.EPERM, errno.EACCES)
                if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) or (
                    denied
                    and (
                        not self.privileged
                        or (name.startswith("user.") and entry.kind not in (EntryKind.REG, EntryKind.DIR))
                    )
                ):
                    stats.xattrs_skipped += 1
                elif exc.errno in (errno.EPERM, errno.EACCES):
                    raise PermissionDenied(f"not permitted to set xattr {name!r} on {entry.name!r}") from exc
                else:
                    raise InvalidArchive(f"cannot set xattr {name!r}: {exc.strerror}", entry.name) from exc

    def _remove(self, pfd: int, name: str, *, keep_created: bool) -> None:
        """Remove ``name`` in ``pfd`` without following symlinks; a directory with its tree.

        With ``keep_created``, entries this layer created stay (and the directories holding them).
        """
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        created = self.created
        if not stat.S_ISDIR(st.st_mode):
            if keep_created or self.written:
                pst = os.fstat(pfd)
                if keep_created and (pst.st_dev, pst.st_ino, name) in created:
                    return
                self.written.pop((pst.st_dev, pst.st_ino, name), None)
            os.unlink(name, dir_fd=pfd)
            return
        keep = False
        if keep_created:
            pst = os.fstat(pfd)
            keep = (pst.st_dev, pst.st_ino, name) in created
        frames = [self._frame(pfd, name, st, keep)]
        try:
            while frames:
                frame = frames[-1]
                if frame.names:
                    child = frame.names.pop()
                    key = (frame.dev, frame.ino, child)
                    cst = os.stat(child, dir_fd=frame.fd, follow_symlinks=False)
                    if stat.S_ISDIR(cst.st_mode):
                        if cst.st_dev != frame.dev:
                            raise Busy(f"refusing to remove across the mount point at {child!r}")
                        frames.append(self._frame(frame.fd, child, cst, keep_created and key in created))
                    elif keep_created and key in created:
                        frame.kept = True
                    else:
                        os.unlink(child, dir_fd=frame.fd)
                        if self.written:
                            self.written.pop(key, None)
                    continue
                frames.pop()
                os.close(frame.fd)
                if frame.keep or frame.kept:
                    if frames:
                        frames[-1].kept = True
                    continue
                os.rmdir(frame.name, dir_fd=frame.parent_fd)
                self.dir_paths.pop((frame.dev, frame.ino), None)
        finally:
            for frame in frames:
                os.close(frame.fd)

    def _frame(self, parent_fd: int, name: str, st: os.stat_result, keep: bool) -> _Frame:
        if not self.privileged and st.st_mode & 0o700 != 0o700:
            os.chmod(name, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=parent_fd, follow_symlinks=False)
        fd = os.open(name, _O_DIR_READ, dir_fd=parent_fd)
        return _Frame(parent_fd, name, fd, st, keep)

    # -- entries -------------------------------------------------------------------------

    def apply(self, entry: TarEntry) -> None:
        self.stats.entries += 1
        path = clean_name(entry.name, entry.name, self.limits)
        parent, _, base = path.rpartition("/")
        last = self.last_parent
        if last is not None and (parent != last[0] or WH_PREFIX in path or not path):
            self.drop_last_parent()  # this entry may change how the kept parent resolves
        try:
            if WH_PREFIX in path:
                if path.startswith(WH_META_PREFIX) and path != WH_OPAQUE:
                    self._aufs_meta(entry, path)
                    return
                if WH_PREFIX in parent:
                    for part in parent.split("/"):
                        if part.startswith(WH_PREFIX):
                            raise InvalidArchive(
                                "a directory in the entry's path is named like a whiteout", entry.name
                            )
                if base.startswith(WH_PREFIX):
                    self.stats.whiteouts += 1
                    if base == WH_OPAQUE:
                        self._opaque(entry, parent)
                    else:
                        self._whiteout(entry, parent, base[len(WH_PREFIX) :])
                    return
            if not path:
                self._root_entry(entry)
                return
            self._entry(entry, parent, base)
        except OSError as exc:
            mapped = self._map_error(exc, entry.name)
            if mapped is exc:
                raise
            raise mapped from exc

    def _map_error(self, exc: OSError, name: str) -> Exception:
        err = exc.errno
        if err in (errno.EPERM, errno.EACCES):
            return PermissionDenied(f"{exc.strerror} while applying {name!r}")
        if err in _INVALID_ERRNOS:
            return InvalidArchive(f"cannot apply entry ({exc.strerror})", name)
        return exc

    def _root_entry(self, entry: TarEntry) -> None:
        if entry.kind is not EntryKind.DIR:
            raise BreakoutError(f"a {entry.kind.value} entry would replace the layer root", entry.name)
        fd = self.root_fd
        if self.chown:
            os.fchown(fd, entry.uid, entry.gid)
        if entry.xattrs:
            self._xattrs(entry, fd, None)
        os.fchmod(fd, entry.mode | 0o700)
        atime, mtime = self._times(entry)
        self.deferred.pop(self.root_key, None)
        self.deferred[self.root_key] = ("", entry.mode, atime, mtime)

    def _entry(self, entry: TarEntry, parent: str, base: str) -> None:
        kind = entry.kind
        if kind is EntryKind.HARDLINK and self._is_plnk_link(entry):
            self.measure_against = None  # not recorded: the changes are walked instead
            pfd = self._parent(parent, entry.name, create=True)
            try:
                self._plnk_file(entry, pfd, base)
            finally:
                if pfd != self.root_fd:
                    os.close(pfd)
            return
        pfd, pdev, pino, kept = self._entry_parent(parent, entry.name)
        try:
            self._entry_at(entry, pfd, (pdev, pino, base))
        finally:
            if not kept and pfd != self.root_fd:
                os.close(pfd)

    def _entry_at(self, entry: TarEntry, pfd: int, key: tuple[int, int, str]) -> None:
        """A plain entry, its parent dir open at ``pfd`` (``self.resolved``); ``key`` is the
        parent's (st_dev, st_ino) and the entry's name in it."""
        kind = entry.kind
        parent = self.resolved
        base = key[2]
        size_before = self.stats.size
        if kind is EntryKind.REG:
            self._regular(entry, pfd, base, entry.copy_to_fd)
        elif kind is EntryKind.DIR:
            self._directory(entry, pfd, base, parent)
        elif kind is EntryKind.SYMLINK:
            self._symlink(entry, pfd, base)
        elif kind is EntryKind.HARDLINK:
            self._hardlink(entry, pfd, base)
        elif not self._special(entry, pfd, base):
            return
        self.created.add(key)
        if self.measure_against is not None and self.stats.size != size_before:
            self._record_written(pfd, key, self.stats.size - size_before)
        if self.overlay and key in self.whiteouts:
            self.whiteouts.discard(key)
            path = f"{parent}/{base}" if parent else base
            self.whiteout_paths.discard(path)
            if kind is EntryKind.DIR:
                self._set_opaque_at(pfd, base, path)

    def _entry_parent(self, parent: str, entry: str) -> tuple[int, int, int, bool]:
        """The fd, st_dev and st_ino of the plain entry's parent dir (made if missing; sets
        ``self.resolved``).

        When ``parent`` is reached through real directories only (no symlink on the way), the
        fd stays open in ``self.last_parent`` for the next entry: a plain entry acts only on
        ``parent/<name>`` and below, which is not on the path to ``parent``, so the next entry
        of the same parent would resolve it to this same directory; :meth:`apply` drops it
        before any other entry (another parent, a whiteout, the root). A parent reached through
        a symlink is resolved afresh for every entry: an entry under it may replace a component
        the symlink leads through."""
        last = self.last_parent
        if last is not None:
            self.resolved = last[4]
            return last[1], last[2], last[3], True
        keep = True
        if not parent:
            pfd = self.root_fd
            self.resolved = parent
        else:
            try:
                pfd = open_in_root(self.root_fd, parent, _O_DIR_PATH, symlinks=False)
                self.resolved = parent
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOENT, errno.ENOTDIR):
                    raise
                keep = False  # through a symlink, or made now: the next entry resolves it again
                pfd = self._parent(parent, entry, create=True)
        try:
            pst = os.fstat(pfd)
        except BaseException:
            if pfd != self.root_fd:
                os.close(pfd)
            raise
        if keep:
            self.last_parent = (parent, pfd, pst.st_dev, pst.st_ino, self.resolved)
        return pfd, pst.st_dev, pst.st_ino, keep

    def drop_last_parent(self) -> None:
        """Close the parent fd kept by :meth:`_entry_parent`."""
        last = self.last_parent
        if last is not None:
            self.last_parent = None
            if last[1] != self.root_fd:
                os.close(last[1])

    def _replace_existing(self, pfd: int, base: str) -> None:
        self._remove(pfd, base, keep_created=False)

    def _regular(self, entry: TarEntry, pfd: int, base: str, write_data: Callable[[int], object]) -> None:
        mode = entry.mode
        # Created with the entry's mode; one fstat after the data then tells whether the umask,
        # a default ACL, a grpid mount or a setgid parent made the owner or mode differ (usually
        # not: this saves a fchown and a fchmod per file, and never guesses).
        try:
            fd = os.open(base, _O_NEW_FILE, mode, dir_fd=pfd)
        except FileExistsError:
            self._replace_existing(pfd, base)
            fd = os.open(base, _O_NEW_FILE, mode, dir_fd=pfd)
        try:
            if entry.size:
                write_data(fd)
            st = os.fstat(fd)
            chown = self.chown and (st.st_uid != entry.uid or st.st_gid != entry.gid)
            if chown:
                os.fchown(fd, entry.uid, entry.gid)  # may clear setuid/setgid: chmod follows
            if entry.xattrs:
                self._xattrs(entry, fd, None)
            if chown or stat.S_IMODE(st.st_mode) != mode:
                os.fchmod(fd, mode)
            mtime = entry.mtime_ns
            os.utime(fd, ns=(mtime if entry.atime_ns is None else entry.atime_ns, mtime))
        finally:
            os.close(fd)
        self.stats.size += entry.size

    def _directory(self, entry: TarEntry, pfd: int, base: str, parent: str) -> None:
        want = entry.mode | 0o700  # the owner keeps rwx until the end (see finish)
        merged = False
        try:
            os.mkdir(base, want, dir_fd=pfd)
        except FileExistsError:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                merged = True
            else:
                self._replace_existing(pfd, base)
                os.mkdir(base, want, dir_fd=pfd)
                if self.merged_view:  # the non-directory hid any lower dir here: so does this one
                    self._set_opaque_at(pfd, base, f"{parent}/{base}" if parent else base)
        st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        chown = self.chown and (st.st_uid != entry.uid or st.st_gid != entry.gid)
        if merged or chown or entry.xattrs or stat.S_IMODE(st.st_mode) != want:
            try:
                fd = os.open(base, _O_DIR_READ, dir_fd=pfd)
            except PermissionError:
                # unprivileged, merging onto an existing directory we cannot read: open it up first
                os.chmod(base, 0o700, dir_fd=pfd, follow_symlinks=False)
                fd = os.open(base, _O_DIR_READ, dir_fd=pfd)
            try:
                if chown:
                    os.fchown(fd, entry.uid, entry.gid)
                if merged:
                    self._drop_unnamed_xattrs(entry, fd)
                if entry.xattrs:
                    self._xattrs(entry, fd, None)
                os.fchmod(fd, want)
            finally:
                os.close(fd)
        atime, mtime = self._times(entry)
        dkey = (st.st_dev, st.st_ino)
        self.deferred.pop(dkey, None)
        self.deferred[dkey] = (f"{parent}/{base}" if parent else base, entry.mode, atime, mtime)

    def _drop_unnamed_xattrs(self, entry: TarEntry, fd: int) -> None:
        """A directory entry over an existing directory carries the directory's whole metadata:
        xattrs it does not name are removed (overlay markers and SELinux labels excepted), so a
        layer can record the removal of a directory's xattr (as umoci does)."""
        try:
            names = os.listxattr(fd)
        except OSError:
            return
        for name in names:
            if name in entry.xattrs or name.startswith(_KEEP_ON_MERGE):
                continue
            try:
                os.removexattr(fd, name)
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
                    raise
                self.stats.xattrs_skipped += 1

    def _symlink(self, entry: TarEntry, pfd: int, base: str) -> None:
        target = entry.linkname
        if not target:
            raise InvalidArchive("symlink with an empty target", entry.name)
        try:
            os.symlink(target, base, dir_fd=pfd)
        except FileExistsError:
            self._replace_existing(pfd, base)
            os.symlink(target, base, dir_fd=pfd)
        if self.chown:
            os.chown(base, entry.uid, entry.gid, dir_fd=pfd, follow_symlinks=False)
        if entry.xattrs:
            self._xattrs(entry, None, f"/proc/self/fd/{pfd}/{base}")
        os.utime(base, ns=self._times(entry), dir_fd=pfd, follow_symlinks=False)
        self.stats.size += len(target.encode("utf-8", "surrogateescape"))

    def _meta_at(self, entry: TarEntry, pfd: int, base: str, *, chmod: bool) -> None:
        """Metadata of a node we hold no fd for (symlink, device, fifo), never following it."""
        if self.chown:
            os.chown(base, entry.uid, entry.gid, dir_fd=pfd, follow_symlinks=False)
        if entry.xattrs:
            self._xattrs(entry, None, f"/proc/self/fd/{pfd}/{base}")
        if chmod:
            os.chmod(base, entry.mode, dir_fd=pfd, follow_symlinks=False)
        os.utime(base, ns=self._times(entry), dir_fd=pfd, follow_symlinks=False)

    def _link_target(self, entry: TarEntry) -> str:
        target = clean_name(entry.linkname, entry.name, self.limits)
        if not target:
            raise InvalidArchive("hard link to the layer root", entry.name)
        return target

    def _hardlink(self, entry: TarEntry, pfd: int, base: str) -> None:
        target = self._link_target(entry)
        tparent, _, tbase = target.rpartition("/")
        tpfd = self._parent(tparent, entry.name, create=False)
        if tpfd < 0:
            raise InvalidArchive(f"hard link target {entry.linkname!r} not found", entry.name)
        try:
            try:
                tst = os.stat(tbase, dir_fd=tpfd, follow_symlinks=False)
                if self.merged_view and stat.S_ISCHR(tst.st_mode) and tst.st_rdev == 0:
                    raise FileNotFoundError(errno.ENOENT, "a whiteout")
            except FileNotFoundError:
                if not self.merged_view:
                    raise InvalidArchive(
                        f"hard link target {entry.linkname!r} not found", entry.name
                    ) from None
                tst = self._copy_up_link_target(tpfd, tbase, entry)
            if stat.S_ISDIR(tst.st_mode):
                raise InvalidArchive("hard link to a directory", entry.name)
            try:
                os.link(tbase, base, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileExistsError:
                try:
                    dst = os.stat(base, dir_fd=pfd, follow_symlinks=False)
                except FileNotFoundError:
                    dst = None
                if dst is None or (dst.st_dev, dst.st_ino) != (tst.st_dev, tst.st_ino):
                    self._replace_existing(pfd, base)
                    os.link(tbase, base, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                raise InvalidArchive(f"hard link target {entry.linkname!r} not found", entry.name) from None
        finally:
            if tpfd != self.root_fd:
                os.close(tpfd)
        self.stats.size += tst.st_size

    def _special(self, entry: TarEntry, pfd: int, base: str) -> bool:
        """mknod/mkfifo; False when a device was skipped."""
        kind = entry.kind
        if kind is EntryKind.FIFO:
            try:
                os.mkfifo(base, 0o600, dir_fd=pfd)
            except FileExistsError:
                self._replace_existing(pfd, base)
                os.mkfifo(base, 0o600, dir_fd=pfd)
        else:
            policy = self.options.devices
            if policy == "error":
                raise InvalidArchive(f"{kind.value} entries are not allowed", entry.name)
            if entry.devmajor >= 1 << 12 or entry.devminor >= 1 << 20:
                raise InvalidArchive(
                    f"device number {entry.devmajor}:{entry.devminor} out of range", entry.name
                )
            ftype = stat.S_IFCHR if kind is EntryKind.CHAR else stat.S_IFBLK
            device = os.makedev(entry.devmajor, entry.devminor)
            try:
                try:
                    os.mknod(base, ftype | 0o600, device, dir_fd=pfd)
                except FileExistsError:
                    self._replace_existing(pfd, base)
                    os.mknod(base, ftype | 0o600, device, dir_fd=pfd)
            except PermissionError as exc:
                if policy == "skip":
                    self.stats.devices_skipped += 1
                    return False
                raise PermissionDenied(
                    f"not permitted to create {kind.value} {entry.name!r} (devices need CAP_MKNOD; "
                    "use devices='skip' to leave them out)"
                ) from exc
        self._meta_at(entry, pfd, base, chmod=True)
        return True

    # -- whiteouts -----------------------------------------------------------------------

    def _whiteout(self, entry: TarEntry, parent: str, target: str) -> None:
        if target in ("", ".", ".."):
            raise InvalidArchive("invalid whiteout entry", entry.name)
        if self.lower_fds is not None and not self._lowers_show(parent, target, entry.name):
            return  # nothing below to hide, as OCI (and overlay would list such a device as an entry)
        pfd = self._parent(parent, entry.name, create=self.overlay and not self.merged_view)
        if pfd < 0:
            return
        parent = self.resolved
        try:
            pst = os.fstat(pfd)
            key = (pst.st_dev, pst.st_ino, target)
            if not self.overlay:
                self._remove(pfd, target, keep_created=True)
                return
            path = f"{parent}/{target}" if parent else target
            if (pst.st_dev, pst.st_ino) in self.opaque_dirs or self._under_opaque(parent):
                return  # an enclosing directory is opaque: no lower name shows through it
            # what this layer created stays (with the dirs holding it, made opaque), as in OCI
            self._remove(pfd, target, keep_created=True)
            try:
                st = os.stat(target, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if stat.S_ISDIR(st.st_mode):
                    self._set_opaque_at(pfd, target, path)
                return
            os.mknod(target, stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd)
            if self.chown:
                os.chown(target, entry.uid, entry.gid, dir_fd=pfd, follow_symlinks=False)
            self.whiteouts.add(key)
            self.whiteout_paths.add(path)
        finally:
            if pfd != self.root_fd:
                os.close(pfd)

    def _set_opaque_at(self, pfd: int, name: str, path: str) -> None:
        fd = os.open(name, _O_DIR_READ, dir_fd=pfd)
        try:
            self._set_opaque(fd, path)
        finally:
            os.close(fd)

    def _under_opaque(self, dirpath: str) -> bool:
        """Whether ``dirpath`` or one of its ancestors was made opaque by this layer."""
        if not self.opaque_paths:
            return False
        while True:
            if dirpath in self.opaque_paths:
                return True
            if not dirpath:
                return False
            dirpath = dirpath.rpartition("/")[0]

    def _set_opaque(self, fd: int, path: str) -> None:
        os.setxattr(fd, self.opaque_xattr, b"y")
        st = os.fstat(fd)
        self.opaque_dirs.add((st.st_dev, st.st_ino))
        self.opaque_paths.add(path)
        # whiteouts this layer made in or below the directory are redundant now (and would show
        # in readdir: overlay does not merge below an opaque directory)
        for name in os.listdir(fd):
            key = (st.st_dev, st.st_ino, name)
            if key in self.whiteouts:
                os.unlink(name, dir_fd=fd)
                self.whiteouts.discard(key)
                self.whiteout_paths.discard(f"{path}/{name}" if path else name)
        prefix = f"{path}/" if path else ""
        for nested in sorted(p for p in self.whiteout_paths if p.startswith(prefix)):
            self._drop_whiteout(nested)

    def _drop_whiteout(self, path: str) -> None:
        """Unlink the whiteout device this layer made at ``path`` (if it is still one)."""
        self.whiteout_paths.discard(path)
        dirpath, _, name = path.rpartition("/")
        try:
            pfd = open_in_root(self.root_fd, dirpath, _O_DIR_READ) if dirpath else self.root_fd
        except OSError:
            return
        try:
            pst = os.fstat(pfd)
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                os.unlink(name, dir_fd=pfd)
            self.whiteouts.discard((pst.st_dev, pst.st_ino, name))
        except FileNotFoundError:
            pass
        finally:
            if pfd != self.root_fd:
                os.close(pfd)

    def _opaque(self, entry: TarEntry, dirpath: str) -> None:
        if dirpath:
            try:
                fd = open_in_root(self.root_fd, dirpath, _O_DIR_READ & ~os.O_NOFOLLOW)
            except (FileNotFoundError, NotADirectoryError) as exc:
                if not self.overlay:
                    return
                if self.merged_view:  # as OCI: nothing to do where the merged view has no dir
                    pfd = self._merged_parent(dirpath, entry.name, create=False)
                    if pfd < 0:
                        return
                    dirpath = self.resolved
                elif isinstance(exc, NotADirectoryError):
                    raise InvalidArchive("opaque marker in a non-directory", entry.name) from None
                else:
                    pfd = self._make_parents(dirpath, entry.name)
                fd = os.open(".", _O_DIR_READ, dir_fd=pfd)
                if pfd != self.root_fd:
                    os.close(pfd)
        else:
            fd = os.open(".", _O_DIR_READ, dir_fd=self.root_fd)
        try:
            st = os.fstat(fd)
            if self.merged_view and (st.st_dev, st.st_ino) == self.root_key:
                dirpath = ""  # reached through symlinks: the root itself
                if self.lowers_unavailable:
                    raise self._need_lowers(entry.name)  # see _opaque_root
            for name in os.listdir(fd):
                if (st.st_dev, st.st_ino, name) not in self.whiteouts:
                    self._remove(fd, name, keep_created=True)
            if self.overlay:
                self._set_opaque(fd, dirpath)
                if not dirpath and self.lower_fds is not None:
                    self._opaque_root(entry, fd)
        finally:
            os.close(fd)

    def _opaque_root(self, entry: TarEntry, fd: int) -> None:
        """overlayfs ignores an opaque upper root (the root merges every layer): hide each name
        the lowers show there instead, with a whiteout or, under a directory of this layer, by
        making that directory opaque."""
        assert self.lower_fds is not None
        rst = os.fstat(fd)
        seen: set[str] = set()
        for lower_fd in self.lower_fds:
            for name in os.listdir(f"/proc/self/fd/{lower_fd}"):
                if name in seen:
                    continue
                seen.add(name)
                lst = os.stat(name, dir_fd=lower_fd, follow_symlinks=False)
                if stat.S_ISCHR(lst.st_mode) and lst.st_rdev == 0:
                    continue
                try:
                    ust = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=fd)
                    if self.chown:
                        os.chown(name, entry.uid, entry.gid, dir_fd=fd, follow_symlinks=False)
                    self.whiteouts.add((rst.st_dev, rst.st_ino, name))
                    self.whiteout_paths.add(name)
                    continue
                if stat.S_ISDIR(ust.st_mode):
                    self._set_opaque_at(fd, name, name)

    # -- aufs ----------------------------------------------------------------------------

    def _aufs_meta(self, entry: TarEntry, path: str) -> None:
        head, sep, rest = path.partition("/")
        if head != WH_PLNK or not sep or entry.kind is not EntryKind.REG:
            return  # .wh..wh.aufs, .wh..wh.orph/, the .wh..wh.plnk dir itself: aufs bookkeeping
        key = rest.replace("/", "%")
        if self.plnk_dir is None:
            self.plnk_dir = tempfile.mkdtemp(prefix="gd-plnk-")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(os.path.join(self.plnk_dir, key), flags, 0o600)
        try:
            entry.copy_to_fd(fd)
        finally:
            os.close(fd)
        self.plnk[key] = entry

    def _is_plnk_link(self, entry: TarEntry) -> bool:
        return WH_PLNK in entry.linkname and self._link_target(entry).startswith(WH_PLNK + "/")

    def _plnk_file(self, entry: TarEntry, pfd: int, base: str) -> None:
        target = self._link_target(entry)
        key = target.partition("/")[2].replace("/", "%")
        source = self.plnk.get(key)
        if source is None or self.plnk_dir is None:
            raise InvalidArchive("invalid aufs hard link (no such .wh..wh.plnk file)", entry.name)
        data_path = os.path.join(self.plnk_dir, key)

        def copy(fd: int) -> None:
            with open(data_path, "rb", buffering=0) as src:
                while chunk := src.read(1 << 20):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]

        pst = os.fstat(pfd)
        self._regular(source, pfd, base, copy)
        self.created.add((pst.st_dev, pst.st_ino, base))

    # -- the end -------------------------------------------------------------------------

    def finish(self) -> None:
        """Apply directory modes and times, deepest (latest) first, to dirs still the same inode."""
        self.drop_last_parent()
        for key, record in reversed(self.deferred.items()):
            try:
                self._finish_dir(key, record)
            except OSError as exc:
                mapped = self._map_error(exc, record[0] or ".")
                if mapped is exc:
                    raise
                raise mapped from exc

    def _finish_dir(self, key: tuple[int, int], record: tuple[str, int, int, int]) -> None:
        path, mode, atime, mtime = record
        if not path:
            fd = self.root_fd
        else:
            try:
                fd = open_in_root(self.root_fd, path, _O_DIR_READ)
            except OSError:
                return  # gone, replaced by a non-directory, or unreachable: nothing to restore
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != key:
                return
            if mode & 0o700 != 0o700:
                os.fchmod(fd, mode)
            os.utime(fd, ns=(atime, mtime))
        finally:
            if fd != self.root_fd:
                os.close(fd)


def apply_layer(
    root: str | os.PathLike[str],
    stream: BinaryIO,
    *,
    whiteout_format: WhiteoutFormat = WhiteoutFormat.OCI,
    limits: Limits | None = None,
    options: ApplyOptions | None = None,
    lowers: Sequence[str | os.PathLike[str]] | None = None,
) -> ApplyStats:
    """Apply the layer tar ``stream`` (plain, gzip, zstd, bzip2 or xz) onto the directory ``root``.

    ``lowers`` (``WhiteoutFormat.OVERLAY`` only): the lower layers' dirs under the upper dir
    ``root``, top-most first; paths are then resolved in the merged view (module documentation,
    "Lower layers"). They are only read.

    See the module documentation for the exact semantics. Returns :class:`ApplyStats`. Raises
    :class:`~graphdriver.errors.ArchiveError` subclasses for bad archives (naming the entry),
    :class:`~graphdriver.errors.PermissionDenied`, :class:`LowerLayersNeeded` (only with
    ``ApplyOptions.lowers_unavailable``), or :class:`OSError` for environmental failures.
    On error the tree under ``root`` is left partially applied: apply into a staging directory.
    """
    limits = limits or Limits()
    options = options or ApplyOptions()
    if options.devices not in ("create", "skip", "error"):
        raise InvalidArgument(f"invalid devices option {options.devices!r} (create, skip, error)")
    if whiteout_format is not WhiteoutFormat.OVERLAY and (lowers is not None or options.lowers_unavailable):
        raise InvalidArgument("lower layers apply only with the overlay whiteout format")
    if lowers is not None and options.lowers_unavailable:
        raise InvalidArgument("lowers given with lowers_unavailable")
    lower_fds: list[int] | None = None
    if lowers is not None:
        lower_fds = []
        try:
            for lower in lowers:
                lower_fds.append(os.open(Path(lower), _O_DIR_PATH))
        except OSError as exc:
            for fd in lower_fds:
                os.close(fd)
            raise InvalidArgument(f"cannot open the lower dir {os.fspath(lower)!r}: {exc.strerror}") from exc
    try:
        root_fd = os.open(Path(root), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except BaseException:
        for fd in lower_fds or ():
            os.close(fd)
        raise
    try:
        # an empty upper dir: what this apply writes is all its changes, measured as it goes
        empty = lowers is not None and not os.listdir(root_fd)
        measure = [os.fspath(lower) for lower in lowers] if lowers is not None and empty else None
        applier = _Applier(
            root_fd, whiteout_format, limits, options, lower_fds=lower_fds, measure_against=measure
        )
    except BaseException:
        os.close(root_fd)
        for fd in lower_fds or ():
            os.close(fd)
        raise
    try:
        with open_decompressed(stream, limits) as reader:
            for entry in iter_entries(reader, limits):
                applier.apply(entry)
            drain(reader)
            applier.stats.tar_bytes = int(getattr(reader, "bytes_read", 0))
        applier.finish()
        applier.stats.changes_size = applier.measured_changes_size()
    finally:
        applier.close()
        os.close(root_fd)
        for fd in lower_fds or ():
            os.close(fd)
    return applier.stats
