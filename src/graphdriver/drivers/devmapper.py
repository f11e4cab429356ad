"""The devicemapper driver: a probe only. It says whether device-mapper thin provisioning could
work here, and why not.

The seed's devicemapper backend kept every layer as a thin snapshot in one thin pool::

    <home>/                     (the seed's layout; graphdriver never creates it)
    |-- devicemapper/data       sparse pool data file on a loop device (100 GiB)
    |-- devicemapper/metadata   sparse pool metadata file on a loop device (2 GiB)
    |-- metadata/<id>           JSON per thin device: device_id, size, transaction_id
    `-- mnt/<id>/rootfs/        where a layer's filesystem is mounted by get

This project's kernels have no device-mapper, and containers/storage removed the driver in 1.54,
so graphdriver has no devicemapper storage code (it could not be tested).
:meth:`DevmapperDriver.check_support` looks for the kernel driver (``device-mapper`` in
``/proc/misc``), its control node ``/dev/mapper/control``, the ``dmsetup`` tool and the
``thin-pool`` target (``dmsetup targets``), in that order, and raises
:class:`~graphdriver.errors.NotSupported` naming the first thing missing. ``dmsetup`` is only run
when the control node and the kernel driver exist: run without them it creates
``/dev/mapper/control`` itself, and a probe must change nothing. The constructor always raises,
so none of the other methods can be reached.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import ClassVar

from graphdriver.drivers.probeonly import ProbeOnlyDriver
from graphdriver.errors import NotSupported

__all__ = ["DM_CONTROL", "DevmapperDriver", "dm_targets", "kernel_has_device_mapper"]

DM_CONTROL = "/dev/mapper/control"


def kernel_has_device_mapper(proc_misc: str = "/proc/misc") -> bool:
    """Whether the kernel has registered the device-mapper control device (``/proc/misc``)."""
    try:
        with open(proc_misc, encoding="ascii") as f:
            return any(line.split()[1:] == ["device-mapper"] for line in f)
    except OSError:
        return False


def dm_targets(dmsetup: str) -> list[str]:
    """The target types the kernel offers, from ``dmsetup targets`` (``thin-pool``, ``linear``...)."""
    proc = subprocess.run([dmsetup, "targets"], capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise NotSupported(
            f"dmsetup targets failed: {detail[0] if detail else f'exit {proc.returncode}'}", "devmapper"
        )
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


class DevmapperDriver(ProbeOnlyDriver):
    """A probe for device-mapper thin provisioning; it never stores layers."""

    name: ClassVar[str] = "devmapper"
    storage: ClassVar[str] = "devicemapper"
    available_message: ClassVar[str] = (
        "device-mapper thin-pool is available, but graphdriver has no devicemapper storage "
        "(only a probe; containers/storage removed it in 1.54); use overlay2 or btrfs"
    )

    @classmethod
    def check_support(cls, home: Path) -> None:
        if not kernel_has_device_mapper():
            missing = "" if os.path.exists(DM_CONTROL) else f" and {DM_CONTROL} does not exist"
            raise NotSupported(
                f"the kernel has no device-mapper: no device-mapper entry in /proc/misc{missing}",
                cls.name,
            )
        try:
            st = os.stat(DM_CONTROL)
        except FileNotFoundError:
            raise NotSupported(
                f"{DM_CONTROL} does not exist (the kernel has device-mapper; create the node with "
                "dmsetup mknodes)",
                cls.name,
            ) from None
        if not stat.S_ISCHR(st.st_mode):
            raise NotSupported(f"{DM_CONTROL} is not a character device", cls.name)
        dmsetup = shutil.which("dmsetup")
        if dmsetup is None:
            raise NotSupported("dmsetup is not installed (Debian package dmsetup)", cls.name)
        targets = dm_targets(dmsetup)
        if "thin-pool" not in targets:
            raise NotSupported(
                "the kernel has no thin-pool target (dm-thin-pool); dmsetup targets lists: "
                + (", ".join(targets) or "nothing"),
                cls.name,
            )
