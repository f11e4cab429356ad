"""Fixtures of the layer-store tests: a store on every driver that works here, and layer blobs.

``driver_name`` runs a test once per driver in :data:`DRIVERS` that imports and initialises on
this machine, and skips the others with the driver's own reason. Layer blobs are real: trees
packed with GNU tar (``--format=pax``) or the library's exporter, compressed with gzip or zstd.
Test modules cannot import this file (``--import-mode=importlib``), so the helpers reach them
through the ``kit`` fixture.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver.layers.store import LayerStore
from graphdriver.testing.blobs import Blob, blob, gnu_tar, library_tar, sha256
from graphdriver.testing.storestate import driver_unsupported, release_mounts, require_driver

DRIVERS = ("vfs", "overlay2")
WORKER = Path(__file__).with_name("layer_worker.py")

@pytest.fixture(params=DRIVERS)
def driver_name(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    return require_driver(request.param, tmp_path_factory.getbasetemp())


@pytest.fixture
def mounting_driver(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A driver whose get() mounts (overlay2), or skip."""
    return require_driver("overlay2", tmp_path_factory.getbasetemp(), need="a mounting driver")


@pytest.fixture
def store_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "store"
    yield root
    release_mounts(tmp_path)


@pytest.fixture
def store(store_root: Path, driver_name: str) -> Iterator[LayerStore]:
    s = LayerStore.open(store_root, driver_name)
    try:
        yield s
    finally:
        s.close()


# -- layer blobs ---------------------------------------------------------------------------------


def run_worker(
    *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``layer_worker.py`` with ``args`` in a fresh interpreter."""
    full_env = dict(os.environ)
    full_env.pop("GRAPHDRIVER_FAULT", None)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, str(WORKER), *args],
        check=False,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"worker {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


class Kit:
    """The helpers above, for test modules (``kit.blob(...)``, ``kit.gnu_tar(...)``...)."""

    Blob = Blob
    blob = staticmethod(blob)
    gnu_tar = staticmethod(gnu_tar)
    library_tar = staticmethod(library_tar)
    sha256 = staticmethod(sha256)
    run_worker = staticmethod(run_worker)
    release_mounts = staticmethod(release_mounts)
    driver_unsupported = staticmethod(driver_unsupported)
    worker = WORKER


@pytest.fixture
def kit() -> Kit:
    return Kit()
