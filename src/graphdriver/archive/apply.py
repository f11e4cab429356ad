"""Apply a layer tar onto a directory: securely, whiteout-aware, streaming.

:func:`apply_layer` is the seed's ``ApplyLayer`` (spec §2.9) rebuilt on file descriptors. The
decisions below are the contract; tests/archive/test_apply.py and test_hostile.py check each one.

Resolution. The root is opened once; every entry's *parent* is resolved afresh with
:func:`~graphdriver.fs.inroot.open_in_root` (``openat2`` ``RESOLVE_IN_ROOT``: symlinks are followed
but clamped inside the root, ``..`` stops at the root), and the last component is acted on with
``*at`` calls that never follow it. Nothing resolved is cached from one entry to the next
(CVE-2025-47290). Metadata goes through fds we hold (``fchown``/``fchmod``/``futimens``) or
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
layer created itself leaves it (a directory is made opaque).

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
the data shows whether a chown or chmod is still needed (umask, default ACLs, grpid mounts), so the
common file costs: openat2 (parent), fstat (parent), open, write, fstat, futimens, close, close.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from graphdriver.archive.compression import drain, open_decompressed
from graphdriver.archive.tarformat import EntryKind, TarEntry, iter_entries
from graphdriver.archive.types import Limits, WhiteoutFormat
from graphdriver.errors import (
    BreakoutError,
    Busy,
    InvalidArchive,
    InvalidArgument,
    LimitExceeded,
    PermissionDenied,
)
from graphdriver.fs.inroot import open_in_root

__all__ = ["ApplyOptions", "ApplyStats", "apply_layer"]

WH_PREFIX = ".wh."
WH_META_PREFIX = ".wh..wh."
WH_OPAQUE = ".wh..wh..opq"
WH_PLNK = ".wh..wh.plnk"
NAME_MAX = 255
OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")

_O_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_O_DIR_READ = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

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


@dataclass(frozen=True)
class ApplyOptions:
    """How to apply.

    ``chown``: apply the entries' numeric uid/gid (None = only when running as euid 0).
    ``devices``: ``"create"`` char/block devices (PermissionDenied when not permitted), ``"skip"``
    them when not permitted, or ``"error"`` on any device entry.
    ``userxattr``: overlay format only: mark opaque dirs with ``user.overlay.opaque``.
    """

    chown: bool | None = None
    devices: Literal["create", "skip", "error"] = "create"
    userxattr: bool = False


@dataclass
class ApplyStats:
    """What an apply did.

    ``size``: regular-file sizes + symlink target lengths + hard-linked file sizes (the seed's
    ChangesSize of the applied entries); ``entries``: tar members read; ``tar_bytes``: bytes of
    uncompressed stream read (the tar and anything after its end marker); ``whiteouts``: whiteout
    and opaque entries; ``xattrs_dropped``: overlay xattrs refused; ``xattrs_skipped``: xattrs the
    filesystem or the privileges did not allow; ``devices_skipped``: device entries skipped.
    """

    size: int = 0
    entries: int = 0
    tar_bytes: int = 0
    whiteouts: int = 0
    xattrs_dropped: int = 0
    xattrs_skipped: int = 0
    devices_skipped: int = 0


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


class _Applier:
    """The state of one apply: the root fd, what this layer created, deferred directory metadata."""

    def __init__(self, root_fd: int, fmt: WhiteoutFormat, limits: Limits, options: ApplyOptions) -> None:
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

    # -- helpers -------------------------------------------------------------------------

    def close(self) -> None:
        if self.plnk_dir is not None:
            shutil.rmtree(self.plnk_dir, ignore_errors=True)
            self.plnk_dir = None

    def _parent(self, parent: str, entry: str, *, create: bool) -> int:
        """An O_PATH fd of the directory ``parent`` (the root fd itself for ``""``); -1 if missing
        and ``create`` is false."""
        if not parent:
            return self.root_fd
        try:
            return open_in_root(self.root_fd, parent, _O_DIR_PATH)
        except FileNotFoundError:
            if not create:
                return -1
            return self._make_parents(parent, entry)
        except NotADirectoryError:
            if not create:
                return -1
            raise InvalidArchive("a parent of the entry is not a directory", entry) from None

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
            if keep_created:
                pst = os.fstat(pfd)
                if (pst.st_dev, pst.st_ino, name) in created:
                    return
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
                    continue
                frames.pop()
                os.close(frame.fd)
                if frame.keep or frame.kept:
                    if frames:
                        frames[-1].kept = True
                    continue
                os.rmdir(frame.name, dir_fd=frame.parent_fd)
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
            pfd = self._parent(parent, entry.name, create=True)
            try:
                self._plnk_file(entry, pfd, base)
            finally:
                if pfd != self.root_fd:
                    os.close(pfd)
            return
        pfd = self._parent(parent, entry.name, create=True)
        try:
            pst = os.fstat(pfd)
            key = (pst.st_dev, pst.st_ino, base)
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
            if self.overlay and key in self.whiteouts:
                self.whiteouts.discard(key)
                path = f"{parent}/{base}" if parent else base
                self.whiteout_paths.discard(path)
                if kind is EntryKind.DIR:
                    self._set_opaque_at(pfd, base, path)
        finally:
            if pfd != self.root_fd:
                os.close(pfd)

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
            except FileNotFoundError:
                raise InvalidArchive(f"hard link target {entry.linkname!r} not found", entry.name) from None
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
        pfd = self._parent(parent, entry.name, create=self.overlay)
        if pfd < 0:
            return
        try:
            pst = os.fstat(pfd)
            key = (pst.st_dev, pst.st_ino, target)
            if not self.overlay:
                self._remove(pfd, target, keep_created=True)
                return
            path = f"{parent}/{target}" if parent else target
            if (pst.st_dev, pst.st_ino) in self.opaque_dirs or self._under_opaque(parent):
                return  # an enclosing directory is opaque: no lower name shows through it
            if key in self.created:
                try:
                    st = os.stat(target, dir_fd=pfd, follow_symlinks=False)
                except FileNotFoundError:
                    pass
                else:
                    if stat.S_ISDIR(st.st_mode):
                        self._set_opaque_at(pfd, target, path)
                    return
            self._remove(pfd, target, keep_created=False)
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
            except FileNotFoundError:
                if not self.overlay:
                    return
                pfd = self._make_parents(dirpath, entry.name)
                fd = os.open(".", _O_DIR_READ, dir_fd=pfd)
                os.close(pfd)
            except NotADirectoryError:
                if not self.overlay:
                    return
                raise InvalidArchive("opaque marker in a non-directory", entry.name) from None
        else:
            fd = os.open(".", _O_DIR_READ, dir_fd=self.root_fd)
        try:
            st = os.fstat(fd)
            for name in os.listdir(fd):
                if (st.st_dev, st.st_ino, name) not in self.whiteouts:
                    self._remove(fd, name, keep_created=True)
            if self.overlay:
                self._set_opaque(fd, dirpath)
        finally:
            os.close(fd)

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
) -> ApplyStats:
    """Apply the layer tar ``stream`` (plain, gzip, zstd, bzip2 or xz) onto the directory ``root``.

    See the module documentation for the exact semantics. Returns :class:`ApplyStats`. Raises
    :class:`~graphdriver.errors.ArchiveError` subclasses for bad archives (naming the entry),
    :class:`~graphdriver.errors.PermissionDenied`, or :class:`OSError` for environmental failures.
    On error the tree under ``root`` is left partially applied: apply into a staging directory.
    """
    limits = limits or Limits()
    options = options or ApplyOptions()
    if options.devices not in ("create", "skip", "error"):
        raise InvalidArgument(f"invalid devices option {options.devices!r} (create, skip, error)")
    root_fd = os.open(Path(root), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    applier = _Applier(root_fd, whiteout_format, limits, options)
    try:
        with open_decompressed(stream, limits) as reader:
            for entry in iter_entries(reader, limits):
                applier.apply(entry)
            drain(reader)
            applier.stats.tar_bytes = int(getattr(reader, "bytes_read", 0))
        applier.finish()
    finally:
        applier.close()
        os.close(root_fd)
    return applier.stats
