"""Real filesystems on loop devices, for tests that need btrfs, reflink XFS or plain ext4.

:func:`loop_filesystem` is a context manager: it makes a sparse image file, attaches it to a
free loop device (``losetup --find``), runs ``mkfs.<type>`` with the given options, mounts it,
and yields a :class:`LoopFilesystem`. On the way out, always, even when the body or a setup
step fails: unmount (lazily if something still holds it), detach the loop device, delete the
image. ::

    with loop_filesystem("xfs", "3G", mkfs_options=["-m", "reflink=1"]) as fs:
        ...  # fs.path is the mounted filesystem

It needs root, ``losetup``, ``mkfs.<type>`` and ``/dev/loop-control``; when one is missing it
calls ``pytest.skip`` with the reason (this module is part of the test support package).
Images go under ``/var/tmp`` by default (disk, not tmpfs: a sparse image on tmpfs would eat RAM
as it fills).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from graphdriver.errors import Busy, MountError
from graphdriver.fs.remove import remove_tree
from graphdriver.mount import is_mountpoint, mount, unmount

__all__ = ["LoopFilesystem", "loop_filesystem", "loop_unavailable_reason", "parse_size"]

_MKFS_QUIET = {
    "btrfs": ["-q"],
    "xfs": ["-q"],
    "ext2": ["-q", "-F"],
    "ext3": ["-q", "-F"],
    "ext4": ["-q", "-F"],
}
"""mkfs options that silence the tool (and let mke2fs write to a whole device without asking)"""

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or ``"512M"``, ``"3G"`` (binary units)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1] if text and text[-1] in _UNITS else ""
    return int(float(text[: len(text) - len(unit)]) * _UNITS[unit])


@dataclass(frozen=True)
class LoopFilesystem:
    """A mounted loop-device filesystem made by :func:`loop_filesystem`."""

    fstype: str
    path: Path
    """the mount point"""
    device: str
    """``/dev/loopN``"""
    image: Path
    """the sparse backing file"""
    size: int
    """the image size in bytes"""

    def used_bytes(self) -> int:
        """Bytes in use on the filesystem (``statvfs``: blocks minus free blocks)."""
        st = os.statvfs(self.path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def sync(self) -> None:
        """Flush the filesystem so that ``used_bytes`` counts delayed allocations."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), str(self.path))
        finally:
            os.close(fd)


def loop_unavailable_reason(fstype: str) -> str | None:
    """Why a ``fstype`` loop filesystem cannot be made here, or None if it can."""
    if os.geteuid() != 0:
        return "loop devices and mounts need root"
    if shutil.which(f"mkfs.{fstype}") is None:
        return f"mkfs.{fstype} is not installed"
    if shutil.which("losetup") is None:
        return "losetup is not installed (util-linux)"
    if not os.path.exists("/dev/loop-control"):
        return "/dev/loop-control is missing (no loop device support)"
    if not _kernel_has(fstype):
        return f"the kernel has no {fstype} filesystem (/proc/filesystems)"
    return None


def _kernel_has(fstype: str) -> bool:
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            names = {line.split()[-1] for line in f if line.strip()}
    except OSError:
        return True  # let mount say
    return fstype in names


def _skip(reason: str) -> None:
    import pytest

    pytest.skip(reason)


def _run(argv: Sequence[str]) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {' / '.join(detail[-3:])}")
    return proc.stdout


def _detach(device: str) -> None:
    """Detach ``device``; if it is still busy the kernel sets autoclear and frees it on last close."""
    subprocess.run(["losetup", "--detach", device], capture_output=True, check=False)


@contextlib.contextmanager
def loop_filesystem(
    fstype: str,
    size: int | str = "1G",
    *,
    mkfs_options: Sequence[str] = (),
    mount_options: str = "",
    directory: Path | str | None = None,
) -> Iterator[LoopFilesystem]:
    """Make, mount and yield a ``fstype`` filesystem of ``size`` on a loop device; tear it all
    down on exit. Skips the calling test (with the reason) when it cannot be made here."""
    reason = loop_unavailable_reason(fstype)
    if reason is not None:
        _skip(f"no {fstype} loop filesystem: {reason}")
    nbytes = parse_size(size)
    base = Path(directory) if directory is not None else Path("/var/tmp")
    work = Path(tempfile.mkdtemp(prefix=f"graphdriver-loop-{fstype}-", dir=base))
    image = work / "image"
    mountpoint = work / "mnt"
    device: str | None = None
    mounted = False
    try:
        mountpoint.mkdir()
        with open(image, "wb") as f:
            f.truncate(nbytes)
        try:
            device = _run(["losetup", "--find", "--show", str(image)]).strip()
        except RuntimeError as exc:
            _skip(f"no {fstype} loop filesystem: cannot attach a loop device ({exc})")
        assert device is not None
        _run([f"mkfs.{fstype}", *_MKFS_QUIET.get(fstype, []), *mkfs_options, device])
        try:
            mount(device, mountpoint, fstype, 0, mount_options)
        except MountError as exc:
            _skip(f"no {fstype} loop filesystem: {exc}")
        mounted = True
        yield LoopFilesystem(fstype=fstype, path=mountpoint, device=device, image=image, size=nbytes)
    finally:
        try:
            if mounted:
                try:
                    unmount(mountpoint)
                except MountError:
                    unmount(mountpoint, detach=True)
        finally:
            if device is not None:
                _detach(device)
            if not is_mountpoint(mountpoint):
                with contextlib.suppress(OSError, Busy):
                    remove_tree(work)
