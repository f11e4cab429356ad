"""Mount syscalls and the mount table: everything graphdriver asks of the kernel about mounts.

- :func:`mounts` / :func:`is_mountpoint` read ``/proc/self/mountinfo`` (octal escapes decoded).
  Mount state is always taken from the kernel's table, never from ``st_dev`` (btrfs subvolumes
  have their own device numbers without being mount points).
- :func:`mount` / :func:`unmount` wrap ``mount(2)`` and ``umount2(2)`` through ctypes and raise
  :class:`~graphdriver.errors.MountError` with the errno text.
- :func:`mount_overlay` mounts the kernel's overlay filesystem. It uses the new mount API
  (``fsopen``/``fsconfig``/``fsmount``/``move_mount``) with one ``lowerdir+`` per lower layer
  when the kernel has it (6.8+): mount data is then no longer bound by one page, and a chain
  can be as deep as the kernel's own limit of 500 layers. Otherwise it uses the classic
  ``mount(2)`` with ``lowerdir=a:b:c``; when the absolute options would not fit in a page it
  rewrites every path relative to ``relative_to`` (the driver home, where ``l/<short>`` links
  keep each lower at 28 bytes) and mounts from a thread whose working directory alone has been
  moved there (``unshare(CLONE_FS)`` + ``chdir``), so the process's cwd never changes.
- :func:`overlay_max_lowers` and :func:`overlay_options` say what the running kernel takes.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import functools
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from graphdriver.errors import InvalidArgument, MountError

__all__ = [
    "MNT_DETACH",
    "MS_BIND",
    "MS_NODEV",
    "MS_NOSUID",
    "MS_RDONLY",
    "MS_REC",
    "MountInfo",
    "is_mountpoint",
    "mount",
    "mount_overlay",
    "mounts",
    "mounts_under",
    "new_mount_api_available",
    "overlay_max_lowers",
    "overlay_options",
    "unmount",
]

# mount(2) flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

# umount2(2) flags
MNT_FORCE = 0x1
MNT_DETACH = 0x2

# The new mount API (x86_64, arm64 and every architecture since 5.2 share these numbers).
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_SYS_UNSHARE_FLAG_CLONE_FS = 0x00000200
FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOUNT_ATTR_RDONLY = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100

OVERLAY_KERNEL_MAX_LOWERS = 500
"""The kernel's OVL_MAX_STACK."""
OVERLAY_CLASSIC_MAX_LOWERS = 128
"""What fits in one page of mount data with ``l/<26 chars>`` lowers: 28 x 128 = 3584 = 4096 - 512."""
_FSCONFIG_MAX_VALUE = 255
"""fsconfig(2) copies at most 256 bytes (with the NUL) of a string value."""

_OVERLAY_PARAMS = Path("/sys/module/overlay/parameters")

T = TypeVar("T")


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _err(what: str) -> MountError:
    err = ctypes.get_errno()
    exc = MountError(f"{what}: {os.strerror(err)}")
    exc.__cause__ = OSError(err, os.strerror(err))
    return exc


# -- the mount table -------------------------------------------------------------------------

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """Decode mountinfo's ``\\ooo`` escapes (space, tab, newline, backslash, and overlay's ``,=``)."""
    if "\\" not in field:
        return field
    raw = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)
    # the kernel escapes bytes; undo the latin-1 widening so UTF-8 names come back whole
    return raw.encode("latin-1", "surrogateescape").decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class MountInfo:
    """One line of ``/proc/self/mountinfo``; paths and options with escapes decoded.

    ``options`` are the per-mount options (``rw``, ``nosuid``, ``relatime``...) and
    ``super_options`` the filesystem's own (``lowerdir=...``, ``upperdir=...``), each split on
    the commas that separate options, so a comma inside an escaped path stays in its option.
    """

    mount_id: int
    parent_id: int
    major_minor: str
    root: str
    mount_point: str
    options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]

    def option(self, key: str) -> str | None:
        """The value of ``key=value`` in ``super_options`` (or ``""`` for a bare flag), else None."""
        for opt in self.super_options:
            name, sep, value = opt.partition("=")
            if name == key:
                return value if sep else ""
        return None

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def parse_mountinfo_line(line: str) -> MountInfo:
    """Parse one mountinfo line (see proc(5)); optional fields end at the ``-`` separator."""
    fields = line.rstrip("\n").split(" ")
    sep = fields.index("-", 6)
    opts = tuple(_unescape(o) for o in fields[5].split(","))
    fstype, source, super_opts = [*fields[sep + 1 : sep + 4], "", "", ""][:3]
    return MountInfo(
        mount_id=int(fields[0]),
        parent_id=int(fields[1]),
        major_minor=fields[2],
        root=_unescape(fields[3]),
        mount_point=_unescape(fields[4]),
        options=opts,
        fstype=_unescape(fstype),
        source=_unescape(source),
        super_options=tuple(_unescape(o) for o in super_opts.split(",")) if super_opts else (),
    )


def mounts() -> list[MountInfo]:
    """Every mount in this process's mount namespace, in the kernel's order (parents first)."""
    with open("/proc/self/mountinfo", encoding="latin-1") as f:
        return [parse_mountinfo_line(line) for line in f if line.strip()]


def _canonical(path: Path | str) -> str:
    return os.path.realpath(os.fspath(path))


def _mount_points() -> list[str]:
    """Just the mount points of :func:`mounts` (the fast path of :func:`is_mountpoint`)."""
    with open("/proc/self/mountinfo", "rb") as f:
        data = f.read()
    out = []
    for line in data.split(b"\n"):
        if line:
            point = line.split(b" ", 5)[4].decode("latin-1")
            out.append(_unescape(point) if "\\" in point else point)
    return out


_STATX_ATTR_MOUNT_ROOT = 0x2000
_AT_NO_AUTOMOUNT = 0x800
_AT_STATX_DONT_SYNC = 0x4000
_STATX_TYPE = 0x1


def _statx_mount_root(path: str) -> bool | None:
    """``STATX_ATTR_MOUNT_ROOT`` of ``path`` (5.8+): whether it is the root of a mount; None if
    the kernel or libc cannot say (then the mount table decides)."""
    buf = ctypes.create_string_buffer(256)
    libc = _libc()
    try:
        fn = libc.statx
    except AttributeError:
        return None
    rc = fn(
        ctypes.c_int(AT_FDCWD),
        os.fsencode(path),
        ctypes.c_int(_AT_NO_AUTOMOUNT | _AT_STATX_DONT_SYNC),
        ctypes.c_uint(_STATX_TYPE),
        buf,
    )
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno_mod.ENOENT, errno_mod.ENOTDIR):
            return False
        return None
    attributes, attributes_mask = (
        int.from_bytes(buf.raw[8:16], "little"),
        int.from_bytes(buf.raw[56:64], "little"),
    )
    if not attributes_mask & _STATX_ATTR_MOUNT_ROOT:
        return None
    return bool(attributes & _STATX_ATTR_MOUNT_ROOT)


def is_mountpoint(path: Path | str) -> bool:
    """Whether something is mounted exactly at ``path`` (symlinks in ``path`` followed).

    Asked of the kernel in O(1) with ``statx``'s ``STATX_ATTR_MOUNT_ROOT`` where it has it (a
    btrfs subvolume, with its own ``st_dev``, is rightly not a mount root; ``AT_STATX_DONT_SYNC``
    keeps a dead or hung FUSE server from being asked), else looked up in
    ``/proc/self/mountinfo``, whose text grows with every lower of a deep overlay (18 ms to read
    with one 500-lower mount on 6.18).
    """
    text = os.fspath(path)
    verdict = _statx_mount_root(text)
    if verdict is not None:
        return verdict
    return _canonical(text) in _mount_points()


def mounts_under(path: Path | str) -> list[MountInfo]:
    """Mounts at or below ``path``, deepest first (the order to unmount them in)."""
    base = _canonical(path)
    prefix = base.rstrip("/") + "/"
    found = [m for m in mounts() if m.mount_point == base or m.mount_point.startswith(prefix)]
    # later mounts stack on earlier ones: unmount deepest path first, newest first at a path
    order = {id(m): i for i, m in enumerate(found)}
    return sorted(found, key=lambda m: (-m.mount_point.count("/"), -order[id(m)]))


# -- mount(2) and umount2(2) -------------------------------------------------------------------


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str, target: Path | str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    """``mount(2)``; raises :class:`MountError` naming the target and the errno text."""
    libc = _libc()
    tgt = os.fspath(target)
    rc = libc.mount(_b(source), _b(tgt), _b(fstype), ctypes.c_ulong(flags), _b(data) if data else None)
    if rc != 0:
        raise _err(f"mount {fstype or source} on {tgt}")


def unmount(target: Path | str, *, detach: bool = False, missing_ok: bool = True) -> None:
    """``umount2(2)``, lazily with ``detach``; a target that is not mounted (or does not exist)
    is fine when ``missing_ok``, else :class:`MountError`."""
    tgt = os.fspath(target)
    rc = _libc().umount2(_b(tgt), ctypes.c_int(MNT_DETACH if detach else 0))
    if rc != 0:
        err = ctypes.get_errno()
        if missing_ok and err in (errno_mod.EINVAL, errno_mod.ENOENT):
            return
        raise _err(f"unmount {tgt}")


# -- running a call with a private working directory -------------------------------------------


def run_in_dir(directory: Path | str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a new thread whose working directory alone is ``directory``.

    The thread calls ``unshare(CLONE_FS)`` first, so its ``chdir`` does not move the cwd of the
    rest of the (possibly multi-threaded) process; the thread's fs context dies with it.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            if _libc().unshare(ctypes.c_int(_SYS_UNSHARE_FLAG_CLONE_FS)) != 0:
                raise _err("unshare(CLONE_FS)")
            os.chdir(directory)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=body, name="graphdriver-mount-from", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


# -- the new mount API ---------------------------------------------------------------------------


def _syscall(nr: int, *args: int | bytes | None) -> int:
    conv: list[ctypes.c_long | ctypes.c_char_p | None] = []
    for a in args:
        if isinstance(a, int):
            conv.append(ctypes.c_long(a))
        elif a is None:
            conv.append(None)
        else:
            conv.append(ctypes.c_char_p(a))
    return int(_libc().syscall(ctypes.c_long(nr), *conv))


def _fs_log(fsfd: int) -> str:
    """The kernel's messages for an fs context (``e overlay: ...`` lines), best effort."""
    msgs = []
    for _ in range(16):
        try:
            chunk = os.read(fsfd, 4096)
        except OSError:
            break
        if not chunk:
            break
        msgs.append(chunk.decode("utf-8", "replace").strip())
    return "; ".join(msgs)


@functools.cache
def _probe_new_api() -> tuple[bool, str]:
    fsfd = _syscall(_SYS_FSOPEN, b"overlay", FSOPEN_CLOEXEC)
    if fsfd < 0:
        return False, f"fsopen(overlay): {os.strerror(ctypes.get_errno())}"
    try:
        if _syscall(_SYS_FSCONFIG, fsfd, FSCONFIG_SET_STRING, b"lowerdir+", b"/", 0) != 0:
            return False, f"fsconfig(lowerdir+): {os.strerror(ctypes.get_errno())} (kernel < 6.8)"
        return True, "fsopen/fsconfig with lowerdir+"
    finally:
        os.close(fsfd)


def new_mount_api_available() -> tuple[bool, str]:
    """Whether overlay can be mounted with ``fsopen`` + ``lowerdir+``, and a one-line reason."""
    return _probe_new_api()


def overlay_max_lowers() -> int:
    """The deepest lower stack :func:`mount_overlay` can mount here: 500 with the new mount API
    and ``lowerdir+``, else 128 (the page-size bound of the classic mount data)."""
    return OVERLAY_KERNEL_MAX_LOWERS if _probe_new_api()[0] else OVERLAY_CLASSIC_MAX_LOWERS


def selinux_enabled() -> bool:
    """Whether SELinux is active (its filesystem is mounted), so mount labels mean something."""
    return os.path.exists("/sys/fs/selinux/enforce")


def overlay_options(*, userxattr: bool = False, mount_label: str = "") -> list[str]:
    """The option prefix overlay2 uses: ``index=off`` when the module has an ``index`` parameter,
    ``userxattr`` when asked, and the SELinux ``context="..."`` for a mount label."""
    opts = []
    if (_OVERLAY_PARAMS / "index").exists():
        opts.append("index=off")
    if userxattr:
        opts.append("userxattr")
    if mount_label:
        if '"' in mount_label or "," in mount_label:
            raise InvalidArgument(f"invalid mount label {mount_label!r}")
        if selinux_enabled():  # as the seed's label helper: overlay refuses context= without SELinux
            opts.append(f'context="{mount_label}"')
    return opts


def _mount_overlay_new_api(
    target: str,
    lowers: Sequence[str],
    upper: str | None,
    work: str | None,
    *,
    options: Sequence[str],
    readonly: bool,
) -> None:
    fsfd = _syscall(_SYS_FSOPEN, b"overlay", FSOPEN_CLOEXEC)
    if fsfd < 0:
        raise _err("fsopen(overlay)")
    try:

        def config(cmd: int, key: str | None, value: str | None) -> None:
            if _syscall(_SYS_FSCONFIG, fsfd, cmd, _b(key), _b(value), 0) != 0:
                err = ctypes.get_errno()
                log = _fs_log(fsfd)
                what = f"mount overlay on {target}: fsconfig {key or 'create'}: {os.strerror(err)}"
                raise MountError(f"{what} ({log})" if log else what) from OSError(err, os.strerror(err))

        for opt in options:
            key, sep, value = opt.partition("=")
            if sep:
                config(FSCONFIG_SET_STRING, key, value.strip('"'))
            else:
                config(FSCONFIG_SET_FLAG, key, None)
        for lower in lowers:
            config(FSCONFIG_SET_STRING, "lowerdir+", lower)
        if upper is not None:
            config(FSCONFIG_SET_STRING, "upperdir", upper)
        if work is not None:
            config(FSCONFIG_SET_STRING, "workdir", work)
        config(FSCONFIG_CMD_CREATE, None, None)
        mfd = _syscall(_SYS_FSMOUNT, fsfd, FSMOUNT_CLOEXEC, MOUNT_ATTR_RDONLY if readonly else 0)
        if mfd < 0:
            raise _err(f"mount overlay on {target}: fsmount")
        try:
            if _syscall(_SYS_MOVE_MOUNT, mfd, b"", AT_FDCWD, _b(target), MOVE_MOUNT_F_EMPTY_PATH) != 0:
                raise _err(f"mount overlay on {target}: move_mount")
        finally:
            os.close(mfd)
    finally:
        os.close(fsfd)


def _escape_lower(path: str) -> str:
    if "," in path:
        raise InvalidArgument(f"overlay path contains a comma, which mount(2) data cannot carry: {path}")
    return path.replace("\\", "\\\\").replace(":", "\\:")


def _classic_data(lowers: Sequence[str], upper: str | None, work: str | None, options: Sequence[str]) -> str:
    parts = list(options)
    parts.append("lowerdir=" + ":".join(_escape_lower(p) for p in lowers))
    if upper is not None:
        parts.append("upperdir=" + _escape_lower(upper))
    if work is not None:
        parts.append("workdir=" + _escape_lower(work))
    return ",".join(parts)


def _absolute(path: Path | str) -> str:
    text = os.fspath(path)
    return text if text.startswith("/") and "/." not in text and "//" not in text else os.path.abspath(text)


def _relative(path: Path, base: str) -> str:
    absolute = os.path.abspath(path)
    rel = os.path.relpath(absolute, base)
    return rel if len(rel) < len(absolute) else absolute


def mount_overlay(
    target: Path,
    *,
    lowers: Sequence[Path | str],
    upper: Path | None = None,
    work: Path | None = None,
    options: Sequence[str] = (),
    relative_to: Path | None = None,
    readonly: bool = False,
    new_api: bool | None = None,
) -> None:
    """Mount overlay on ``target``: ``lowers`` uppermost first, ``upper``/``work`` for a writable
    mount (both or neither), extra ``options`` (``"key=value"`` or ``"flag"``).

    ``relative_to`` is the directory the paths may be given relative to when absolute ones do
    not fit (a page of classic mount data, or 255 bytes for one fsconfig value). ``new_api``
    forces (True) or forbids (False) the new mount API; None picks it when available.
    Raises :class:`MountError` with the kernel's reason.
    """
    if not lowers:
        raise InvalidArgument("overlay needs at least one lower directory")
    if (upper is None) != (work is None):
        raise InvalidArgument("overlay needs both upperdir and workdir, or neither")
    tgt = os.path.abspath(target)
    use_new = _probe_new_api()[0] if new_api is None else new_api
    if use_new and len(lowers) > OVERLAY_KERNEL_MAX_LOWERS:
        raise MountError(f"mount overlay on {tgt}: {len(lowers)} lowers, the kernel takes at most 500")
    abs_lowers = [_absolute(p) for p in lowers]
    abs_upper = os.path.abspath(upper) if upper is not None else None
    abs_work = os.path.abspath(work) if work is not None else None

    if use_new:
        longest = max(len(os.fsencode(p)) for p in [*abs_lowers, abs_upper or "", abs_work or ""])
        if longest <= _FSCONFIG_MAX_VALUE or relative_to is None:
            _mount_overlay_new_api(tgt, abs_lowers, abs_upper, abs_work, options=options, readonly=readonly)
            return
        base = os.path.abspath(relative_to)
        rl = [_relative(Path(p), base) for p in abs_lowers]
        ru = _relative(Path(abs_upper), base) if abs_upper else None
        rw = _relative(Path(abs_work), base) if abs_work else None
        run_in_dir(base, lambda: _mount_overlay_new_api(tgt, rl, ru, rw, options=options, readonly=readonly))
        return

    page = os.sysconf("SC_PAGE_SIZE")
    flags = MS_RDONLY if readonly else 0
    data = _classic_data(abs_lowers, abs_upper, abs_work, options)
    if len(os.fsencode(data)) < page - 1:
        mount("overlay", tgt, "overlay", flags, data)
        return
    if relative_to is None:
        raise MountError(
            f"mount overlay on {tgt}: options are {len(data)} bytes, more than a page; "
            "pass relative_to or use the new mount API"
        )
    base = os.path.abspath(relative_to)
    data = _classic_data(
        [_relative(Path(p), base) for p in abs_lowers],
        _relative(Path(abs_upper), base) if abs_upper else None,
        _relative(Path(abs_work), base) if abs_work else None,
        options,
    )
    if len(os.fsencode(data)) >= page - 1:
        raise MountError(
            f"mount overlay on {tgt}: options are {len(data)} bytes even relative to {base}, "
            f"more than a page ({len(lowers)} lowers)"
        )
    run_in_dir(base, lambda: mount("overlay", tgt, "overlay", flags, data))
