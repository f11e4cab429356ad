"""Whether a recorded mount count is still true.

The store keeps each layer's mount count in its database so that one process can mount and
another unmount. A count is believed only while the world agrees with it:

- it was counted during this boot (``/proc/sys/kernel/random/boot_id``): a reboot unmounts
  everything, so counts from an earlier boot are stale;
- when the driver mounted something (``mount_kind == "mount"``), the mount point is still in the
  kernel's mount table (an external ``umount`` makes the count stale). Plain directories (vfs,
  and layers a driver hands out without mounting) have nothing to check beyond the boot.
"""

from __future__ import annotations

import functools

from graphdriver import mount as kmount
from graphdriver.layers.metadata import Layer

__all__ = ["boot_id", "mount_alive"]


@functools.cache
def boot_id() -> str:
    """This boot's id; ``"unknown"`` where the kernel does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def mount_alive(layer: Layer) -> bool:
    """Whether ``layer``'s recorded mount count is still true (see the module docstring)."""
    if layer.mount_count <= 0 or layer.mount_boot != boot_id():
        return False
    if layer.mount_kind == "mount":
        return layer.mount_point is not None and kmount.is_mountpoint(layer.mount_point)
    return True
