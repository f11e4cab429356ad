"""Fixtures of the layer-store tests: a store on every driver that works here, and layer blobs.

``driver_name`` runs a test once per driver in :data:`DRIVERS` that imports and initialises on
this machine, and skips the others with the driver's own reason. Layer blobs are real: trees
packed with GNU tar (``--format=pax``) or the library's exporter, compressed with gzip or zstd.
Test modules cannot import this file (``--import-mode=importlib``), so the helpers reach them
through the ``kit`` fixture.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from graphdriver.layers.store import LayerStore
from graphdriver.testing.storestate import driver_unsupported, release_mounts, require_driver
from graphdriver.testing.tarbuild import compress

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


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """A layer as a registry would hand it out: the blob and its descriptor, plus the diff ID."""

    data: bytes
    tar: bytes
    compression: str

    @property
    def digest(self) -> str:
        return sha256(self.data)

    @property
    def diff_id(self) -> str:
        return sha256(self.tar)

    @property
    def size(self) -> int:
        return len(self.data)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.data)
        return path


def blob(tar: bytes, compression: str = "none") -> Blob:
    return Blob(compress(tar, compression), tar, compression)  # type: ignore[arg-type]


def gnu_tar(src: Path) -> bytes:
    """``src``'s content as GNU tar writes it (pax format, numeric owners, xattrs, sorted)."""
    return subprocess.run(
        [
            "tar",
            "--format=pax",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--sort=name",
            "-C",
            str(src),
            "-cf",
            "-",
            ".",
        ],
        check=True,
        capture_output=True,
    ).stdout


def library_tar(src: Path) -> bytes:
    """``src``'s content as the library exports a whole tree (deterministic)."""
    import io

    from graphdriver.archive.export import tar_tree

    out = io.BytesIO()
    tar_tree(src, out)
    return out.getvalue()


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
