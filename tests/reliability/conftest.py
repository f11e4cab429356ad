"""Fixtures of the reliability suite: a layer store next to a sentinel tree, and the store oracle.

``driver_name`` runs a test once per driver in :data:`DRIVERS` that works here (the others skip
with the driver's own reason). ``arena`` is a directory holding a planted
:class:`~graphdriver.testing.sentinel.Sentinel` (``victim/``, ``victim-evil/``) and the store root
``store/`` beside it. The ``rk`` fixture carries the helpers (test modules cannot import this file
under ``--import-mode=importlib``):

- ``rk.blob(tar, compression)``: a layer blob with its digest, size and diff ID;
- ``rk.capture(store)`` / ``rk.assert_unchanged(store, before)`` /
  ``rk.assert_only_layer_added(store, before, layer_id)``: the *store oracle*
  (:mod:`graphdriver.testing.storestate`). A capture holds every metadata record, every path under
  the store root with its type, mode, owner, size, mtime and content, and the mounts below the
  root. "Unchanged" means equal, plus ``check()`` clean, ``staging/`` empty and no lock file but
  the store's and those of layers that exist.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from graphdriver.testing.blobs import Blob, blob, sha256
from graphdriver.testing.sentinel import Sentinel
from graphdriver.testing.storestate import (
    assert_only_layer_added,
    assert_unchanged,
    capture,
    driver_unsupported,
    release_mounts,
    require_driver,
    store_files,
)

DRIVERS = ("vfs", "overlay2")


@pytest.fixture(params=DRIVERS)
def driver_name(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    return require_driver(request.param, tmp_path_factory.getbasetemp())


@pytest.fixture
def mounting_driver(tmp_path_factory: pytest.TempPathFactory) -> str:
    """overlay2 (a driver whose get() mounts), or skip."""
    return require_driver("overlay2", tmp_path_factory.getbasetemp(), need="a mounting driver")


@dataclass
class Arena:
    """``base/`` with the sentinel and the store root ``base/store``."""

    base: Path
    root: Path
    sentinel: Sentinel


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[Arena]:
    base = tmp_path / "base"
    base.mkdir()
    sentinel = Sentinel(base, exclude=("store",))
    yield Arena(base, base / "store", sentinel)
    release_mounts(tmp_path)


# -- blobs ---------------------------------------------------------------------------------------


class Kit:
    """The helpers above, for test modules."""

    Blob = Blob
    blob = staticmethod(blob)
    sha256 = staticmethod(sha256)
    capture = staticmethod(capture)
    assert_unchanged = staticmethod(assert_unchanged)
    assert_only_layer_added = staticmethod(assert_only_layer_added)
    store_files = staticmethod(store_files)
    release_mounts = staticmethod(release_mounts)
    driver_unsupported = staticmethod(driver_unsupported)


@pytest.fixture
def rk() -> Kit:
    return Kit()
