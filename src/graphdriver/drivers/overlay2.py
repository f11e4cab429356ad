"""overlay2: layers as overlayfs lower stacks, with a native diff from each layer's own dir.

Moby's overlay2 design (2016, PR #22126) on today's kernel. Every layer keeps only its own
changes in ``diff/``; a layer's full view is an overlay mount of its ``diff/`` over the
``diff/`` of every ancestor, so create is O(1) and nothing is ever copied::

    <home>/                              0700
        l/                               short names, so that many lowers fit in mount data
            <LINK> -> ../<id>/diff       LINK: 26 chars of base32 from os.urandom
        .mounts/                         get/put counts shared by processes (MountCounter), and
                                         .probe-cache.json: init's probe verdict (see below)
        <id>/                            0700
            diff/                        this layer's own changes (the upperdir while writable);
                                         the layer's root itself when it has no parent; made with
                                         the parent root's owner, mode, xattrs and times, which
                                         the merged root shows
            link                         LINK (no newline)
            parent                       the parent's id (only with a parent)
            lower                        "l/<P>:l/<GP>:...", uppermost first (only with a parent)
            work/                        overlay workdir (only with a parent)
            merged/                      mount point; made on the first get, removed on the last put
            committed                    written when a child is created on this layer
        .tmp-create-<pid>-*/             a layer being created (renamed to <id> when complete)
        .rm-<pid>-<id>-*/                a layer being removed (renamed away first)
        .overlay-probe-<pid>-*/          init's test mount, .dtype-probe-<pid>-*/ its d_type probe

get(id):
    - no parent: returns ``diff/`` itself, unmounted (the get is still counted, so ``remove``
      refuses a layer in use);
    - otherwise mounts overlay on ``merged/``: ``lowerdir=<lowers>,upperdir=diff,workdir=work``
      read-write, or, once the layer has children (``committed``), read-only with
      ``lowerdir=diff:<lowers>`` (a dir in use as one mount's upper must not be another's
      lower). Options: ``index=off`` when the module has that parameter, the SELinux context
      of the mount label when SELinux is on, and the ``mountopt`` storage option.
    Mounts use the new mount API with one ``lowerdir+`` per layer where the kernel has it (6.8+),
    which allows the kernel's 500 lowers; each lower is then named by its ``diff/`` path (on 6.18
    a ``lowerdir+`` through an ``l/`` link costs ~100 us at depth 500, a direct path ~11 us).
    Elsewhere the classic ``mount(2)`` with ``l/<LINK>`` lowers, relative to home when absolute
    paths exceed a page, which allows 128 (see :mod:`graphdriver.mount`).
put(id):
    the last put detaches the mount (``MNT_DETACH``) and removes ``merged/``.

Records. ``link``, ``parent`` and ``lower`` are written without fsync, so that create costs no
journal commit: a layer store makes them durable with its ``syncfs`` before its database commit,
and that record (the layer's parent) is the source of truth. What a crash of a process using the
driver alone can leave is a layer whose files are empty or torn: each is derived data, checked
where it is read and rebuilt then (written back atomically, fsynced): ``link`` from the ``l/``
symlink that points at the layer's ``diff/`` (a new one if there is none), ``parent`` from the
first entry of ``lower``, ``lower`` from ``parent`` and the parent's own link and lower. A layer
whose ``parent`` and ``lower`` are both lost raises :class:`NotFound` until the store's
``check --repair`` rewrites them from its record (:meth:`Overlay2Driver.verify_records`).

Native diff: ``changes``, ``diff`` and ``diff_size`` read only ``diff/`` (0/0 char devices are
deletions, ``trusted.overlay.opaque=y`` an opaque dir) and ``apply_diff`` writes straight into
``diff/`` (whiteouts as overlay whiteouts), with no mount. It is used when ``parent`` is the
layer's recorded parent and a test mount at init showed that ``diff/`` can be trusted: no
``redirect_dir`` (a renamed dir is a redirect xattr, which a tar cannot carry), no ``metacopy``
(a chmod'ed file's data stays below), and no opaque-flag copy-up bug. Otherwise the naive
methods of :class:`~graphdriver.drivers.base.Driver` run, and ``status()`` says why. A layer
without a parent uses the naive methods too: its ``diff/`` *is* its root, so they cost the same.

Init needs real root (not the root of a user namespace: whiteouts live in ``trusted.*`` xattrs),
overlay in the kernel, and a backing filesystem that reports ``d_type`` and is not itself an
overlay (or aufs, ecryptfs, nfs...). The test mount (two lowers, an upper, and the
native-diff checks) runs in a scratch dir inside home, which init creates anyway, once: its verdict
is kept in ``.mounts/.probe-cache.json`` and reused while the kernel (release, build, boot id),
the backing filesystem (type, device), the mount options and the overlay module parameters are
those it was made with (:func:`~graphdriver.drivers.overlayutils.cached_probe`); the side-effect
free :meth:`Overlay2Driver.check_support` only reads (mount API, filesystems, existing entries).

Storage options (``--storage-opt``, with or without the ``overlay2.`` prefix):
``mountopt=<opts>`` extra overlay options for every mount (e.g. ``redirect_dir=on``);
``native_diff=false`` always use the naive diff; ``mount_api=new|classic|auto``.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from graphdriver.archive.types import Change, Limits, WhiteoutFormat
from graphdriver.drivers import overlayutils
from graphdriver.drivers.base import Capabilities, Driver
from graphdriver.drivers.mountcount import MountCounter
from graphdriver.errors import (
    AlreadyExists,
    Busy,
    IncompatibleFilesystem,
    InvalidArgument,
    MountError,
    NotFound,
    NotSupported,
    PrerequisitesNotMet,
)
from graphdriver.fs.remove import mount_points_under, remove_tree
from graphdriver.ids import validate_id, validate_parent
from graphdriver.mount import (
    OVERLAY_CLASSIC_MAX_LOWERS,
    OVERLAY_KERNEL_MAX_LOWERS,
    is_mountpoint,
    mount_overlay,
    mounts_under,
    new_mount_api_available,
    overlay_options,
    unmount,
)

__all__ = ["Overlay2Driver"]

LINK_DIR = "l"
MOUNTS_DIR = ".mounts"
LINK_LEN = 26
_LINK_RE = re.compile(r"[A-Z2-7]{26}")
_LINK_TARGET_RE = re.compile(r"\.\./([^/]+)/diff")
_TMP_CREATE = ".tmp-create-"
_TMP_REMOVE = ".rm-"
_LEFTOVER_PREFIXES = (_TMP_CREATE, _TMP_REMOVE, overlayutils.PROBE_PREFIX, overlayutils.DTYPE_PROBE_PREFIX)
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_OPTION_KEYS = ("mountopt", "native_diff", "mount_api")


def _new_link() -> str:
    return base64.b32encode(os.urandom(16)).decode("ascii")[:LINK_LEN]


def _parse_lower(text: str) -> list[str] | None:
    """The entries of a ``lower`` file's text; None when it is empty or torn."""
    lowers = text.split(":")
    for lower in lowers:
        if not lower.startswith(LINK_DIR + "/") or not _LINK_RE.fullmatch(lower[len(LINK_DIR) + 1 :]):
            return None
    return lowers


def _valid_id(text: str) -> bool:
    try:
        validate_id(text)
    except InvalidArgument:
        return False
    return True


_libc: ctypes.CDLL | None = None


def _rename_noreplace(src: Path, dst: Path) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    libc = _libc
    rc = libc.renameat2(
        _AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(_RENAME_NOREPLACE)
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(dst))


def _write_file(path: Path, text: str) -> None:
    """Create ``path`` with ``text``; not durable (see "Records" in the module doc)."""
    with open(path, "x", encoding="utf-8") as f:
        f.write(text)


def _rewrite_file(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably (a repaired record): a temporary
    file, fsync, rename. Processes repairing the same file at once write the same text."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy_root_attributes(src: Path, dst: Path) -> None:
    """Give a child's ``diff/`` its parent's root attributes: the merged root shows the upper
    dir's owner, mode, xattrs and times, and they must equal the parent's until changed."""
    st = os.lstat(src)
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    for name in os.listxattr(src, follow_symlinks=False):
        if name.startswith(("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")):
            continue
        os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _selinux_enabled() -> bool:
    return os.path.exists("/sys/fs/selinux/enforce")


class Overlay2Driver(Driver):
    """Layers as overlay lower stacks; see the module docstring for the layout and the model."""

    name = "overlay2"
    capabilities = Capabilities(
        requires_root=True,
        mounts=True,
        counts_gets=True,
        writable_parents=False,
        native_diff=True,
        copy_on_write=True,
        max_depth=OVERLAY_KERNEL_MAX_LOWERS,
    )

    def __init__(self, home: Path | str, options: Mapping[str, str] | None = None) -> None:
        super().__init__(home, options)
        opts = self._parse_options(self.options)
        self._mountopt = [o for o in opts.get("mountopt", "").split(",") if o]
        mount_api = opts.get("mount_api", "auto")
        if mount_api not in ("auto", "new", "classic"):
            raise InvalidArgument(f"overlay2: mount_api must be auto, new or classic, not {mount_api!r}")
        new_ok, new_why = new_mount_api_available()
        if mount_api == "new" and not new_ok:
            raise NotSupported(f"the new mount API is not available: {new_why}", self.name)
        self._new_api = new_ok and mount_api != "classic"
        self._mount_api_text = (
            f"new ({new_why})"
            if self._new_api
            else "classic mount(2), relative paths from home beyond a page"
            + ("" if new_ok else f" ({new_why})")
        )
        native_opt = opts.get("native_diff", "auto").lower()
        if native_opt not in ("auto", "true", "false"):
            raise InvalidArgument(f"overlay2: native_diff must be true, false or auto, not {native_opt!r}")

        self.check_support(self.home)
        fresh = not self.home.exists()
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._backing_fs = overlayutils.backing_fs(self.home)
        try:
            try:
                dtype_ok, probe = overlayutils.cached_probe(
                    self.home, self.home / MOUNTS_DIR, self._base_options()
                )
            except (MountError, PermissionError) as exc:
                raise NotSupported(f"overlay test mount failed: {exc}", self.name) from exc
            if not dtype_ok or probe is None:
                raise IncompatibleFilesystem(self._no_dtype_message(self._backing_fs, self.home), self.name)
        except NotSupported:
            if fresh:
                try:
                    self.home.rmdir()  # leave no state behind, so the driver is not "prior"
                except OSError:
                    pass
            raise
        (self.home / LINK_DIR).mkdir(mode=0o700, exist_ok=True)
        self._probe = probe
        if native_opt == "false":
            self._native_reason: str | None = "disabled by the native_diff=false storage option"
        elif not probe.native_diff:
            self._native_reason = probe.native_diff_reason
        else:
            self._native_reason = None
        self._counter = MountCounter(self.home / MOUNTS_DIR)
        self.capabilities = replace(
            type(self).capabilities,
            native_diff=self._native_reason is None,
            max_depth=OVERLAY_KERNEL_MAX_LOWERS if self._new_api else OVERLAY_CLASSIC_MAX_LOWERS,
        )
        self._remove_leftovers()

    # -- support ------------------------------------------------------------------------------

    @staticmethod
    def _parse_options(options: Mapping[str, str]) -> dict[str, str]:
        out = {}
        for key, value in options.items():
            bare = key.removeprefix("overlay2.")
            if bare not in _OPTION_KEYS:
                raise InvalidArgument(
                    f"overlay2: unknown storage option {key!r} (known: {', '.join(_OPTION_KEYS)})"
                )
            out[bare] = value
        return out

    @staticmethod
    def _no_dtype_message(fs: str, path: Path) -> str:
        return (
            f"the backing filesystem ({fs}) of {path} does not report d_type in readdir, so overlay "
            "would mishandle whiteouts and directory merges; reformat it with d_type support "
            "(xfs: mkfs.xfs -n ftype=1; ext4: the filetype feature, the default)"
        )

    @classmethod
    def check_support(cls, home: Path) -> None:
        """Root, overlay in the kernel, and a backing filesystem with d_type that is not overlay.

        Reads only: d_type is judged from entries that already exist near ``home``; init then
        confirms it with a probe file and a real test mount.
        """
        if os.geteuid() != 0:
            raise PrerequisitesNotMet("needs root; use fuse-overlayfs", cls.name)
        userns = overlayutils.user_namespace()
        if userns is not None:
            raise PrerequisitesNotMet(
                f"running in a user namespace ({userns}): overlay2 keeps whiteouts in trusted.* xattrs, "
                "which need real root; use fuse-overlayfs",
                cls.name,
            )
        if not overlayutils.overlay_in_kernel():
            raise NotSupported("the kernel has no overlay filesystem (try: modprobe overlay)", cls.name)
        base = overlayutils.nearest_existing(Path(home))
        fs = overlayutils.backing_fs(base)
        if fs in overlayutils.UNSUPPORTED_BACKING:
            raise IncompatibleFilesystem(
                f"the backing filesystem of {base} is {fs}, which cannot hold overlay upper dirs", cls.name
            )
        if overlayutils.dtype_supported_existing(base) is False:
            raise IncompatibleFilesystem(cls._no_dtype_message(fs, base), cls.name)

    def _base_options(self, mount_label: str = "") -> list[str]:
        label = mount_label if _selinux_enabled() else ""
        return [*overlay_options(mount_label=label), *self._mountopt]

    def _remove_leftovers(self) -> None:
        """Remove what a crashed process left: half-created or half-removed layers and probe
        dirs, each named with its process id and removed only once that process is gone (a
        live process, or one in another pid namespace, may still be using it)."""
        for entry in os.scandir(self.home):
            for prefix in _LEFTOVER_PREFIXES:
                if entry.name.startswith(prefix):
                    pid = entry.name[len(prefix) :].split("-", 1)[0]
                    if pid.isdigit() and not _pid_alive(int(pid)):
                        try:
                            remove_tree(entry.path)
                        except (Busy, OSError):
                            pass
                    break

    # -- paths and records ----------------------------------------------------------------------

    def _dir(self, id: str) -> Path:
        validate_id(id)
        if id == LINK_DIR:
            raise InvalidArgument(f"layer id {id!r} is reserved by overlay2")
        return self.home / id

    def _require(self, id: str) -> Path:
        d = self._dir(id)
        if not (d / "diff").is_dir():
            raise NotFound(f"overlay2: no layer {id}")
        return d

    @staticmethod
    def _read(path: Path) -> str | None:
        try:
            return path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None

    def _lowers(self, d: Path) -> list[str]:
        """The ``l/<LINK>`` entries of the layer's ``lower`` file, uppermost first (none without
        the file: no parent); an empty or torn file is rebuilt from ``parent`` first."""
        text = self._read(d / "lower")
        if text is None:
            return []
        lowers = _parse_lower(text)
        if lowers is None:
            lowers = self._expected_lowers(d.name, self._parent_record(d))
            _rewrite_file(d / "lower", ":".join(lowers))
        return lowers

    def _expected_lowers(self, id: str, parent: str) -> list[str]:
        """What ``lower`` of ``id`` must hold on ``parent``: its link, then its lowers."""
        try:
            pdir = self._require(parent)
        except NotFound:
            raise NotFound(f"overlay2: layer {id} lost its lower file; its parent {parent} is gone") from None
        return [f"{LINK_DIR}/{self._link(pdir)}", *self._lowers(pdir)]

    def _parent_record(self, d: Path) -> str:
        """The ``parent`` file of a layer that has a parent (its ``lower`` is torn)."""
        parent = self._read(d / "parent")
        if not parent or not _valid_id(parent):
            raise NotFound(
                f"overlay2: layer {d.name} has lost its parent and lower files (a crash before they were "
                "synced); the layer store's `check --repair` rewrites them from its record"
            )
        return parent

    def _link(self, d: Path) -> str:
        """The layer's LINK, from its ``link`` file; an empty or torn one is rebuilt from the
        ``l/`` symlink to its ``diff/`` (a new symlink if there is none)."""
        link = self._read(d / "link")
        if link and _LINK_RE.fullmatch(link):
            return link
        link = self._find_link(d.name) or self._new_link_to(d.name)
        _rewrite_file(d / "link", link)
        return link

    def _find_link(self, id: str) -> str | None:
        """The name in ``l/`` of the symlink to ``../<id>/diff`` (one readlink per layer)."""
        target = f"../{id}/diff"
        with os.scandir(self.home / LINK_DIR) as entries:
            for entry in entries:
                if _LINK_RE.fullmatch(entry.name):
                    try:
                        if os.readlink(entry.path) == target:
                            return entry.name
                    except OSError:
                        continue
        return None

    def _new_link_to(self, id: str) -> str:
        """Make a fresh ``l/<LINK> -> ../<id>/diff``; return LINK."""
        while True:
            link = _new_link()
            try:
                os.symlink(f"../{id}/diff", self.home / LINK_DIR / link)
                return link
            except FileExistsError:
                continue

    def verify_records(self, id: str, ancestors: Sequence[str], *, repair: bool) -> list[str]:
        """Check layer ``id``'s ``link``, ``parent`` and ``lower`` files against ``ancestors``, the
        layer store's record of its parent, grandparent... (uppermost first; the source of truth).
        Returns what is wrong, one line each (empty when all is right); ``repair`` rewrites each
        wrong file but those marked "(not repaired)".
        Reads only unless ``repair``; verify a parent before its children."""
        d = self._require(id)
        wrong: list[str] = []
        link = self._read(d / "link")
        if not (link and _LINK_RE.fullmatch(link) and self._link_target(link) == f"../{id}/diff"):
            wrong.append(f"link file {link!r} does not name its l/ symlink")
            if repair:
                self._repair_link(d)
        if not ancestors:
            for name in ("parent", "lower"):
                if (d / name).exists():
                    wrong.append(f"a {name} file, but the record has no parent (not repaired)")
            return wrong
        recorded = self._read(d / "parent")
        if recorded != ancestors[0]:
            wrong.append(f"parent file {recorded!r}, the record says {ancestors[0]}")
            if repair:
                _rewrite_file(d / "parent", ancestors[0])
        expected = []
        for ancestor in ancestors:
            alink = self._read(self._dir(ancestor) / "link")
            target = f"../{ancestor}/diff"
            if not (alink and _LINK_RE.fullmatch(alink) and self._link_target(alink) == target):
                alink = self._find_link(ancestor)
            if alink is None:
                wrong.append(f"lower file not checked: ancestor {ancestor} has no l/ link (not repaired)")
                return wrong
            expected.append(f"{LINK_DIR}/{alink}")
        text = self._read(d / "lower")
        if (None if text is None else _parse_lower(text)) != expected:
            wrong.append(f"lower file {(text or '')[:60]!r} does not list the parent chain's links")
            if repair:
                _rewrite_file(d / "lower", ":".join(expected))
        return wrong

    def _link_target(self, link: str) -> str | None:
        try:
            return os.readlink(self.home / LINK_DIR / link)
        except OSError:
            return None

    def _repair_link(self, d: Path) -> None:
        link = self._find_link(d.name) or self._new_link_to(d.name)
        _rewrite_file(d / "link", link)

    def _lower_diff_dirs(self, d: Path) -> list[str]:
        """The ``diff/`` dirs of the layer's ancestors, uppermost first, from the ``l/`` links."""
        home = str(self.home)
        out = []
        for lower in self._lowers(d):
            try:
                target = os.readlink(f"{home}/{lower}")
            except FileNotFoundError:
                raise NotFound(
                    f"overlay2: layer {d.name} is missing its lower {lower} (an ancestor was removed)"
                ) from None
            m = _LINK_TARGET_RE.fullmatch(target)
            if m is None:
                raise NotFound(f"overlay2: link {lower} points to {target!r}, not ../<id>/diff")
            out.append(f"{home}/{validate_id(m.group(1))}/diff")
        return out

    # -- the proto-driver -------------------------------------------------------------------------

    def exists(self, id: str) -> bool:
        return (self._dir(id) / "diff").is_dir()

    def parent_of(self, id: str) -> str | None:
        d = self._require(id)
        parent = self._read(d / "parent")
        if parent is None or _valid_id(parent):
            return parent
        # torn: the first lower is the parent's link, l/<LINK> -> ../<parent>/diff
        lowers = self._lowers(d)
        target = self._link_target(lowers[0].removeprefix(LINK_DIR + "/")) if lowers else None
        m = _LINK_TARGET_RE.fullmatch(target or "")
        if m is None:
            raise NotFound(f"overlay2: layer {id} has lost its parent file and its lower does not name it")
        parent = validate_id(m.group(1))
        _rewrite_file(d / "parent", parent)
        return parent

    def create(self, id: str, parent: str | None = None) -> None:
        d = self._dir(id)
        parent = validate_parent(parent)
        if d.exists():
            raise AlreadyExists(f"overlay2: layer {id} already exists")
        lowers: list[str] = []
        parent_dir: Path | None = None
        if parent is not None:
            parent_dir = self._require(parent)
            lowers = [f"{LINK_DIR}/{self._link(parent_dir)}", *self._lowers(parent_dir)]
            limit = self.capabilities.max_depth or OVERLAY_KERNEL_MAX_LOWERS
            if len(lowers) > limit:
                raise InvalidArgument(
                    f"overlay2: max depth exceeded: layer {id} on {parent} would have {len(lowers)} "
                    f"lower layers, at most {limit} fit in one overlay mount here"
                )

        tmp = self._new_tmp_dir()
        link_path: Path | None = None
        try:
            (tmp / "diff").mkdir(mode=0o755)
            os.chmod(tmp / "diff", 0o755)
            if parent_dir is not None:
                _copy_root_attributes(parent_dir / "diff", tmp / "diff")
            if parent is not None:
                (tmp / "work").mkdir(mode=0o700)
                _write_file(tmp / "lower", ":".join(lowers))
                _write_file(tmp / "parent", parent)
            while True:
                link = _new_link()
                link_path = self.home / LINK_DIR / link
                try:
                    os.symlink(f"../{id}/diff", link_path)
                    break
                except FileExistsError:
                    continue
            _write_file(tmp / "link", link)  # no fsync: see "Records" in the module doc
            try:
                _rename_noreplace(tmp, d)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise AlreadyExists(f"overlay2: layer {id} already exists") from exc
                raise
        except BaseException:
            if link_path is not None:
                link_path.unlink(missing_ok=True)
            remove_tree(tmp)
            raise
        if parent_dir is not None:
            (parent_dir / "committed").touch()

    def reset(self, id: str) -> None:
        """Empty layer ``id``'s ``diff/`` again, as :meth:`create` left it, keeping the layer's
        identity (its ``l/`` link, ``lower`` and ``parent``): layers created on it stay valid.
        For an apply that must start over (LayerStore.import_layers, after
        ``LowerLayersNeeded``). Busy while the layer is mounted."""
        d = self._require(id)
        if self._counter.count(id) > 0:
            raise Busy(f"overlay2: layer {id} is mounted; it cannot be reset")
        diff = d / "diff"
        remove_tree(diff)
        diff.mkdir(mode=0o755)
        os.chmod(diff, 0o755)
        parent = self.parent_of(id)
        if parent is not None:
            _copy_root_attributes(self._require(parent) / "diff", diff)

    def _new_tmp_dir(self) -> Path:
        """A fresh ``.tmp-create-<pid>-<random>/`` (0700) in home (tempfile.mkdtemp costs a
        random generator and path-type checks that the first create of a process pays)."""
        while True:
            tmp = self.home / f"{_TMP_CREATE}{os.getpid()}-{os.urandom(6).hex()}"
            try:
                tmp.mkdir(mode=0o700)
                return tmp
            except FileExistsError:
                continue

    def remove(self, id: str) -> None:
        d = self._require(id)
        merged = d / "merged"

        def do_remove() -> None:
            if not (d / "diff").is_dir():
                raise NotFound(f"overlay2: no layer {id}")  # removed meanwhile by another process
            if is_mountpoint(merged):
                self._unmount_layer(merged)
            # anything else mounted inside (a leaked bind mount) makes the layer busy, checked
            # before the rename so that a refusal leaves the layer exactly as it was
            inside = mount_points_under(d)
            if inside:
                raise Busy(f"overlay2: layer {id} has a mount inside it: {inside[0]}")
            link = self._read(d / "link")
            doomed = self.home / f"{_TMP_REMOVE}{os.getpid()}-{id}-{os.urandom(4).hex()}"
            _rename_noreplace(d, doomed)
            if link and _LINK_RE.fullmatch(link):
                (self.home / LINK_DIR / link).unlink(missing_ok=True)
            remove_tree(doomed)

        count = self._counter.run_if_idle(id, do_remove)
        if count > 0:
            raise Busy(f"overlay2: layer {id} is in use ({count} get{'s' if count > 1 else ''} not put)")

    def get(self, id: str, mount_label: str = "") -> Path:
        d = self._require(id)
        lowers = self._lowers(d)
        diff = d / "diff"
        if not lowers:
            self._counter.acquire(id, diff, lambda: None, mounts=False)
            return diff
        merged = d / "merged"

        def do_mount() -> None:
            merged.mkdir(mode=0o700, exist_ok=True)
            self._mount_layer(id, lowers, merged, mount_label, readonly=(d / "committed").exists())

        self._counter.acquire(id, merged, do_mount)
        return merged

    def put(self, id: str) -> None:
        d = self._require(id)
        if not self._lowers(d):
            self._counter.release(id, d / "diff", lambda: None)
            return
        merged = d / "merged"

        def do_unmount() -> None:
            self._unmount_layer(merged)
            try:
                merged.rmdir()
            except OSError:
                pass

        self._counter.release(id, merged, do_unmount)

    def cleanup(self) -> None:
        home = os.path.realpath(self.home)
        for info in mounts_under(home):
            if info.mount_point != home:
                self._unmount_layer(Path(info.mount_point))
        for entry in os.scandir(self.home):
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                try:
                    os.rmdir(os.path.join(entry.path, "merged"))
                except OSError:
                    pass
        for id in list(self._counter.active()):
            self._counter.forget(id)
        try:
            names = os.listdir(self.home / MOUNTS_DIR)
        except FileNotFoundError:
            names = []
        for name in names:
            if not name.startswith("."):
                self._counter.forget(name)

    # -- mounting: the two hooks fuse-overlayfs overrides ----------------------------------------

    def _mount_layer(
        self, id: str, lowers: list[str], merged: Path, mount_label: str, *, readonly: bool
    ) -> None:
        """Mount layer ``id``'s stack on ``merged``. ``lowers`` are its ancestors' ``l/<LINK>``
        entries, uppermost first. Read-write with ``<id>/diff`` as the upper dir (``<id>/work``
        its workdir), or, ``readonly`` (the layer has children), with ``<id>/diff`` as the
        uppermost lower: a dir in use as one mount's upper must not be another's lower."""
        d = self.home / id
        diff = d / "diff"
        lower_paths: list[Path | str]
        if self._new_api:  # no page limit: name each lower's diff/ itself, the fastest lookup
            lower_paths = list(self._lower_diff_dirs(d))
        else:  # l/<LINK>: 28 bytes per lower once made relative to home
            home = str(self.home)
            lower_paths = [f"{home}/{lower}" for lower in lowers]
        options = self._base_options(mount_label)
        if readonly:
            mount_overlay(
                merged,
                lowers=[diff, *lower_paths],
                options=options,
                relative_to=self.home,
                readonly=True,
                new_api=self._new_api,
            )
        else:
            mount_overlay(
                merged,
                lowers=lower_paths,
                upper=diff,
                work=d / "work",
                options=options,
                relative_to=self.home,
                new_api=self._new_api,
            )

    def _unmount_layer(self, merged: Path) -> None:
        """Detach the mount on ``merged`` (``MNT_DETACH``)."""
        unmount(merged, detach=True)

    def status(self) -> list[tuple[str, str]]:
        native = "true" if self._native_reason is None else f"false ({self._native_reason})"
        layers = sum(
            1
            for e in os.scandir(self.home)
            if e.is_dir(follow_symlinks=False) and not e.name.startswith(".") and e.name != LINK_DIR
        )
        return [
            ("Backing Filesystem", self._backing_fs),
            ("Supports d_type", "true"),
            ("Native Overlay Diff", native),
            ("Using metacopy", "true" if self._probe.metacopy else "false"),
            ("Layers", str(layers)),
            ("Max depth", str(self.capabilities.max_depth)),
            ("Mount API", self._mount_api_text),
        ]

    # -- native diff -------------------------------------------------------------------------------

    def native_diff_reason(self, id: str, parent: str | None) -> str | None:
        """None when ``diff/`` of ``id`` is its exact diff against ``parent``, else why not."""
        if self._native_reason is not None:
            return self._native_reason
        recorded = self.parent_of(id)
        if recorded is None:
            return f"{id} has no parent: its diff/ is its whole root"
        if parent is None:
            return f"no parent given: {id} is compared with an empty tree, not with its parent {recorded}"
        if parent != recorded:
            return f"{parent} is not the direct parent of {id} ({recorded})"
        return None

    def _native_changes(self, id: str) -> tuple[Path, list[Change]]:
        from graphdriver.archive.changes import changes_from_upper

        d = self._require(id)
        diff = d / "diff"
        return diff, changes_from_upper(diff, [Path(p) for p in self._lower_diff_dirs(d)])

    def changes(self, id: str, parent: str | None = None) -> list[Change]:
        if self.native_diff_reason(id, parent) is not None:
            return super().changes(id, parent)
        return self._native_changes(id)[1]

    @contextmanager
    def diff(self, id: str, parent: str | None = None) -> Iterator[BinaryIO]:
        if self.native_diff_reason(id, parent) is not None:
            with super().diff(id, parent) as stream:
                yield stream
            return
        from graphdriver.archive.export import open_export

        diff, changes = self._native_changes(id)
        with open_export(diff, changes, source_format=WhiteoutFormat.OVERLAY) as stream:
            yield stream

    def diff_size(self, id: str, parent: str | None = None) -> int:
        if self.native_diff_reason(id, parent) is not None:
            return super().diff_size(id, parent)
        from graphdriver.archive.changes import changes_size

        diff, changes = self._native_changes(id)
        return changes_size(diff, changes)

    def apply_diff(
        self, id: str, parent: str | None, tar: BinaryIO, *, limits: Limits | None = None
    ) -> int:
        """Natively, the tar is applied straight into ``diff/`` with overlay whiteouts, its paths
        resolved in the merged view of the lower layers where ``diff/`` alone cannot (a parent
        directory, symlink or hard-link target that only a lower layer holds is copied up). The
        size is measured by the applier from what it wrote (``ApplyStats.changes_size``, equal to
        :meth:`diff_size`); only when it cannot (``diff/`` was not empty) are the changes walked."""
        parent = validate_parent(parent)
        if self.native_diff_reason(id, parent) is not None or self._counter.count(id) > 0:
            return super().apply_diff(id, parent, tar, limits=limits)
        from graphdriver.archive.apply import apply_layer
        from graphdriver.archive.changes import changes_size

        d = self._require(id)
        stats = apply_layer(
            d / "diff",
            tar,
            whiteout_format=WhiteoutFormat.OVERLAY,
            limits=limits,
            lowers=self._lower_diff_dirs(d),
        )
        if stats.changes_size is not None:
            return stats.changes_size
        diff, changes = self._native_changes(id)
        return changes_size(diff, changes)

    # -- applying the layers of one stack at the same time (LayerStore.import_layers) -------------

    def applies_alone(self, id: str, parent: str | None) -> bool:
        """Whether :meth:`apply_diff` of ``id`` on ``parent`` writes only ``id``'s own ``diff/``:
        a layer without a parent, or the native path. Then the layers of one stack can be applied
        at the same time with :meth:`apply_unmeasured` (which raises
        :class:`~graphdriver.archive.apply.LowerLayersNeeded` for a layer that needs to read its
        lower layers after all), and measured with :meth:`applied_size` once they all are."""
        parent = validate_parent(parent)
        if self._counter.count(id) > 0:
            return False
        if parent is None:
            return self.parent_of(id) is None
        return self.native_diff_reason(id, parent) is None

    def apply_unmeasured(
        self, id: str, parent: str | None, tar: BinaryIO, *, limits: Limits | None = None
    ) -> None:
        """:meth:`apply_diff` without its size and without reading the lower layers (which may
        not be complete yet): only where :meth:`applies_alone` holds.

        Raises :class:`~graphdriver.archive.apply.LowerLayersNeeded` when an entry needs them (a
        parent directory, opaque directory or hard-link target not in the layer itself); ``diff/``
        is then partially applied: remove and re-create the layer, and apply it with
        :meth:`apply_diff` once its lower layers are complete."""
        parent = validate_parent(parent)
        if not self.applies_alone(id, parent):
            raise InvalidArgument(f"overlay2: layer {id} cannot be applied apart from its parent")
        from graphdriver.archive.apply import ApplyOptions, apply_layer

        diff = self._require(id) / "diff"
        if parent is None:
            apply_layer(diff, tar, limits=limits)  # as Driver.apply_diff does through get(): diff/
        else:
            apply_layer(
                diff,
                tar,
                whiteout_format=WhiteoutFormat.OVERLAY,
                limits=limits,
                options=ApplyOptions(lowers_unavailable=True),
            )

    def applied_size(self, id: str, parent: str | None) -> int:
        """What :meth:`apply_diff` returns for the layer as it is now (its lower layers complete)."""
        parent = validate_parent(parent)
        from graphdriver.archive.changes import changes_size, tree_size

        if parent is None:
            return tree_size(self._require(id) / "diff")
        diff, changes = self._native_changes(id)
        return changes_size(diff, changes)
