"""Removing trees without ever following a symlink out of them or deleting through a live mount.

:func:`remove_tree` is the only way drivers and the store delete directories. It refuses (with
:class:`~graphdriver.errors.Busy`) when anything below the path is a mount point, so a leaked
overlay or bind mount is never emptied by ``rm -rf``, and it removes through directory file
descriptors (``shutil.rmtree``'s fd-based walk), so a symlink swapped in mid-walk is unlinked,
not followed (BuildKit CVE-2024-23652). Read-only directories owned by the caller are made
writable first, so an unprivileged user can remove what an image made 0555.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graphdriver.errors import Busy


def _decode_mountinfo_path(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount_points_under(path: Path | str) -> list[str]:
    """Mount points at or below ``path`` in this process's mount namespace, deepest first."""
    base = os.path.realpath(path)
    prefix = base.rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = _decode_mountinfo_path(line.split()[4])
            if point == base or point.startswith(prefix):
                found.append(point)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


def _make_writable_and_retry(func: Callable[..., Any], path: str, exc_info: Any) -> None:
    exc = exc_info[1]
    if isinstance(exc, FileNotFoundError):
        return
    if not isinstance(exc, PermissionError):
        raise exc
    parent = os.path.dirname(path)
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | stat.S_IRWXU)
    finally:
        os.close(fd)
    if func in (os.rmdir, os.unlink, os.remove):
        func(path)
    elif func in (os.open, os.scandir, os.lstat):
        try:
            os.chmod(path, stat.S_IRWXU, follow_symlinks=False)
        except OSError:
            pass
        shutil.rmtree(path, onerror=_make_writable_and_retry)
    else:
        raise exc


def remove_tree(path: Path | str, *, missing_ok: bool = True) -> None:
    """Remove ``path`` (a directory tree, a file or a symlink) without following symlinks.

    Raises :class:`Busy` if a mount point lies at or below ``path``.
    """
    p = os.fspath(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(p)
        return
    mounts = mount_points_under(p)
    if mounts:
        raise Busy(f"refusing to remove {p}: {mounts[0]} is still mounted")
    try:
        shutil.rmtree(p, onerror=_make_writable_and_retry)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise Busy(f"refusing to remove {p}: {exc}") from exc
        raise
