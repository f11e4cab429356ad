"""Named fault points: how the crash tests stop the store at an exact step, without editing code.

The store calls :func:`fault` with a point name before and after each step of an import, a
create, a remove, a mount and a recovery. Normally nothing is configured and the call is one
dictionary test. A test configures points through the environment of the process it starts::

    GRAPHDRIVER_FAULT=import.after-create:kill           SIGKILL this process at that point
    GRAPHDRIVER_FAULT=import.apply-mid:stop              SIGSTOP it (the parent inspects, then kills)
    GRAPHDRIVER_FAULT=remove.after-mark:raise            raise InjectedFaultError (an unexpected error)
    GRAPHDRIVER_FAULT=import.apply-mid:kill@3            on the third time the point is reached
    GRAPHDRIVER_FAULT=a:raise,b:kill                     several points

or, inside one process, with :func:`injected`. Unknown point names are an error, so a test can
never silently aim at a point that does not exist. :data:`POINTS` lists every point with the step
it follows or precedes.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from graphdriver.errors import InvalidArgument

ENV_FAULT = "GRAPHDRIVER_FAULT"

POINTS: dict[str, str] = {
    # import_layer, in order
    "import.before-record": "before the incomplete record is written",
    "import.after-record": "after the incomplete record, before driver.create",
    "import.after-create": "after driver.create, before any byte is applied",
    "import.apply-start": "at the first read of the blob by the applier",
    "import.apply-mid": "at each later read of the blob by the applier (use @N for the Nth)",
    "import.after-apply": "after driver.apply_diff returned, before the streams are drained",
    "import.after-drain": "after both streams were drained (checksums and trailers read)",
    "import.after-verify": "after the digests and size were verified, before syncing",
    "import.after-sync": "after the layer's data was synced, before the commit transaction",
    "import.in-commit": "inside the commit transaction, before COMMIT",
    "import.after-commit": "after the layer was committed complete",
    "import.after-discard": "after a duplicate of an existing chain ID was dropped",
    # create_layer
    "create.after-record": "after the incomplete record of a new layer, before driver.create",
    "create.after-create": "after driver.create, before syncing and committing",
    "create.after-commit": "after a created layer was committed complete",
    # remove
    "remove.after-mark": "after the layer was marked removing, before driver.remove",
    "remove.after-driver-remove": "after driver.remove, before the record is deleted",
    "remove.after-delete": "after the record was deleted",
    # mount / unmount
    "mount.after-get": "after driver.get, before the mount count is recorded",
    "mount.after-record": "after the mount count was recorded",
    "unmount.after-put": "after driver.put, before the count is recorded",
    # recovery when a store is opened
    "recovery.after-mark": "after recovery marked crashed layers removing, before removing them",
    "recovery.after-remove-one": "after recovery removed one crashed layer's data",
}

_ACTIONS = ("kill", "stop", "raise")


class InjectedFaultError(RuntimeError):
    """Raised at a point configured with ``:raise``; deliberately not a GraphDriverError, so it
    travels like an unexpected failure (a bug, an I/O error) would."""


@dataclass
class _Fault:
    action: str
    at: int
    hits: int = 0


def parse(spec: str) -> dict[str, _Fault]:
    """Parse ``point:action[@n],...``; raises InvalidArgument for unknown points or actions."""
    out: dict[str, _Fault] = {}
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        point, sep, rest = item.partition(":")
        action, _, nth = (rest if sep else "kill").partition("@")
        if point not in POINTS:
            raise InvalidArgument(f"{ENV_FAULT}: unknown fault point {point!r}")
        if action not in _ACTIONS:
            raise InvalidArgument(f"{ENV_FAULT}: unknown action {action!r} (use {', '.join(_ACTIONS)})")
        try:
            at = int(nth) if nth else 1
        except ValueError:
            raise InvalidArgument(f"{ENV_FAULT}: bad count in {item!r}") from None
        if at < 1:
            raise InvalidArgument(f"{ENV_FAULT}: bad count in {item!r}")
        out[point] = _Fault(action, at)
    return out


_active: dict[str, _Fault] = parse(os.environ[ENV_FAULT]) if os.environ.get(ENV_FAULT) else {}


def fault(point: str) -> None:
    """Reach fault point ``point``: nothing unless a fault is configured for it."""
    if _active:
        _fire(point)


def _fire(point: str) -> None:
    if point not in POINTS:
        raise InvalidArgument(f"unknown fault point {point!r}")
    f = _active.get(point)
    if f is None:
        return
    f.hits += 1
    if f.hits != f.at:
        return
    if f.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif f.action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        raise InjectedFaultError(f"injected fault at {point}")


@contextmanager
def injected(spec: str) -> Iterator[None]:
    """Configure faults in this process for the duration of the block (tests only)."""
    global _active
    saved = _active
    _active = parse(spec)
    try:
        yield
    finally:
        _active = saved
