"""Probes shared by the overlay-family drivers: backing filesystem, d_type, and whether the
kernel's overlay lets a layer's upper dir be read as its diff.

- :func:`backing_fs` names the filesystem under a path (``statfs`` magic, as moby's
  ``graphdriver.FsNames``), looking at the nearest existing ancestor.
- :func:`dtype_supported` reads directory entries with ``getdents64`` and tells whether the
  filesystem fills in ``d_type``. Without it overlayfs mishandles whiteouts and directory
  merging, so the overlay drivers refuse such a backing filesystem.
  :func:`dtype_supported_existing` answers without creating anything, from entries that already
  exist (``None`` when there are none to look at); :func:`probe_dtype` creates a probe file.
- :func:`probe_overlay` does a real test mount with two lowers in a scratch dir and checks
  what native diff relies on (moby's ``doesSupportNativeDiff``): an opaque directory's flag is
  not copied up wrongly, and a renamed directory does not leave a ``redirect`` xattr; it also
  reports ``redirect_dir`` and ``metacopy`` from the module parameters and the probe's mount
  options.
- :func:`cached_probe` runs :func:`probe_dtype` and :func:`probe_overlay` once and keeps the
  verdict in a file in the driver's home (overlay2: ``.mounts/.probe-cache.json``), so that
  every process opening the driver (each CLI command) does not pay for a test mount. The verdict
  is reused only while everything it depends on is unchanged: the running kernel (release, build
  and boot id), the backing filesystem (its type and device), the mount options, and every
  overlay module parameter; anything else, or an unreadable file, means probing again.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from graphdriver.fs.remove import remove_tree
from graphdriver.fs.statfs import FS_MAGIC, fs_magic
from graphdriver.mount import MountInfo, mount_overlay, mounts, unmount

__all__ = [
    "DTYPE_PROBE_PREFIX",
    "PROBE_CACHE",
    "PROBE_PREFIX",
    "OverlayProbe",
    "backing_fs",
    "cached_probe",
    "dtype_supported",
    "dtype_supported_existing",
    "fs_magic",
    "nearest_existing",
    "overlay_in_kernel",
    "overlay_module_param",
    "probe_dtype",
    "probe_overlay",
    "user_namespace",
]

_SYS_GETDENTS64 = 217 if os.uname().machine == "x86_64" else 61
DT_UNKNOWN = 0

_MOBY_SPELLING = {"ext4": "extfs", "overlay": "overlayfs"}
"""Where moby's ``graphdriver.FsNames`` names a filesystem otherwise than the kernel
(:data:`graphdriver.fs.statfs.FS_MAGIC`): the overlay drivers report moby's names."""
UNSUPPORTED_BACKING = {"overlayfs", "aufs", "ecryptfs", "nfs", "cifs", "squashfs", "erofs"}
"""Filesystems an overlay upper dir cannot live on (or that would stack overlay on overlay)."""

OVERLAY_PARAMS = Path("/sys/module/overlay/parameters")
PROBE_PREFIX = ".overlay-probe-"
"""Scratch dirs of :func:`probe_overlay` are named ``<PROBE_PREFIX><pid>-<random>``."""
DTYPE_PROBE_PREFIX = ".dtype-probe-"
"""Scratch dirs of :func:`probe_dtype` are named ``<DTYPE_PROBE_PREFIX><pid>-<random>``."""
PROBE_CACHE = ".probe-cache.json"
"""The name of the file where :func:`cached_probe` keeps its verdict (a dot name, so listings of
layers and mount counts skip it)."""


@dataclass(frozen=True)
class OverlayProbe:
    """What a test mount found out. ``native_diff_reason`` says why native diff is off."""

    native_diff: bool
    native_diff_reason: str
    redirect_dir: str
    metacopy: bool


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def backing_fs(path: Path) -> str:
    """The name of the filesystem that holds ``path`` (or its nearest existing ancestor), as
    moby spells it (``extfs``, ``overlayfs``), or ``unknown (0x<magic>)``."""
    magic = fs_magic(nearest_existing(path))
    name = FS_MAGIC.get(magic)
    return f"unknown (0x{magic:x})" if name is None else _MOBY_SPELLING.get(name, name)


def _dirent_types(directory: Path) -> dict[str, int]:
    """``{name: d_type}`` of a directory's entries (without ``.`` and ``..``), via getdents64."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    out: dict[str, int] = {}
    try:
        buf = ctypes.create_string_buffer(32768)
        while True:
            n = int(libc.syscall(ctypes.c_long(_SYS_GETDENTS64), fd, buf, ctypes.c_long(len(buf))))
            if n < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), str(directory))
            if n == 0:
                return out
            raw = buf.raw[:n]
            pos = 0
            while pos < n:
                _ino, _off, reclen, dtype = struct.unpack_from("=QqHB", raw, pos)
                name = raw[pos + 19 : pos + reclen].split(b"\0", 1)[0]
                if name not in (b".", b".."):
                    out[os.fsdecode(name)] = dtype
                pos += reclen
    finally:
        os.close(fd)


def dtype_supported(directory: Path) -> bool | None:
    """Whether entries of ``directory`` carry a d_type; None if it has no entries to judge by."""
    types = _dirent_types(directory)
    if not types:
        return None
    return all(t != DT_UNKNOWN for t in types.values())


def dtype_supported_existing(path: Path) -> bool | None:
    """d_type support judged without writing: from the entries of ``path``'s nearest existing
    ancestor, or of its parent on the same filesystem (which lists the ancestor itself)."""
    base = nearest_existing(path)
    if not base.is_dir():
        return None
    verdict = dtype_supported(base)
    if verdict is not None:
        return verdict
    parent = base.parent
    if parent != base and os.stat(parent).st_dev == os.stat(base).st_dev:
        return dtype_supported(parent)
    return None


def probe_dtype(directory: Path) -> bool:
    """Create a scratch file under ``directory`` and tell whether readdir reports its d_type."""
    scratch = Path(tempfile.mkdtemp(prefix=f"{DTYPE_PROBE_PREFIX}{os.getpid()}-", dir=directory))
    try:
        (scratch / "f").touch()
        return dtype_supported(scratch) is True
    finally:
        (scratch / "f").unlink(missing_ok=True)
        scratch.rmdir()


def user_namespace() -> str | None:
    """None in the initial user namespace, else a short description of this one's uid map."""
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            lines = [" ".join(line.split()) for line in f if line.strip()]
    except OSError:
        return None
    if lines == ["0 0 4294967295"]:
        return None
    return "uid map " + "; ".join(lines[:3])


def overlay_in_kernel() -> bool:
    """Whether ``overlay`` is listed in /proc/filesystems (built in or module loaded)."""
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            return any(line.split()[-1:] == ["overlay"] for line in f)
    except OSError:
        return False


def overlay_module_param(name: str) -> str | None:
    """A parameter of the overlay module (``Y``/``N``/value), or None if it does not exist."""
    try:
        return (OVERLAY_PARAMS / name).read_text().strip()
    except OSError:
        return None


def _mount_of(path: Path) -> MountInfo | None:
    target = os.path.realpath(path)
    found = [m for m in mounts() if m.mount_point == target]
    return found[-1] if found else None


def _effective(info: MountInfo | None, option: str, param: str) -> str:
    """A mount option's value: shown in mountinfo when it differs from the module default."""
    if info is not None:
        value = info.option(option)
        if value is not None:
            return value
    return overlay_module_param(param) or ""


def probe_overlay(scratch_parent: Path, options: Sequence[str] = ()) -> OverlayProbe:
    """Test-mount overlay (two lowers, an upper) under ``scratch_parent`` with ``options``.

    Raises :class:`~graphdriver.errors.MountError` if the kernel refuses the mount. Everything
    created is removed again (the mount is detached first).
    """
    scratch = Path(tempfile.mkdtemp(prefix=f"{PROBE_PREFIX}{os.getpid()}-", dir=scratch_parent))
    merged = scratch / "merged"
    try:
        for d in ("l1/d", "l1/d1", "l2/d", "l3", "work", "merged"):
            (scratch / d).mkdir(parents=True)
        os.setxattr(scratch / "l2/d", "trusted.overlay.opaque", b"y")
        mount_overlay(
            merged,
            lowers=[scratch / "l2", scratch / "l1"],
            upper=scratch / "l3",
            work=scratch / "work",
            options=options,
        )
        try:
            info = _mount_of(merged)
            redirect = _effective(info, "redirect_dir", "redirect_dir")
            redirect = {"Y": "on", "N": "off"}.get(redirect, redirect)
            metacopy = _effective(info, "metacopy", "metacopy") in ("on", "Y")
            (merged / "d" / "f").touch()
            try:
                opaque = os.getxattr(scratch / "l3/d", "trusted.overlay.opaque")
            except OSError:
                opaque = b""
            if opaque == b"y":
                return OverlayProbe(
                    False,
                    "the kernel copies up the opaque flag (overlay bug fixed in 4.8)",
                    redirect,
                    metacopy,
                )
            try:
                os.rename(merged / "d1", merged / "d2")
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                renamed = False
            else:
                renamed = True
            reasons = []
            if renamed:
                try:
                    os.getxattr(scratch / "l3/d2", "trusted.overlay.redirect")
                    has_redirect = True
                except OSError:
                    has_redirect = False
                if has_redirect or redirect == "on":
                    reasons.append(
                        "the kernel uses redirect_dir: a renamed directory is a redirect xattr, "
                        "which a tar of diff/ cannot express"
                    )
            if metacopy:
                reasons.append("the kernel uses metacopy: a copied-up file's data may stay in a lower layer")
            if reasons:
                return OverlayProbe(False, "; ".join(reasons), redirect, metacopy)
            return OverlayProbe(True, "diff/ read directly", redirect, metacopy)
        finally:
            unmount(merged, detach=True)
    finally:
        remove_tree(scratch)


def _probe_key(home: Path, options: Sequence[str]) -> dict[str, Any]:
    """Everything a probe's verdict depends on (see :func:`cached_probe`)."""
    uname = os.uname()
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    params: dict[str, str] = {}
    try:
        for entry in sorted(os.scandir(OVERLAY_PARAMS), key=lambda e: e.name):
            try:
                with open(entry.path, encoding="utf-8") as f:
                    params[entry.name] = f.read().strip()
            except OSError:
                params[entry.name] = "?"
    except OSError:
        pass
    st = os.stat(home)
    return {
        "kernel": f"{uname.release} {uname.version}",
        "boot_id": boot,
        "fs": backing_fs(home),
        "fs_magic": fs_magic(home),
        "dev": st.st_dev,
        "options": list(options),
        "params": params,
    }


def cached_probe(
    home: Path, cache_dir: Path, options: Sequence[str] = ()
) -> tuple[bool, OverlayProbe | None]:
    """``(d_type works, probe)`` for the driver home ``home``: from ``cache_dir/``:data:`PROBE_CACHE`
    when its key matches this machine's state, else by running :func:`probe_dtype` and (when
    d_type works) :func:`probe_overlay` in ``home``, whose exceptions propagate. Only a
    successful probe is kept (``cache_dir`` is created then)."""
    key = _probe_key(home, options)
    cache = cache_dir / PROBE_CACHE
    try:
        with open(cache, encoding="utf-8") as f:
            saved = json.load(f)
        if isinstance(saved, dict) and saved.get("key") == key:
            return True, OverlayProbe(**saved["probe"])
    except (OSError, ValueError, TypeError, KeyError):
        pass
    if not probe_dtype(home):
        return False, None
    probe = probe_overlay(home, options)
    tmp = cache_dir / f"{PROBE_CACHE}.{os.getpid()}.tmp"
    try:
        cache_dir.mkdir(mode=0o700, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"key": key, "probe": asdict(probe)}, f)
        os.replace(tmp, cache)
    except OSError:
        tmp.unlink(missing_ok=True)  # a cache we cannot write only costs the next process a probe
    return True, probe
