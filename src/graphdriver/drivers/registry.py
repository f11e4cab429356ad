"""Which drivers exist, which one to use, and why the others cannot be used here.

Selection follows the seed and today's moby:

1. An explicit name (``name=`` argument, ``--driver``, or ``GRAPHDRIVER_DRIVER``) is final: its
   init error, ``NotSupported`` included, is the answer. There is no fallback.
2. Otherwise the driver whose state already exists under the root (``<root>/<name>`` not empty)
   is used, so a store keeps its driver across runs. More than one is an error.
3. Otherwise the :data:`PRIORITY` list, skipping drivers that raise ``NotSupported`` at init.

Drivers are registered by dotted path and imported only when used, so the CLI starts fast.
Out-of-tree drivers call :func:`register` (or declare a ``graphdriver.drivers`` entry point).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from graphdriver.drivers.base import Driver
from graphdriver.errors import InvalidArgument, NotSupported

_REGISTRY: dict[str, str] = {
    "overlay2": "graphdriver.drivers.overlay2:Overlay2Driver",
    "fuse-overlayfs": "graphdriver.drivers.fuse_overlayfs:FuseOverlayfsDriver",
    "btrfs": "graphdriver.drivers.btrfs:BtrfsDriver",
    "vfs": "graphdriver.drivers.vfs:VfsDriver",
    "overlay": "graphdriver.drivers.overlay:OverlayDriver",
    "aufs": "graphdriver.drivers.aufs:AufsDriver",
    "devmapper": "graphdriver.drivers.devmapper:DevmapperDriver",
}

PRIORITY: tuple[str, ...] = ("overlay2", "fuse-overlayfs", "btrfs", "vfs")
"""Auto-selection order. ``overlay`` (the seed's 2014 design) is never auto-selected, as in the
seed; ``aufs`` and ``devmapper`` are probes only."""

ENV_DRIVER = "GRAPHDRIVER_DRIVER"
ENV_ROOT = "GRAPHDRIVER_ROOT"

_entry_points_loaded = False


def register(name: str, target: str) -> None:
    """Register an out-of-tree driver as ``"package.module:ClassName"``."""
    if name in _REGISTRY:
        raise InvalidArgument(f"driver name already registered: {name}")
    _REGISTRY[name] = target


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points  # ~35 ms: only when a name is not built in

    for ep in entry_points(group="graphdriver.drivers"):
        _REGISTRY.setdefault(ep.name, ep.value)


def known_drivers() -> list[str]:
    """Every driver name, in priority order first, then the rest."""
    _load_entry_points()
    rest = [n for n in _REGISTRY if n not in PRIORITY]
    return [*PRIORITY, *rest]


def driver_class(name: str) -> type[Driver]:
    """Import and return the class registered as ``name``."""
    if name not in _REGISTRY:
        _load_entry_points()  # only for names we do not know: it costs ~30 ms of start-up
    target = _REGISTRY.get(name)
    if target is None:
        raise InvalidArgument(f"unknown driver {name!r}; known: {', '.join(known_drivers())}")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise NotSupported(f"driver module not available ({exc})", name) from exc
    cls: type[Driver] = getattr(module, class_name)
    return cls


def default_root() -> Path:
    """``$GRAPHDRIVER_ROOT``, else /var/lib/graphdriver for root, else the XDG data dir."""
    env = os.environ.get(ENV_ROOT)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/graphdriver")
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "graphdriver"


def _prior_drivers(root: Path) -> list[str]:
    """Drivers whose home under ``root`` holds state (registered names only: an out-of-tree
    driver's state is recognised once its entry point has been loaded, e.g. by ``drivers``)."""
    found = []
    for name in [*PRIORITY, *(n for n in _REGISTRY if n not in PRIORITY)]:
        home = root / name
        try:
            if home.is_dir() and any(home.iterdir()):
                found.append(name)
        except OSError:
            continue
    return found


def selected_driver(
    root: Path | str, name: str | None = None, supported: Mapping[str, bool] | None = None
) -> tuple[str | None, str]:
    """Which driver :func:`open_driver` would pick for ``root``, and why, without opening any.

    ``supported`` maps driver names to whether they work here (from :func:`probe_drivers`); when
    omitted, the first driver of the priority list is named without checking it.
    """
    root = Path(root)
    if name:
        return name, "chosen with --driver"
    env = os.environ.get(ENV_DRIVER)
    if env:
        return env, f"chosen with ${ENV_DRIVER}"
    prior = _prior_drivers(root)
    if len(prior) == 1:
        return prior[0], f"its state already exists under {root}"
    if len(prior) > 1:
        return None, f"state of several drivers under {root} ({', '.join(prior)}): choose with --driver"
    for candidate in PRIORITY:
        if supported is None or supported.get(candidate):
            return candidate, "the first in priority order that works here"
    return None, "no driver works here"


def open_driver(
    root: Path | str, name: str | None = None, options: Mapping[str, str] | None = None
) -> Driver:
    """Open the driver for ``root`` by the selection rules in the module docstring."""
    root = Path(root)
    explicit = name or os.environ.get(ENV_DRIVER) or None
    if explicit:
        return driver_class(explicit)(root / explicit, options)
    prior = _prior_drivers(root)
    if len(prior) > 1:
        raise InvalidArgument(
            f"{root} holds state of several drivers ({', '.join(prior)}); choose one with --driver"
        )
    if prior:
        return driver_class(prior[0])(root / prior[0], options)
    reasons = []
    for candidate in PRIORITY:
        try:
            return driver_class(candidate)(root / candidate, options)
        except NotSupported as exc:
            reasons.append(f"{candidate}: {exc.reason}")
    raise NotSupported("no supported storage driver found (" + "; ".join(reasons) + ")")


@dataclass(frozen=True)
class DriverSupport:
    """Whether one driver works on this machine, and if not, why."""

    name: str
    supported: bool
    reason: str
    priority: int | None


def probe_drivers(root: Path | str) -> list[DriverSupport]:
    """Check every known driver against ``root`` without creating anything."""
    root = Path(root)
    out = []
    for name in known_drivers():
        prio = PRIORITY.index(name) + 1 if name in PRIORITY else None
        try:
            driver_class(name).check_support(root / name)
        except NotSupported as exc:
            out.append(DriverSupport(name, False, exc.reason, prio))
        else:
            out.append(DriverSupport(name, True, "ok", prio))
    return out
