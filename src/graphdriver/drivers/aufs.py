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

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, NoReturn

from graphdriver.drivers.base import Driver
from graphdriver.errors import IncompatibleFilesystem, NotSupported

__all__ = ["AufsDriver", "kernel_filesystems"]

# statfs magics of the backing filesystems aufs refuses to stack on (the seed's ErrIncompatibleFS)
_INCOMPATIBLE = {0x9123683E: "btrfs", 0x61756673: "aufs"}


def kernel_filesystems(path: str = "/proc/filesystems") -> set[str]:
    """The filesystem types the running kernel has registered (no module is loaded to ask)."""
    with open(path, encoding="ascii") as f:
        return {line.split()[-1] for line in f if line.strip()}


class AufsDriver(Driver):
    """A probe for aufs; it never stores layers (see the module docstring)."""

    name: ClassVar[str] = "aufs"

    def __init__(self, home: Path | str, options: Mapping[str, str] | None = None) -> None:
        super().__init__(home, options)
        self.check_support(self.home)
        raise NotSupported(
            "aufs is in this kernel, but graphdriver has no aufs storage (only a probe); "
            "use overlay2, which reads the same layers",
            self.name,
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
        from graphdriver.drivers.overlayutils import fs_magic, nearest_existing

        anchor = nearest_existing(Path(home))
        backing = _INCOMPATIBLE.get(fs_magic(anchor))
        if backing is not None:
            raise IncompatibleFilesystem(f"aufs cannot stack on {backing} ({anchor})", cls.name)

    # The constructor always raises; these exist only to make the class concrete.

    def _unreachable(self) -> NoReturn:
        raise NotSupported("graphdriver has no aufs storage", self.name)

    def create(self, id: str, parent: str | None = None) -> None:
        self._unreachable()

    def remove(self, id: str) -> None:
        self._unreachable()

    def get(self, id: str, mount_label: str = "") -> Path:
        self._unreachable()

    def put(self, id: str) -> None:
        self._unreachable()

    def exists(self, id: str) -> bool:
        self._unreachable()
