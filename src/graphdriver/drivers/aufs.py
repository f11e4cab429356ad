"""The aufs driver: a probe only. It says whether aufs could work here, and why not.

The seed's aufs backend stacked each layer's ``diff/<id>`` as union branches::

    <home>/                 (the seed's layout; graphdriver never creates it)
    |-- diff/<id>/          the layer's own files, aufs whiteouts ``.wh.*`` kept verbatim
    |-- mnt/<id>/           the union mount point
    `-- layers/<id>         the ancestor ids, parent first

aufs was never merged into Linux, and this project's kernels do not carry it, so graphdriver has
no aufs mount code (it could not be tested). :meth:`AufsDriver.check_support` reads
``/proc/filesystems`` (it loads no module: no ``modprobe``) and raises
:class:`~graphdriver.errors.NotSupported` naming what is missing; the constructor always raises,
so none of the other methods can be reached. Layer tars written on aufs hosts (``.wh..wh.plnk``
hard-link pools, ``.wh..wh.aufs`` metadata) are still applied correctly by every driver: that is
the archive code's job (:func:`graphdriver.archive.apply.apply_layer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from graphdriver.drivers.probeonly import ProbeOnlyDriver
from graphdriver.errors import IncompatibleFilesystem, NotSupported
from graphdriver.fs.statfs import filesystem_type

__all__ = ["AufsDriver", "kernel_filesystems"]

_INCOMPATIBLE = ("btrfs", "aufs")
"""the backing filesystems aufs refuses to stack on (the seed's ErrIncompatibleFS)"""


def kernel_filesystems(path: str = "/proc/filesystems") -> set[str]:
    """The filesystem types the running kernel has registered (no module is loaded to ask)."""
    with open(path, encoding="ascii") as f:
        return {line.split()[-1] for line in f if line.strip()}


class AufsDriver(ProbeOnlyDriver):
    """A probe for aufs; it never stores layers (see the module docstring)."""

    name: ClassVar[str] = "aufs"
    storage: ClassVar[str] = "aufs"
    available_message: ClassVar[str] = (
        "aufs is in this kernel, but graphdriver has no aufs storage (only a probe); "
        "use overlay2, which reads the same layers"
    )

    @classmethod
    def check_support(cls, home: Path) -> None:
        try:
            available = kernel_filesystems()
        except OSError as exc:
            raise NotSupported(f"cannot read /proc/filesystems: {exc.strerror}", cls.name) from exc
        if "aufs" not in available:
            raise NotSupported(
                "aufs is not in /proc/filesystems: this kernel has no aufs "
                "(graphdriver does not load kernel modules)",
                cls.name,
            )
        from graphdriver.drivers.overlayutils import nearest_existing

        anchor = nearest_existing(Path(home))
        backing = filesystem_type(anchor)
        if backing in _INCOMPATIBLE:
            raise IncompatibleFilesystem(f"aufs cannot stack on {backing} ({anchor})", cls.name)
