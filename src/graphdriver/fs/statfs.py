"""Which filesystem holds a path: the ``f_type`` magic of ``statfs(2)`` and its name.

Drivers ask this to refuse a backing filesystem they cannot use (btrfs needs btrfs, overlay
upper dirs cannot live on overlay, nfs...), and to report it in ``status()``:

- :func:`fs_magic` is the raw ``f_type`` (as ``<linux/magic.h>`` spells it, e.g.
  :data:`BTRFS_SUPER_MAGIC`), unsigned 32 bits;
- :data:`FS_MAGIC` names the magics of the filesystems a graph root plausibly sits on, as the
  kernel names the filesystem type (``ext4`` for the ext2/3/4 magic they share);
- :func:`filesystem_name` and :func:`filesystem_type` give that name, or the magic in hex
  (``0x1234``) for a filesystem not in the table.

``statfs`` follows the path; it raises :class:`OSError` (with the path) when it cannot.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

__all__ = [
    "BTRFS_SUPER_MAGIC",
    "FS_MAGIC",
    "filesystem_name",
    "filesystem_type",
    "fs_magic",
]

BTRFS_SUPER_MAGIC: Final = 0x9123683E

FS_MAGIC: Final[Mapping[int, str]] = {
    0xEF53: "ext4",
    0x58465342: "xfs",
    BTRFS_SUPER_MAGIC: "btrfs",
    0x01021994: "tmpfs",
    0x858458F6: "ramfs",
    0x794C7630: "overlay",
    0x2FC12FC1: "zfs",
    0xF2F52010: "f2fs",
    0xCA451A4E: "bcachefs",
    0x65735546: "fuse",
    0x6969: "nfs",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x01021997: "9p",
    0x73717368: "squashfs",
    0xE0F5E1E2: "erofs",
    0x61756673: "aufs",
    0x52654973: "reiserfs",
    0x3153464A: "jfs",
    0xF15F: "ecryptfs",
}
"""statfs ``f_type`` -> the filesystem's name"""

_STATFS_SIZE = 256  # struct statfs is 120 bytes on 64-bit Linux; f_type is its first field (a long)


def fs_magic(path: Path | str) -> int:
    """The ``f_type`` of ``statfs(path)``, as an unsigned 32-bit number."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(path))
    return int(ctypes.c_long.from_buffer(buf).value) & 0xFFFFFFFF


def filesystem_name(magic: int) -> str:
    """The name of the filesystem with statfs magic ``magic``, or the magic in hex."""
    return FS_MAGIC.get(magic, f"0x{magic:x}")


def filesystem_type(path: Path | str) -> str:
    """The name of the filesystem holding ``path`` (from ``statfs`` f_type), or its magic in hex."""
    return filesystem_name(fs_magic(path))
