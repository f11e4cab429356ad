"""Layer tars from directory trees: a change list, a whole tree, or either streamed through a pipe.

- :func:`export_changes` writes the tar of a change list (from :mod:`graphdriver.archive.changes`)
  in the list's order: a Delete becomes an OCI whiteout ``<dir>/.wh.<name>``, an Add or Modify the
  entry as it is on disk now.
- :func:`tar_tree` writes a whole tree as a base layer: ``./`` first, then every path sorted.
- :func:`open_export` streams either from a writer thread, for callers that read a stream.

The output is deterministic: the same tree gives the same bytes (see
:mod:`graphdriver.archive.tarwriter` for the format). Entries carry mode with the special bits,
numeric owner, mtime with nanoseconds and every extended attribute except overlay's own
(``trusted.overlay.*``, ``user.overlay.*``, which describe an upper dir, not the layer). The second
and later names of a hard-linked inode become hard-link entries to the first name exported.
Sockets are skipped, as containerd does. Whiteout entries (and opaque markers) are regular, empty,
mode 0, owner 0:0, mtime 0, so that they do not depend on when the export ran.

With ``source_format=WhiteoutFormat.OVERLAY`` the tree is an overlay upper dir: a 0/0 character
device is written as ``.wh.<name>`` and a directory with the opaque attribute is followed by
``<dir>/.wh..wh..opq``.

Every entry is opened with ``O_NOFOLLOW`` relative to a descriptor of its parent directory, itself
opened component by component the same way, so a symlink swapped into a live tree is never
followed out of it (CVE-2018-15664). Entries that vanish or change type during the export of a
live tree are skipped, as the seed does.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, cast

from graphdriver.archive.changes import (
    _PROC_FD,
    OVERLAY_XATTR_PREFIXES,
    _open_root,
    _open_subdir,
    changes_dirs,
    read_xattrs,
)
from graphdriver.archive.tarwriter import TarKind, TarWriter
from graphdriver.archive.types import Change, ChangeKind, WhiteoutFormat
from graphdriver.errors import ArchiveError, GraphDriverError, InvalidArgument, PermissionDenied

__all__ = ["export_changes", "open_export", "tar_tree"]

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_NOATIME = getattr(os, "O_NOATIME", 0)
_GONE = frozenset((errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENXIO))
_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
_EXPORTED_FORMATS = frozenset((stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO))
_PIPE_SIZE = 1 << 20
_SPOOL_MAX_CHANGES = 256  # open_export writes change lists up to this long into memory first...
_SPOOL_LIMIT = 4 << 20  # ... while their tar stays under this size
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _components(path: str) -> list[str]:
    """``/a/b`` -> ``["a", "b"]``; anything not a clean absolute path below ``/`` is refused."""
    if (
        path[:1] != "/"
        or path.endswith(("/", "/.", "/.."))
        or "//" in path
        or "/./" in path
        or "/../" in path
        or "\0" in path
    ):
        raise InvalidArgument(f"not a clean absolute path in a change list: {path!r}")
    return path[1:].split("/")


class _Exporter:
    """Writes entries of one tree; keeps the open directory chain of the last entry's parent."""

    def __init__(self, root_fd: int, root_path: str, writer: TarWriter, source_format: WhiteoutFormat):
        self.root_fd = root_fd
        self.root_path = root_path
        self.writer = writer
        self.overlay = source_format is WhiteoutFormat.OVERLAY
        self.names: list[str] = []
        self.fds: list[int] = []
        self.links: dict[tuple[int, int], str] = {}
        self.cached_path: str | None = None  # the parent dir of the last entry, and its fd
        self.cached_fd: int | None = None
        self.open_flags = _OPEN_FLAGS | _NOATIME

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())
        self.names.clear()
        self.cached_path = None

    def _parent(self, comps: Sequence[str]) -> int | None:
        """The fd of the directory ``comps`` (relative to the root), or None if it is gone."""
        names, fds = self.names, self.fds
        keep = 0
        limit = min(len(comps), len(names))
        while keep < limit and names[keep] == comps[keep]:
            keep += 1
        while len(fds) > keep:
            os.close(fds.pop())
            names.pop()
        self.cached_path = None
        fd = fds[-1] if fds else self.root_fd
        for name in comps[keep:]:
            sub = _open_subdir(fd, name)
            if sub is None:
                return None
            fds.append(sub)
            names.append(name)
            fd = sub
        return fd

    def _entry_path(self, parent: int, name: str) -> str:
        """A path naming ``name`` in the open directory ``parent``, not following ``name``."""
        if _PROC_FD is not None:
            return f"{_PROC_FD}{parent}/{name}"
        return "/".join((self.root_path, *self.names, name))

    # -- entries ------------------------------------------------------------------------------

    def whiteout(self, tar_name: str) -> None:
        self.writer.add(tar_name, TarKind.REGULAR)

    def delete(self, path: str) -> None:
        if path == "/":
            raise InvalidArgument("a change list cannot delete the root '/'")
        _components(path)
        self.whiteout(_whiteout_name(path[1:]))

    def add(self, path: str) -> None:
        parent_path, _, name = path.rpartition("/")
        if name in ("", ".", "..") or path[:1] != "/" or "\0" in name:
            if path == "/":
                self._add_root()
                return
            raise InvalidArgument(f"not a clean absolute path in a change list: {path!r}")
        if parent_path == self.cached_path:
            parent = self.cached_fd
        else:
            parent = self._parent(_components(parent_path) if parent_path else [])
            self.cached_path, self.cached_fd = parent_path, parent
        if parent is None:
            return
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in _GONE:
                return
            raise
        self._add_entry(parent, name, path[1:], st)

    def _add_root(self) -> None:
        st = os.fstat(self.root_fd)
        xattrs = read_xattrs(self.root_fd, keep_overlay=True)
        self._dir_entry("./", st, xattrs)

    def _dir_entry(self, tar_name: str, st: os.stat_result, xattrs: dict[str, bytes]) -> None:
        opaque = False
        if xattrs:
            opaque = self.overlay and any(xattrs.get(k) == b"y" for k in _OPAQUE_XATTRS)
            xattrs = _public_xattrs(xattrs)
        self.writer.add_stat(tar_name, st, xattrs=xattrs)
        if opaque:
            self.whiteout(OPAQUE_MARKER if tar_name == "./" else tar_name + OPAQUE_MARKER)

    def _hardlink(self, st: os.stat_result, tar_name: str) -> bool:
        """Write a hard-link entry if this inode was exported before; else remember this name."""
        key = (st.st_dev, st.st_ino)
        first = self.links.get(key)
        if first is None:
            self.links[key] = tar_name
            return False
        self.writer.add(
            tar_name,
            TarKind.HARDLINK,
            mode=st.st_mode,
            uid=st.st_uid,
            gid=st.st_gid,
            mtime_ns=st.st_mtime_ns,
            linkname=first,
        )
        return True

    def _add_file(self, parent: int, name: str, tar_name: str, lst: os.stat_result) -> None:
        try:
            try:
                fd = os.open(name, self.open_flags, dir_fd=parent)
            except PermissionError:
                # a file its owner may not read (an image's 0000 /etc/shadow, exported
                # unprivileged) is opened with its mode widened for the open only; anyone else's
                # stays an error (imported here: the module costs a diff ~2 ms of start-up)
                from graphdriver.fs.copy import open_as_owner

                fd, _ = open_as_owner(name, parent, lst, self.open_flags)
        except OSError as exc:
            if exc.errno in _GONE:
                return
            if exc.errno == errno.EPERM and self.open_flags & _NOATIME:
                # O_NOATIME needs ownership or CAP_FOWNER: go on without it
                self.open_flags &= ~_NOATIME
                self._add_file(parent, name, tar_name, lst)
                return
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return  # replaced by something else since the lstat
            if st.st_nlink > 1 and self._hardlink(st, tar_name):
                return
            self.writer.add_stat(tar_name, st, xattrs=read_xattrs(fd), data_fd=fd)
        finally:
            os.close(fd)

    def _add_entry(self, parent: int, name: str, tar_name: str, st: os.stat_result) -> None:
        fmt = stat.S_IFMT(st.st_mode)
        if fmt == stat.S_IFREG:
            self._add_file(parent, name, tar_name, st)
            return
        entry_path = self._entry_path(parent, name)
        if fmt == stat.S_IFDIR:
            self._dir_entry(tar_name + "/", st, read_xattrs(entry_path, keep_overlay=True))
            return
        if fmt == stat.S_IFSOCK or fmt not in _EXPORTED_FORMATS:
            return  # sockets (and anything stranger) are not part of a layer
        if fmt == stat.S_IFCHR and st.st_rdev == 0 and self.overlay:
            self.whiteout(_whiteout_name(tar_name))
            return
        linkname = ""
        if fmt == stat.S_IFLNK:
            try:
                linkname = os.readlink(name, dir_fd=parent)
            except OSError as exc:
                if exc.errno in _GONE or exc.errno == errno.EINVAL:
                    return  # gone, or no longer a symlink
                raise
        if st.st_nlink > 1 and self._hardlink(st, tar_name):
            return
        self.writer.add_stat(tar_name, st, linkname=linkname, xattrs=read_xattrs(entry_path))


def _whiteout_name(tar_name: str) -> str:
    """``a/b`` -> ``a/.wh.b``."""
    parent, _, base = tar_name.rpartition("/")
    return f"{parent}/{WHITEOUT_PREFIX}{base}" if parent else WHITEOUT_PREFIX + base


def _public_xattrs(xattrs: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in xattrs.items() if not k.startswith(OVERLAY_XATTR_PREFIXES)}


def _export(
    root: Path, changes: Sequence[Change], out: BinaryIO, source_format: WhiteoutFormat, root_fd: int
) -> int:
    """Write the tar of ``changes``; OSErrors other than vanished entries propagate raw."""
    writer = TarWriter(out)
    exporter = _Exporter(root_fd, os.fspath(root), writer, source_format)
    try:
        for change in changes:
            if change.kind is ChangeKind.DELETE:
                exporter.delete(change.path)
            else:
                exporter.add(change.path)
    finally:
        exporter.close()
    return writer.close()


def _wrap(exc: OSError, root: Path) -> GraphDriverError:
    if isinstance(exc, PermissionError):
        return PermissionDenied(f"cannot export {os.fspath(root)!r}: {exc}")
    return ArchiveError(f"cannot export {os.fspath(root)!r}: {exc}")


def export_changes(
    root: Path,
    changes: Sequence[Change],
    out: BinaryIO,
    *,
    source_format: WhiteoutFormat = WhiteoutFormat.OCI,
) -> int:
    """Write the layer tar of ``changes`` of tree ``root`` to ``out``, in the order given.

    ``changes`` is normally the sorted list of :func:`~graphdriver.archive.changes.changes_dirs`
    or :func:`~graphdriver.archive.changes.changes_from_upper`; a ``/`` entry writes the root
    directory as ``./``.

    Returns:
        The number of bytes written.

    Raises:
        NotFound / InvalidArgument: ``root`` is missing or not a directory; a path in ``changes``
            is not a clean absolute path.
        ArchiveError / PermissionDenied: an entry could not be read, or ``out`` not written.
    """
    root_fd = _open_root(root, "export root")
    try:
        return _export(root, changes, out, source_format, root_fd)
    except OSError as exc:
        raise _wrap(exc, root) from exc
    finally:
        os.close(root_fd)


def _tree_changes(root: Path) -> list[Change]:
    return [Change("/", ChangeKind.ADD), *changes_dirs(root, None)]


def tar_tree(root: Path, out: BinaryIO, *, source_format: WhiteoutFormat = WhiteoutFormat.OCI) -> int:
    """Write the whole tree ``root`` as a layer tar: ``./`` (the root's own metadata), then every
    path in sorted order, by the rules of :func:`export_changes`. Returns the bytes written."""
    return export_changes(root, _tree_changes(root), out, source_format=source_format)


class _WriterState:
    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.reported = False


class _Spill(Exception):
    """A spooled export outgrew its limit: it is streamed from a thread instead."""


class _SpoolSink(io.RawIOBase):
    """Keeps what is written in memory, up to ``limit`` bytes (then raises :class:`_Spill`)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = limit

    def writable(self) -> bool:
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        data = bytes(b)
        self.size += len(data)
        if self.size > self.limit:
            raise _Spill
        self.parts.append(data)
        return len(data)


def _spool(
    root: Path, changes: Sequence[Change], source_format: WhiteoutFormat, root_fd: int
) -> tuple[bytes, _WriterState] | None:
    """Export ``changes`` into memory: their tar (up to the writer's error, kept in the state),
    or None when it grows over :data:`_SPOOL_LIMIT`."""
    sink = _SpoolSink(_SPOOL_LIMIT)
    state = _WriterState()
    try:
        _export(root, changes, cast(BinaryIO, sink), source_format, root_fd)
    except _Spill:
        return None
    except Exception as exc:  # what the thread would have met: raised when read, as there
        state.error = exc
    return b"".join(sink.parts), state


class _SpooledReader(io.RawIOBase):
    """A spooled export; at the end of its bytes, the writer's error is raised here."""

    def __init__(self, data: bytes, state: _WriterState, root: Path) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._state = state
        self._root = root

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("read from a closed export stream")
        n = min(len(buffer), len(self._data) - self._pos)
        if n == 0:
            _raise_writer_error(self._state, self._root)
            return 0
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


class _PipeReader(io.RawIOBase):
    """The read end of the export pipe; at end of stream, the writer's error is raised here."""

    def __init__(self, fd: int, thread: threading.Thread, state: _WriterState, root: Path) -> None:
        self._fd = fd
        self._thread = thread
        self._state = state
        self._root = root

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("read from a closed export stream")
        n = os.readv(self._fd, [buffer])
        if n == 0:
            self._thread.join()
            _raise_writer_error(self._state, self._root)
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def _raise_writer_error(state: _WriterState, root: Path) -> None:
    exc = state.error
    if exc is None or state.reported or isinstance(exc, BrokenPipeError):
        return
    state.reported = True
    if isinstance(exc, OSError):
        raise _wrap(exc, root) from exc
    raise exc


@contextlib.contextmanager
def open_export(
    root: Path,
    changes: Sequence[Change] | None,
    *,
    source_format: WhiteoutFormat = WhiteoutFormat.OCI,
) -> Iterator[BinaryIO]:
    """A readable stream of the layer tar of ``changes`` of ``root`` (None: the whole tree).

    The tar is written by a thread into a pipe while the caller reads; a short change list (at
    most :data:`_SPOOL_MAX_CHANGES`, a tar under :data:`_SPOOL_LIMIT` bytes) is written into
    memory first instead, which spares a small diff the thread's start and hand-offs. Either way,
    an error of the writer is raised from ``read`` at the end of the stream, or on leaving the
    context if the stream was not read to its end; it is never swallowed. Leaving the context
    early closes the pipe, which stops the writer. ``root`` is checked before the context is
    entered.
    """
    root_fd = _open_root(root, "export root")
    try:
        todo = _tree_changes(root) if changes is None else changes
        spooled = _spool(root, todo, source_format, root_fd) if len(todo) <= _SPOOL_MAX_CHANGES else None
        if spooled is not None:
            os.close(root_fd)
    except BaseException:
        os.close(root_fd)
        raise
    if spooled is not None:
        data, done = spooled
        reader = io.BufferedReader(_SpooledReader(data, done, root))
        try:
            yield reader
        finally:
            reader.close()
        _raise_writer_error(done, root)
        return
    try:
        r, w = os.pipe2(os.O_CLOEXEC)
    except BaseException:
        os.close(root_fd)
        raise
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, _F_SETPIPE_SZ, _PIPE_SIZE)
    state = _WriterState()

    def run() -> None:
        try:
            with open(w, "wb", buffering=0) as sink:
                _export(root, todo, sink, source_format, root_fd)
        except BaseException as exc:
            state.error = exc
        finally:
            os.close(root_fd)

    thread = threading.Thread(target=run, name=f"export {os.fspath(root)}", daemon=True)
    thread.start()
    raw = _PipeReader(r, thread, state, root)
    stream = io.BufferedReader(raw, buffer_size=_PIPE_SIZE)
    try:
        yield stream
    except BaseException:
        stream.close()
        thread.join()
        raise
    stream.close()
    thread.join()
    _raise_writer_error(state, root)
