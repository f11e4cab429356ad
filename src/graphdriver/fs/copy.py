"""Copying whole trees exactly: the vfs driver's snapshot and the overlay driver's upper copy.

:func:`copy_tree` reproduces a directory tree with everything a layer carries:

- file types: regular files, directories, symlinks, character and block devices, fifos
  (sockets are skipped: they cannot be copied, only re-bound);
- permission bits with setuid, setgid and sticky; owners (``lchown`` *before* ``chmod``, which
  would otherwise lose the set-id bits); every xattr the process can see, ``trusted.*`` included
  as root, so overlay's opaque marker survives the copy of an upper dir; nanosecond atime and
  mtime. Directories get their times *after* their children are made (the seed set them first,
  so every copied directory looked modified: fixed upstream in moby 77a2bc3e5b);
- hard links within the tree: the second name of an inode is linked to the first copy;
- the root directory's own owner, mode, xattrs and times, onto ``dst``.

Regular files are cloned with ``ioctl(FICLONE)`` where the filesystem shares extents (btrfs, xfs
with reflink), else copied in the kernel with ``copy_file_range``, else with read/write; each
call remembers what failed, so a filesystem without reflinks is asked once, not once per file.
Names, directories and small files are made in the calling thread; files of 256 KiB and more are
filled (data, owner, xattrs, mode, times) by worker threads meanwhile, since a directory's own
metadata does not depend on its files' inodes.
``hardlink_files=True`` links every regular file to the source inode instead (the seed overlay
driver's ApplyDiff farm); the shared inode's metadata is not rewritten.

Everything is done through directory file descriptors with no-follow lookups: a symlink in the
source is copied as a symlink and never followed, whatever it points at.

Without root, owners cannot be kept (files belong to the caller), device nodes cannot be made
(:class:`~graphdriver.errors.PermissionDenied` naming the source path; the caller removes the
partial copy), and files or directories the caller owns but may not read (mode 0000, 0222) are
opened by granting the owner read (and search) permission for the moment of the open, then
restoring the exact mode.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from graphdriver.errors import InvalidArgument, NotSupported, PermissionDenied

_S_ISDIR, _S_ISREG, _S_ISLNK, _S_ISSOCK = stat.S_ISDIR, stat.S_ISREG, stat.S_ISLNK, stat.S_ISSOCK

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

__all__ = ["FICLONE", "CopyStats", "copy_tree", "open_as_owner", "supports_reflink"]

FICLONE = 0x40049409
"""``_IOW(0x94, 9, int)``: clone all of one file's extents into another."""

_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}
_NO_CFR = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF}
_NO_XATTRS = {errno.ENOTSUP, errno.EOPNOTSUPP}
_RD_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
"""a source file is opened without following a symlink, blocking on a fifo or taking a tty"""
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 30
_WORKER_MIN_SIZE = 256 << 10
"""files this large are filled by a worker thread; smaller ones cost less than the hand-off"""
_MAX_PENDING = 64


@dataclass
class CopyStats:
    """What :func:`copy_tree` made."""

    files: int = 0
    """regular files copied, cloned or (``hardlink_files``) linked; one per inode"""
    dirs: int = 0
    """directories, the root included"""
    symlinks: int = 0
    specials: int = 0
    """fifos and device nodes"""
    hardlinks: int = 0
    """extra names linked to a file copied earlier in the same tree"""
    bytes: int = 0
    """regular-file bytes copied or cloned (not counted for ``hardlink_files``)"""
    reflinked: int = 0
    """regular files cloned with FICLONE"""
    skipped_sockets: int = 0


@dataclass
class _Dir:
    """A directory being copied: its fds, its source stat and the entries still to do."""

    src_fd: int
    dst_fd: int
    rel: str
    st: os.stat_result
    entries: Iterator[os.DirEntry[str]]
    new_gid: int
    """the gid a new entry made in dst_fd gets (the dir's gid if it is set-gid)"""
    restore_mode: int | None = None
    """the source dir's mode, if it was widened to be read"""

    def child(self, name: str) -> str:
        """The path of entry ``name`` relative to the roots."""
        return f"{self.rel}/{name}" if self.rel else name


def _read_umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o777  # unknown: always chmod


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    return "fifo"


def open_as_owner(name: str, dir_fd: int, st: os.stat_result, flags: int) -> tuple[int, int | None]:
    """Open ``name`` (in ``dir_fd``, stat'ed as ``st``) that its owner, the caller, may not read.

    Grants the owner read (and, for a directory, search) permission for the open, then restores
    the mode: a file's at once, through the new fd; a directory's is returned, to be restored
    with ``os.fchmod(fd, mode)`` when done with it (search permission is checked at each lookup,
    so the directory stays widened while it is read). Only ever the caller's own files: anyone
    else's is the original :class:`PermissionError`. Returns ``(fd, mode to restore or None)``.
    """
    try:
        return os.open(name, flags, dir_fd=dir_fd), None
    except PermissionError:
        if os.geteuid() == 0 or st.st_uid != os.geteuid():
            raise
    is_dir = stat.S_ISDIR(st.st_mode)
    mode = stat.S_IMODE(st.st_mode)
    os.chmod(name, mode | stat.S_IRUSR | (stat.S_IXUSR if is_dir else 0), dir_fd=dir_fd)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except BaseException:
        os.chmod(name, mode, dir_fd=dir_fd)
        raise
    if is_dir:
        return fd, mode
    os.fchmod(fd, mode)
    return fd, None


class _Copier:
    def __init__(self, src: str, *, hardlink_files: bool, reflink: bool, threads: int) -> None:
        self.src = src
        self.hardlink_files = hardlink_files
        self.reflink: bool | None = None if reflink else False
        self.cfr = True
        self.euid = os.geteuid()
        self.egid = os.getegid()
        self.chown = self.euid == 0
        self.umask = _read_umask()
        self.rd_flags = _RD_FLAGS | (os.O_NOATIME if self.euid == 0 else 0)
        self.links: dict[tuple[int, int], str] = {}
        self.stats = CopyStats()
        self.dst_root_fd = -1
        self.setgid_root = False
        self.threads = 0 if hardlink_files else threads
        self.pool: ThreadPoolExecutor | None = None
        self.pending: deque[tuple[Future[tuple[int, bool]], int, int]] = deque()

    # -- helpers ---------------------------------------------------------------------------------

    def _src_path(self, rel: str) -> str:
        return os.path.join(self.src, rel) if rel else self.src

    def _open_src(self, name: str, dir_fd: int, st: os.stat_result, flags: int) -> tuple[int, int | None]:
        try:
            return os.open(name, flags, dir_fd=dir_fd), None
        except PermissionError:
            if self.euid == 0 or st.st_uid != self.euid:
                raise
        return open_as_owner(name, dir_fd, st, flags & ~os.O_NOATIME)

    def _copy_xattrs(self, src: int | str, dst: int | str, rel: str) -> None:
        try:
            names = os.listxattr(src, follow_symlinks=isinstance(src, int))
        except OSError as exc:
            if exc.errno in _NO_XATTRS:
                return
            raise
        follow = isinstance(dst, int)
        for name in names:
            try:
                value = os.getxattr(src, name, follow_symlinks=follow)
            except OSError as exc:
                if exc.errno == errno.ENODATA:
                    continue
                raise
            try:
                os.setxattr(dst, name, value, follow_symlinks=follow)
            except PermissionError as exc:
                raise PermissionDenied(
                    f"cannot set xattr {name} on the copy of {self._src_path(rel)}: {exc.strerror}"
                ) from exc
            except OSError as exc:
                if exc.errno in _NO_XATTRS:
                    raise NotSupported(
                        f"the destination filesystem cannot store xattr {name} of {self._src_path(rel)}"
                    ) from exc
                raise

    def _chown(self, st: os.stat_result, new_gid: int, fd: int | None, name: str, dir_fd: int) -> None:
        if not self.chown or (st.st_uid == self.euid and st.st_gid == new_gid):
            return
        if fd is not None:
            os.fchown(fd, st.st_uid, st.st_gid)
        else:
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=False)

    # -- regular files ---------------------------------------------------------------------------

    def _copy_data(self, sfd: int, dfd: int, size: int) -> tuple[int, bool]:
        """Clone or copy ``size`` bytes; return (bytes, whether cloned)."""
        if self.reflink is not False:
            try:
                fcntl.ioctl(dfd, FICLONE, sfd)
            except OSError as exc:
                if exc.errno not in _NO_REFLINK:
                    raise
                if self.reflink is None:
                    self.reflink = False
            else:
                self.reflink = True
                return size, True
        done = 0
        if self.cfr:
            try:
                while done < size:
                    n = os.copy_file_range(sfd, dfd, min(size - done, _CHUNK))
                    if n == 0:
                        break
                    done += n
            except OSError as exc:
                if exc.errno not in _NO_CFR:
                    raise
                self.cfr = False
                os.lseek(sfd, done, os.SEEK_SET)
                os.lseek(dfd, done, os.SEEK_SET)
        if not self.cfr:
            while done < size:
                chunk = os.read(sfd, min(size - done, 1 << 20))
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dfd, view) :]
                done += len(chunk)
        return done, False

    def _file(self, d: _Dir, name: str, st: os.stat_result) -> None:
        """Make the copy of one regular file here; fill it here or, if large, in a worker.

        Only the inode is touched after the name is made, so the directory's own metadata never
        waits for a worker; a further hard link to the name may be made before it is filled.
        """
        if self.hardlink_files:
            os.link(name, name, src_dir_fd=d.src_fd, dst_dir_fd=d.dst_fd, follow_symlinks=False)
            self.stats.files += 1
            return
        try:
            sfd = os.open(name, self.rd_flags, dir_fd=d.src_fd)
        except PermissionError:
            sfd, _ = self._open_src(name, d.src_fd, st, self.rd_flags)
        try:
            dfd = os.open(name, _NEW_FLAGS, st.st_mode & 0o777, dir_fd=d.dst_fd)
        except BaseException:
            os.close(sfd)
            raise
        self.stats.files += 1
        if st.st_size < _WORKER_MIN_SIZE or not self.threads or self.reflink:  # a clone is cheap
            copied, cloned = self._fill(sfd, dfd, st, d, name)
            self.stats.bytes += copied
            self.stats.reflinked += cloned
            return
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(self.threads, "copy_tree")
        if len(self.pending) >= _MAX_PENDING:
            self._count(self.pending.popleft()[0].result())
        job = self.pool.submit(self._fill, sfd, dfd, st, d, name)
        self.pending.append((job, sfd, dfd))

    def _fill(self, sfd: int, dfd: int, st: os.stat_result, d: _Dir, name: str) -> tuple[int, bool]:
        """Data, owner, xattrs, mode, times of a new regular file; closes both fds (any thread)."""
        try:
            copied, cloned = self._copy_data(sfd, dfd, st.st_size) if st.st_size else (0, False)
            if self.chown and (st.st_uid != self.euid or st.st_gid != d.new_gid):
                os.fchown(dfd, st.st_uid, st.st_gid)
            try:
                if os.listxattr(sfd):  # most files have none: one call, no more
                    self._copy_xattrs(sfd, dfd, d.child(name))
            except OSError as exc:
                if exc.errno not in _NO_XATTRS:
                    raise
            mode = st.st_mode & 0o7777
            if mode & 0o7000 or mode & self.umask:
                os.fchmod(dfd, mode)
            os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(dfd)
            os.close(sfd)
        return copied, cloned

    def _count(self, result: tuple[int, bool]) -> None:
        self.stats.bytes += result[0]
        self.stats.reflinked += result[1]

    def _wait_workers(self) -> None:
        while self.pending:
            self._count(self.pending.popleft()[0].result())

    def _stop_workers(self) -> None:
        """After a failure: let running jobs end, close the fds of the ones that never ran."""
        if self.pool is None:
            return
        self.pool.shutdown(wait=True, cancel_futures=True)
        for job, sfd, dfd in self.pending:
            if job.cancelled():
                os.close(dfd)
                os.close(sfd)
        self.pending.clear()

    # -- other non-directories -------------------------------------------------------------------

    def _symlink(self, d: _Dir, name: str, st: os.stat_result) -> None:
        os.symlink(os.readlink(name, dir_fd=d.src_fd), name, dir_fd=d.dst_fd)
        self._chown(st, d.new_gid, None, name, d.dst_fd)
        self._copy_xattrs(
            f"/proc/self/fd/{d.src_fd}/{name}", f"/proc/self/fd/{d.dst_fd}/{name}", d.child(name)
        )
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=d.dst_fd, follow_symlinks=False)
        self.stats.symlinks += 1

    def _special(self, d: _Dir, name: str, st: os.stat_result) -> None:
        try:
            os.mknod(name, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=d.dst_fd)
        except PermissionError as exc:
            raise PermissionDenied(
                f"cannot create {_kind(st.st_mode)} {self._src_path(d.child(name))}: "
                "making device nodes needs CAP_MKNOD"
            ) from exc
        self._chown(st, d.new_gid, None, name, d.dst_fd)
        self._copy_xattrs(
            f"/proc/self/fd/{d.src_fd}/{name}", f"/proc/self/fd/{d.dst_fd}/{name}", d.child(name)
        )
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=d.dst_fd)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=d.dst_fd, follow_symlinks=False)
        self.stats.specials += 1

    # -- directories -----------------------------------------------------------------------------

    @staticmethod
    def _entries(src_fd: int) -> Iterator[os.DirEntry[str]]:
        with os.scandir(src_fd) as it:
            return iter(list(it))

    def _open_subdir(self, d: _Dir, name: str, st: os.stat_result) -> _Dir:
        sfd, restore = self._open_src(name, d.src_fd, st, _DIR_FLAGS)
        try:
            os.mkdir(name, 0o700, dir_fd=d.dst_fd)
            dfd = os.open(name, _DIR_FLAGS, dir_fd=d.dst_fd)
        except BaseException:
            self._close_src(sfd, restore)
            raise
        try:
            self._chown(st, d.new_gid, dfd, name, d.dst_fd)
            # made 0700, a directory is set-gid only if it inherited the bit, which can only come
            # from a set-gid dst root: then its entries get its group
            new_gid = self.egid
            if self.setgid_root:
                dst_st = os.fstat(dfd)
                if dst_st.st_mode & stat.S_ISGID:
                    new_gid = dst_st.st_gid
            return _Dir(sfd, dfd, d.child(name), st, self._entries(sfd), new_gid, restore)
        except BaseException:
            os.close(dfd)
            self._close_src(sfd, restore)
            raise

    @staticmethod
    def _close_src(fd: int, restore: int | None) -> None:
        try:
            if restore is not None:
                os.fchmod(fd, restore)
        finally:
            os.close(fd)

    def _finish(self, d: _Dir) -> None:
        """Post-order: the directory's xattrs, mode and times, now that its children exist."""
        st = d.st
        self._copy_xattrs(d.src_fd, d.dst_fd, d.rel)
        os.fchmod(d.dst_fd, stat.S_IMODE(st.st_mode))
        os.utime(d.dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.stats.dirs += 1

    def _linked(self, d: _Dir, name: str, st: os.stat_result) -> bool:
        """Link a further name of an inode seen before to its first copy; record a first one."""
        if stat.S_ISSOCK(st.st_mode) or (self.hardlink_files and stat.S_ISREG(st.st_mode)):
            return False
        key = (st.st_dev, st.st_ino)
        first = self.links.get(key)
        if first is None:
            self.links[key] = d.child(name)
            return False
        os.link(first, name, src_dir_fd=self.dst_root_fd, dst_dir_fd=d.dst_fd, follow_symlinks=False)
        self.stats.hardlinks += 1
        return True

    def run(self, src_fd: int, dst_fd: int) -> None:
        """Copy the tree depth-first; each directory gets its metadata once its entries exist."""
        self.dst_root_fd = dst_fd
        st = os.fstat(src_fd)
        if self.chown:
            os.fchown(dst_fd, st.st_uid, st.st_gid)
        dst_st = os.fstat(dst_fd)
        self.setgid_root = bool(dst_st.st_mode & stat.S_ISGID)
        new_gid = dst_st.st_gid if self.setgid_root else self.egid
        stack = [_Dir(src_fd, dst_fd, "", st, self._entries(src_fd), new_gid)]
        try:
            while stack:
                d = stack[-1]
                for entry in d.entries:
                    name = entry.name
                    est = entry.stat(follow_symlinks=False)
                    mode = est.st_mode
                    if est.st_nlink > 1 and not _S_ISDIR(mode) and self._linked(d, name, est):
                        continue
                    if _S_ISREG(mode):
                        self._file(d, name, est)
                    elif _S_ISDIR(mode):
                        stack.append(self._open_subdir(d, name, est))
                        break
                    elif _S_ISLNK(mode):
                        self._symlink(d, name, est)
                    elif _S_ISSOCK(mode):
                        self.stats.skipped_sockets += 1
                    else:
                        self._special(d, name, est)
                else:
                    self._finish(d)
                    stack.pop()
                    if stack:  # the root's fds belong to copy_tree
                        os.close(d.dst_fd)
                        self._close_src(d.src_fd, d.restore_mode)
            self._wait_workers()
        finally:
            self._stop_workers()
            for d in stack[1:]:
                os.close(d.dst_fd)
                self._close_src(d.src_fd, d.restore_mode)


def _open_dst(dst: Path) -> int:
    try:
        os.mkdir(dst, 0o700)
    except FileExistsError:
        fd = os.open(dst, _DIR_FLAGS)
        with os.scandir(fd) as it:
            if next(it, None) is not None:
                os.close(fd)
                raise InvalidArgument(f"copy destination {dst} is not an empty directory") from None
        return fd
    return os.open(dst, _DIR_FLAGS)


def copy_tree(
    src: Path | str,
    dst: Path | str,
    *,
    hardlink_files: bool = False,
    reflink: bool = True,
    threads: int | None = None,
) -> CopyStats:
    """Copy the tree at ``src`` to ``dst`` exactly (module docstring); return what was made.

    Args:
        src: the directory to copy; a symlink here is refused, never followed.
        dst: a directory to create (its parent must exist), or an existing empty directory.
        hardlink_files: hard-link each regular file to its source inode instead of copying it.
        reflink: try FICLONE before copying data (False: always copy the bytes).
        threads: worker threads filling large regular files (default: one per CPU beyond the
            first, at most 3; 0: none). Names, directories and small files are made in the
            calling thread.

    Raises:
        PermissionDenied: without root, ``src`` holds a device node (named in the message) or
            an xattr only root may set. ``dst`` is left partly filled; the caller removes it.
        NotSupported: ``dst``'s filesystem cannot store one of the xattrs.
        InvalidArgument: ``dst`` is inside ``src``, or exists and is not an empty directory.
    """
    src_s = os.path.abspath(os.fspath(src))
    dst_real = os.path.realpath(os.path.dirname(os.path.abspath(os.fspath(dst))))
    if (dst_real + "/").startswith(os.path.realpath(src_s) + "/"):
        raise InvalidArgument(f"cannot copy {src_s} into itself ({dst})")
    if threads is None:
        threads = min(3, len(os.sched_getaffinity(0)) - 1)
    copier = _Copier(src_s, hardlink_files=hardlink_files, reflink=reflink, threads=threads)
    src_fd = os.open(src_s, _DIR_FLAGS)
    try:
        dst_fd = _open_dst(Path(dst))
        try:
            copier.run(src_fd, dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    return copier.stats


def supports_reflink(directory: Path | str) -> bool:
    """Whether files in ``directory`` can be cloned with FICLONE (probed with two temp files)."""
    import tempfile

    fds: list[int] = []
    try:
        for _ in range(2):
            fd, path = tempfile.mkstemp(prefix=".reflink-probe-", dir=directory)
            fds.append(fd)
            os.unlink(path)
        os.write(fds[0], b"\0" * 4096)
        fcntl.ioctl(fds[1], FICLONE, fds[0])
    except OSError:
        return False
    finally:
        for fd in fds:
            os.close(fd)
    return True
