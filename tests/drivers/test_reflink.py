"""vfs with reflinks: on XFS (reflink=1) and btrfs, creating a child shares the parent's file data.

A layer holding 1 GiB of real data (written blocks, not a hole or preallocated space) gets a child;
the filesystem's used space (statvfs) grows by less than 5% of that, and the child reads the same
bytes and diverges on write without touching the parent. On ext4 (no reflinks) vfs still makes a
full, exact copy (copy_file_range), so the used space grows by the data's size.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver.drivers.base import Driver
from graphdriver.drivers.registry import driver_class
from graphdriver.fs.copy import supports_reflink
from graphdriver.testing.loopfs import LoopFilesystem, loop_filesystem
from graphdriver.testing.trees import diff_snapshots, snapshot_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop-device filesystems need root")

MiB = 1 << 20
GiB = 1 << 30

FILESYSTEMS = {
    "xfs-reflink": ("xfs", "3G", ["-m", "reflink=1"]),
    "btrfs": ("btrfs", "3G", []),
    "ext4": ("ext4", "1G", []),
}


@pytest.fixture(params=sorted(FILESYSTEMS))
def fs(request: pytest.FixtureRequest) -> Iterator[LoopFilesystem]:
    fstype, size, mkfs_options = FILESYSTEMS[request.param]
    with loop_filesystem(fstype, size, mkfs_options=mkfs_options) as mounted:
        yield mounted


def vfs(fs: LoopFilesystem) -> Driver:
    return driver_class("vfs")(fs.path / "graphdriver" / "vfs")


def first_block(i: int) -> bytes:
    """MiB number ``i`` of :func:`write_real_data`'s data."""
    return i.to_bytes(8, "little") + b"\xa5" * (MiB - 8)


def write_real_data(path: Path, nbytes: int) -> str:
    """``nbytes`` of written, non-zero data (every MiB different, so nothing dedups); its sha256."""
    h = hashlib.sha256()
    block = bytearray(first_block(0))
    with open(path, "wb") as f:
        for i in range(nbytes // MiB):
            block[:8] = i.to_bytes(8, "little")
            f.write(block)
            h.update(block)
        os.fsync(f.fileno())
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("fs", ["xfs-reflink", "btrfs"], indirect=True)
def test_child_shares_file_data(fs: LoopFilesystem) -> None:
    assert supports_reflink(fs.path)
    driver = vfs(fs)
    driver.create("image")
    with driver.mounted("image") as root:
        (root / "disk").mkdir()
        digest = write_real_data(root / "disk" / "image.raw", GiB)
        assert allocated(root / "disk" / "image.raw") >= GiB  # real blocks, not a hole
    fs.sync()
    before = fs.used_bytes()
    driver.create("child", "image")
    fs.sync()
    grown = fs.used_bytes() - before
    assert grown < GiB * 5 // 100, f"the child of a 1 GiB layer used {grown} more bytes"
    with driver.mounted("image") as parent, driver.mounted("child") as child:
        assert diff_snapshots(snapshot_tree(parent, content=False), snapshot_tree(child, content=False)) == []
        assert sha256_file(child / "disk" / "image.raw") == digest
        with open(child / "disk" / "image.raw", "r+b") as f:
            f.write(b"written in the child")
        with open(parent / "disk" / "image.raw", "rb") as f:
            assert f.read(MiB) == first_block(0)


@pytest.mark.parametrize("fs", ["ext4"], indirect=True)
def test_without_reflinks_vfs_copies_exactly(fs: LoopFilesystem) -> None:
    assert not supports_reflink(fs.path)
    driver = vfs(fs)
    driver.create("image")
    size = 64 * MiB
    with driver.mounted("image") as root:
        digest = write_real_data(root / "data.bin", size)
        os.symlink("data.bin", root / "link")
        os.link(root / "data.bin", root / "hardlink")
    fs.sync()
    before = fs.used_bytes()
    driver.create("child", "image")
    fs.sync()
    grown = fs.used_bytes() - before
    assert size <= grown < size + 4 * MiB, grown
    with driver.mounted("image") as parent, driver.mounted("child") as child:
        assert diff_snapshots(snapshot_tree(parent), snapshot_tree(child)) == []
        assert sha256_file(child / "data.bin") == digest
        assert os.stat(child / "data.bin").st_ino == os.stat(child / "hardlink").st_ino
        assert os.stat(child / "data.bin").st_ino != os.stat(parent / "data.bin").st_ino
