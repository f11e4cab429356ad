"""Open paths inside a root directory as if it were ``/`` (chroot semantics, without chroot).

:func:`open_in_root` resolves ``relpath`` relative to the directory fd ``root_fd`` so that nothing
outside the root can be reached: ``..`` stops at the root, absolute symlink targets start again at
the root, and magic links (``/proc/self/fd/N`` and friends) are refused. These are containerd's
"clamp" semantics (security.md §0 (a)): a symlink ``x -> ../../etc`` inside the root leads to
``root/etc``, never to the host's ``/etc``.

It uses ``openat2(2)`` with ``RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`` (Linux >= 5.6), where the
kernel does the clamping atomically. Where ``openat2`` is missing (``ENOSYS``, or a seccomp filter
answering ``EPERM``), the same rules are applied in user space: each component is opened with
``O_PATH | O_NOFOLLOW`` relative to the previous directory fd, symlinks are read and expanded
(at most 40 of them), and ``..`` pops back to the directory fd it came from. :func:`force_fallback`
selects that path (for tests).

Every fd returned is ``O_CLOEXEC``. Errors are :class:`OSError` with the usual errno (``ENOENT``,
``ENOTDIR``, ``ELOOP``, ``EEXIST``...), as :func:`os.open` raises them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "MAX_SYMLINKS",
    "RESOLVE_IN_ROOT",
    "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_XDEV",
    "force_fallback",
    "open_in_root",
    "open_in_root_fallback",
    "openat2_available",
]

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
MAX_SYMLINKS = 40
_PATH_MAX = 4096

_SYS_OPENAT2 = 437  # the same number on every architecture (added after the syscall table merge)
_EAGAIN_RETRIES = 32


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall  # no argtypes: ints, bytes and a prepared byref() convert faster by themselves
_syscall.restype = ctypes.c_long

_HOW_SIZE = ctypes.sizeof(_OpenHow)
_RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
# syscall(2) is variadic and reads longs: pass the number and the size as C longs explicitly
_NR_OPENAT2 = ctypes.c_long(_SYS_OPENAT2)
_HOW_SIZE_ARG = ctypes.c_size_t(_HOW_SIZE)
_hows: dict[tuple[int, int, int], tuple[_OpenHow, object]] = {}  # (flags, mode, resolve) -> (struct, byref)
_available: bool | None = None
_forced = threading.local()
_forced.active = False
_forced_anywhere = 0  # how many threads are inside force_fallback(): the fast path checks this int


def _probe() -> bool:
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC | os.O_DIRECTORY, 0, RESOLVE_IN_ROOT)
    fd = _syscall(_NR_OPENAT2, ctypes.c_long(-100), b"/", ctypes.byref(how), _HOW_SIZE_ARG)  # AT_FDCWD
    if fd >= 0:
        os.close(fd)
        return True
    return False


def openat2_available() -> bool:
    """True when the kernel (and any seccomp filter) lets this process call ``openat2``."""
    global _available
    if _available is None:
        _available = _probe()
    return _available


@contextmanager
def force_fallback() -> Iterator[None]:
    """Within the block, this thread resolves with the user-space fallback (for tests)."""
    global _forced_anywhere
    previous = getattr(_forced, "active", False)
    _forced.active = True
    _forced_anywhere += 1
    try:
        yield
    finally:
        _forced.active = previous
        _forced_anywhere -= 1


def open_in_root(
    root_fd: int, relpath: str | bytes, flags: int, mode: int = 0, *, symlinks: bool = True
) -> int:
    """Open ``relpath`` inside the directory ``root_fd`` with chroot-like resolution; return the fd.

    ``relpath`` may be absolute (it is taken relative to the root) and may contain symlinks and
    ``..``; none of them can leave the root. ``flags`` are :func:`os.open` flags (``O_CLOEXEC`` is
    always added); ``O_NOFOLLOW`` applies to the last component, as usual. ``mode`` is used with
    ``O_CREAT``. With ``symlinks=False`` a symlink anywhere on the path is ``ELOOP``
    (``RESOLVE_NO_SYMLINKS``): the fd is then known to be reached through real directories only.
    """
    path = relpath.encode("utf-8", "surrogateescape") if isinstance(relpath, str) else relpath
    resolve = _RESOLVE if symlinks else _RESOLVE | RESOLVE_NO_SYMLINKS
    prepared = _hows.get((flags, mode, resolve))
    if prepared is None:
        if _available is None:
            openat2_available()
        how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & (os.O_CREAT | os.O_TMPFILE) else 0, resolve)
        prepared = _hows[(flags, mode, resolve)] = (how, ctypes.byref(how))
    if not _available or (_forced_anywhere and getattr(_forced, "active", False)):
        return open_in_root_fallback(root_fd, path, flags, mode, symlinks=symlinks)
    ref = prepared[1]
    for _ in range(_EAGAIN_RETRIES):
        fd: int = _syscall(_NR_OPENAT2, ctypes.c_long(root_fd), path or b".", ref, _HOW_SIZE_ARG)
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err == errno.EINTR:
            continue
        if err != errno.EAGAIN:  # EAGAIN: a concurrent rename or mount somewhere; retry
            raise OSError(err, os.strerror(err), os.fsdecode(path))
    return open_in_root_fallback(root_fd, path, flags, mode, symlinks=symlinks)


def _components(path: bytes) -> list[bytes]:
    """The components of ``path`` as a stack (the next one last), without empty ones and ``.``."""
    return [c for c in reversed(path.split(b"/")) if c and c != b"."]


def open_in_root_fallback(
    root_fd: int, relpath: str | bytes, flags: int, mode: int = 0, *, symlinks: bool = True
) -> int:
    """The user-space equivalent of :func:`open_in_root` (used when ``openat2`` is unavailable)."""
    path = os.fsencode(relpath)
    if len(path) >= _PATH_MAX:  # as the kernel refuses the path argument of openat2
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), os.fsdecode(path[:200]))
    flags |= os.O_CLOEXEC
    nofollow_last = bool(flags & os.O_NOFOLLOW)
    walk = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    todo = _components(path)
    stack = [os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)]
    hops = 0

    def expand(target: bytes) -> None:
        nonlocal hops
        hops += 1
        if not symlinks:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.fsdecode(path))
        if hops > MAX_SYMLINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.fsdecode(path))
        if not target:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), os.fsdecode(path))
        if target.startswith(b"/"):
            while len(stack) > 1:
                os.close(stack.pop())
        todo.extend(_components(target))

    try:
        while todo:
            name = todo.pop()
            if name == b"..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            cur = stack[-1]
            if todo:  # an intermediate component: must be a directory or a symlink to one
                try:
                    stack.append(os.open(name, walk, dir_fd=cur))
                except OSError as exc:
                    if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    st = os.stat(name, dir_fd=cur, follow_symlinks=False)
                    if not stat.S_ISLNK(st.st_mode):
                        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), os.fsdecode(path)) from None
                    expand(os.fsencode(os.readlink(name, dir_fd=cur)))
                continue
            # the last component
            try:
                fd = os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=cur)
            except OSError as exc:
                if nofollow_last or exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                st = os.stat(name, dir_fd=cur, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    raise
                expand(os.fsencode(os.readlink(name, dir_fd=cur)))
                continue
            if nofollow_last or not flags & os.O_PATH or not stat.S_ISLNK(os.fstat(fd).st_mode):
                return fd
            os.close(fd)  # O_PATH|O_NOFOLLOW opened the symlink itself: follow it
            expand(os.fsencode(os.readlink(name, dir_fd=cur)))
        # the path ended on the root, "." or "..": open the directory we are in
        return os.open(".", flags & ~os.O_NOFOLLOW, mode, dir_fd=stack[-1])
    finally:
        for fd in stack:
            os.close(fd)
