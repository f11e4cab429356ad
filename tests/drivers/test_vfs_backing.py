"""The vfs conformance suite on real backing filesystems: ext4 (copies with copy_file_range) and
XFS formatted with reflink=1 (copies share data through FICLONE), each on a loop device.

The default suite run (tests/drivers/test_vfs.py) puts its roots on /dev/shm; these classes run the
same cases where users keep their stores, and check the copy mechanism the driver reports.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver.drivers.base import Driver
from graphdriver.drivers.vfs import VfsDriver, filesystem_type
from graphdriver.testing.loopfs import LoopFilesystem, loop_filesystem
from graphdriver.testing.suite import DriverConformance

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop-mounted filesystems need root")


@pytest.fixture(scope="module")
def ext4_fs() -> Iterator[LoopFilesystem]:
    with loop_filesystem("ext4", "1G") as fs:
        yield fs


@pytest.fixture(scope="module")
def xfs_reflink_fs() -> Iterator[LoopFilesystem]:
    with loop_filesystem("xfs", "1G", mkfs_options=["-m", "reflink=1"]) as fs:
        yield fs


class _OnLoopFilesystem(DriverConformance):
    driver_name = "vfs"
    fs: LoopFilesystem

    def make_driver(self, root: Path) -> Driver:
        home = Path(tempfile.mkdtemp(prefix="conformance-", dir=self.fs.path))
        return VfsDriver(home / self.driver_name, dict(self.driver_options))


class TestVfsOnExt4(_OnLoopFilesystem):
    """vfs on ext4: no reflinks, so create copies data (copy_file_range)."""

    @pytest.fixture(autouse=True)
    def _on_ext4(self, ext4_fs: LoopFilesystem) -> None:
        self.fs = ext4_fs

    def test_backing_filesystem_is_ext4_without_reflink(self) -> None:
        driver = self.make_driver(self.fs.path)
        assert filesystem_type(driver.home) == "ext4"
        assert driver.capabilities.copy_on_write is False
        assert ("Supports reflink", "false") in driver.status()


class TestVfsOnReflinkXfs(_OnLoopFilesystem):
    """vfs on XFS with reflink=1: create shares file data with the parent."""

    @pytest.fixture(autouse=True)
    def _on_xfs(self, xfs_reflink_fs: LoopFilesystem) -> None:
        self.fs = xfs_reflink_fs

    def test_backing_filesystem_is_xfs_with_reflink(self) -> None:
        driver = self.make_driver(self.fs.path)
        assert filesystem_type(driver.home) == "xfs"
        assert driver.capabilities.copy_on_write is True
        assert ("Supports reflink", "true") in driver.status()
