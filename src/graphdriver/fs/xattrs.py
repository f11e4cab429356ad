"""Extended attributes without following symlinks.

Every function takes a *target*: an open file descriptor (``int``), or a path that is never
followed at its last component (the ``l*xattr`` calls). To reach an entry relative to a directory
fd without following anything, pass :func:`at` ``(dirfd, name)``, which is
``/proc/self/fd/<dirfd>/<name>``: the kernel resolves the ``fd`` magic link to that directory and
then looks ``name`` up in it with no-follow semantics.

Filesystems without xattr support are not an error for readers: listing gives ``[]`` and a
missing or unsupported attribute reads as ``None`` (ENOTSUP, ENODATA). Writers raise the
``OSError``; the caller decides what a failure means.

``trusted.overlay.*`` and ``user.overlay.*`` (with ``userxattr``) steer overlayfs (opaque dirs,
redirects, metacopy, whiteouts); :func:`is_overlay_xattr` names them so that callers can keep
them out of places they must not reach.
"""

from __future__ import annotations

import errno
import os
from typing import TypeAlias

__all__ = [
    "Target",
    "at",
    "get_all_xattrs",
    "get_xattr",
    "is_overlay_xattr",
    "list_xattrs",
    "remove_xattr",
    "set_xattr",
]

Target: TypeAlias = "int | str | bytes | os.PathLike[str]"
"""An open fd, or a path whose last component is not followed."""

_ABSENT = {errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP}
_OVERLAY_PREFIXES = ("trusted.overlay.", "user.overlay.")


def at(dir_fd: int, name: str) -> str:
    """The path of ``name`` in the directory open as ``dir_fd``, for the ``l*xattr`` calls."""
    return f"/proc/self/fd/{dir_fd}/{name}"


def _follow(target: Target) -> bool:
    # os.*xattr() refuse follow_symlinks=False together with an fd
    return isinstance(target, int)


def list_xattrs(target: Target) -> list[str]:
    """The names of ``target``'s xattrs (those this process may see), sorted; ``[]`` if unsupported."""
    try:
        return sorted(os.listxattr(target, follow_symlinks=_follow(target)))
    except OSError as exc:
        if exc.errno in _ABSENT:
            return []
        raise


def get_xattr(target: Target, name: str) -> bytes | None:
    """The value of xattr ``name`` of ``target``, or ``None`` if it is absent or unsupported."""
    try:
        return os.getxattr(target, name, follow_symlinks=_follow(target))
    except OSError as exc:
        if exc.errno in _ABSENT:
            return None
        raise


def get_all_xattrs(target: Target) -> dict[str, bytes]:
    """Every xattr of ``target`` as ``{name: value}`` in name order (one vanishing mid-read is skipped)."""
    out: dict[str, bytes] = {}
    for name in list_xattrs(target):
        value = get_xattr(target, name)
        if value is not None:
            out[name] = value
    return out


def set_xattr(target: Target, name: str, value: bytes, *, flags: int = 0) -> None:
    """Set xattr ``name`` of ``target`` (``flags``: ``os.XATTR_CREATE`` / ``os.XATTR_REPLACE``)."""
    os.setxattr(target, name, value, flags, follow_symlinks=_follow(target))


def remove_xattr(target: Target, name: str, *, missing_ok: bool = True) -> None:
    """Remove xattr ``name`` of ``target``; an absent one is fine unless ``missing_ok`` is False."""
    try:
        os.removexattr(target, name, follow_symlinks=_follow(target))
    except OSError as exc:
        if missing_ok and exc.errno in _ABSENT:
            return
        raise


def is_overlay_xattr(name: str) -> bool:
    """Whether ``name`` is an overlayfs control xattr (``trusted.overlay.*`` or ``user.overlay.*``)."""
    return name.startswith(_OVERLAY_PREFIXES)
