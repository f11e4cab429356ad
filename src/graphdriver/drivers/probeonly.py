"""The base of the drivers that are probes only (aufs, devmapper): no storage, just a verdict.

Such a driver answers ``graphdriver drivers`` (its :meth:`~graphdriver.drivers.base.Driver.check_support`
says what is missing here) but has no storage code. A subclass sets ``name``, ``storage`` (what
graphdriver lacks, as messages name it: ``"devicemapper"``) and ``available_message`` (what the
constructor says when the probe passes), and implements ``check_support``. The constructor runs
the probe and then always raises :class:`~graphdriver.errors.NotSupported`, so none of the layer
methods can be reached; they raise too, to make the class concrete. Nothing is ever created.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, NoReturn

from graphdriver.drivers.base import Driver
from graphdriver.errors import NotSupported

__all__ = ["ProbeOnlyDriver"]


class ProbeOnlyDriver(Driver):
    """A driver that only probes; see the module docstring."""

    storage: ClassVar[str]
    """the storage graphdriver does not have, as messages name it"""
    available_message: ClassVar[str]
    """the constructor's NotSupported reason when ``check_support`` passes"""

    def __init__(self, home: Path | str, options: Mapping[str, str] | None = None) -> None:
        super().__init__(home, options)
        self.check_support(self.home)
        raise NotSupported(self.available_message, self.name)

    def _unreachable(self) -> NoReturn:
        raise NotSupported(f"graphdriver has no {self.storage} storage", self.name)

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
