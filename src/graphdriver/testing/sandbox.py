"""A read-only mount namespace for tests that run as root.

As root, one wrong path join in an apply or a remove is ``rm -rf /``. :func:`enter_readonly_sandbox`
moves the calling process into a private mount namespace in which every mount is read-only except
the given scratch directories (and /proc, /sys, /dev, /dev/shm). A bug that escapes a layer root then
fails with EROFS instead of damaging the machine. Mounts made inside (overlay, loop, fuse) stay in the
namespace and disappear with the process.

It must be called while the process is single-threaded (``unshare(CLONE_NEWNS)`` requires it);
the test suite calls it from ``pytest_configure``.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable

CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000

# statvfs f_flag bits -> mount flags to keep on remount
_KEEP_FLAGS = (
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME),
    (os.ST_RELATIME, MS_RELATIME),
)

ALWAYS_WRITABLE = ("/proc", "/sys", "/dev")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    libc = _libc()
    res = libc.mount(
        source.encode() if source else None,
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        None,
    )
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            field = line.split()[4]
            points.append(field.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\"))
    return points


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def enter_readonly_sandbox(writable: Iterable[str]) -> list[str]:
    """Enter a private mount namespace where only ``writable`` (and /proc, /sys, /dev) stay writable.

    Returns the list of mount points made read-only.
    """
    keep = sorted({os.path.realpath(p) for p in writable if os.path.isdir(p)})
    libc = _libc()
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNS): {os.strerror(err)}")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    for path in keep:
        _mount(path, path, None, MS_BIND | MS_REC)
    protected = [*keep, *ALWAYS_WRITABLE]
    made_readonly = []
    for point in sorted(set(_mount_points()), key=len):
        if _under(point, protected):
            continue
        try:
            st = os.statvfs(point)
        except OSError:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for st_bit, ms_bit in _KEEP_FLAGS:
            if st.f_flag & st_bit:
                flags |= ms_bit
        try:
            _mount(None, point, None, flags)
        except OSError:
            continue
        made_readonly.append(point)
    os.chdir(os.getcwd())  # re-resolve the working directory through its bind mount
    return made_readonly
