"""Storage drivers: the contract (:mod:`.base`), the registry and selection (:mod:`.registry`),
and one module per backend (vfs, overlay, overlay2, btrfs, fuse-overlayfs; aufs and devmapper as
probes that explain why they cannot run here)."""

from graphdriver.drivers.base import Capabilities, Driver
from graphdriver.drivers.registry import (
    PRIORITY,
    DriverSupport,
    default_root,
    driver_class,
    known_drivers,
    open_driver,
    probe_drivers,
    register,
    selected_driver,
)

__all__ = [
    "PRIORITY",
    "Capabilities",
    "Driver",
    "DriverSupport",
    "default_root",
    "driver_class",
    "known_drivers",
    "open_driver",
    "probe_drivers",
    "register",
    "selected_driver",
]
