"""Change detection: which paths of a layer differ from its parent, and how many bytes they hold.

Two ways to get a layer's change list, both sorted by path (every parent before its children):

- :func:`changes_dirs` compares two complete trees, the layer's view and its parent's (the seed's
  naive ``ChangesDirs``, spec section 2.3). It costs a walk of both trees.
- :func:`changes_from_upper` reads an overlay upper dir (overlay2's ``diff/``) and looks up only the
  names it holds in the lower dirs: its cost is the size of the change, and its result is the list
  :func:`changes_dirs` gives for the mounted views of the same layer.

:func:`changes_size` and :func:`tree_size` measure changes and whole trees (spec 2.5, 2.6).

Walks use ``os.scandir`` on directory file descriptors, each subdirectory opened with
``O_NOFOLLOW`` relative to its parent, and ``lstat``: no symlink is ever followed, and a tree may be
deeper than ``PATH_MAX``. Attributes of an entry are read through ``/proc/self/fd/<dir fd>/<name>``,
which resolves the parent by descriptor and does not follow the last component. A file that
vanishes or changes type while a live tree is walked is skipped, not an error.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphdriver.archive.types import Change, ChangeKind
from graphdriver.errors import ArchiveError, GraphDriverError, InvalidArgument, NotFound, PermissionDenied

__all__ = ["changes_dirs", "changes_from_upper", "changes_size", "read_xattrs", "tree_size"]

OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
"""Overlay's private attributes: never compared, never exported (they describe the upper dir)."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_GONE = frozenset((errno.ENOENT, errno.ENOTDIR, errno.ELOOP))
_NO_XATTR = frozenset((errno.ENOTSUP, errno.ENODATA, errno.ENOENT, errno.ENOTDIR, errno.ELOOP))
_PROC_FD = "/proc/self/fd/" if os.path.isdir("/proc/self/fd") else None
_NS = 1_000_000_000

_ADD = ChangeKind.ADD
_MODIFY = ChangeKind.MODIFY
_DELETE = ChangeKind.DELETE


# -- small helpers shared with export -----------------------------------------------------------


def read_xattrs(path: str | int, *, keep_overlay: bool = False) -> dict[str, bytes]:
    """All extended attributes of ``path`` (not following a final symlink) or of an open fd.

    One ``listxattr`` call for an entry without attributes; overlay's own attributes
    (``trusted.overlay.*``, ``user.overlay.*``) are left out unless ``keep_overlay``. A filesystem
    without xattr support, or an entry that vanished, gives ``{}``.
    """
    follow = isinstance(path, int)
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in _NO_XATTR:
            return {}
        raise
    found: dict[str, bytes] = {}
    for name in names:
        if not keep_overlay and name.startswith(OVERLAY_XATTR_PREFIXES):
            continue
        try:
            found[name] = os.getxattr(path, name, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno in _NO_XATTR:
                continue
            raise
    return found


def same_mtime(a_ns: int, b_ns: int) -> bool:
    """The seed's ``sameFsTimeSpec``: seconds equal, nanoseconds equal or either side 0.

    The wildcard exists because whole-second tars (GNU tar's default ustar output, the seed's Go
    writer) store no sub-second time: a file extracted from such a tar has nsec=0 and must still
    compare equal to its nanosecond-precise original, or every file of a layer applied from such a
    tar would show as modified.
    """
    if a_ns == b_ns:
        return True
    a_sec, a_nsec = divmod(a_ns, _NS)
    b_sec, b_nsec = divmod(b_ns, _NS)
    return a_sec == b_sec and (a_nsec == 0 or b_nsec == 0)


def _stat_differs(new: os.stat_result, old: os.stat_result) -> bool:
    return (
        new.st_mode != old.st_mode
        or new.st_uid != old.st_uid
        or new.st_gid != old.st_gid
        or new.st_rdev != old.st_rdev
        or (new.st_size != old.st_size and not stat.S_ISDIR(new.st_mode))
        or not same_mtime(new.st_mtime_ns, old.st_mtime_ns)
    )


def _differs(new: os.stat_result, new_path: str, old: os.stat_result, old_path: str) -> bool:
    """Whether an entry present in both trees changed (cheap checks first)."""
    if _stat_differs(new, old):
        return True
    if stat.S_ISLNK(new.st_mode):
        try:
            if os.readlink(new_path) != os.readlink(old_path):
                return True
        except OSError as exc:
            if exc.errno not in _GONE | {errno.EINVAL}:
                raise
            return True
    return read_xattrs(new_path) != read_xattrs(old_path)


def _open_root(path: Path | str, what: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{what} {os.fspath(path)!r} does not exist") from None
    except NotADirectoryError:
        raise InvalidArgument(f"{what} {os.fspath(path)!r} is not a directory") from None
    except PermissionError as exc:
        raise PermissionDenied(f"cannot open {what} {os.fspath(path)!r}: {exc.strerror}") from None


def _open_subdir(dir_fd: int, name: str) -> int | None:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in _GONE:
            return None
        raise


def _base(fd: int, path: str) -> str:
    """A path prefix that names entries of the open directory ``fd`` without re-resolving it."""
    if _PROC_FD is not None:
        return f"{_PROC_FD}{fd}/"
    return path + "/"


def _wrap_os_error(exc: OSError, what: str) -> GraphDriverError:
    if isinstance(exc, PermissionError):
        return PermissionDenied(f"{what}: {exc}")
    return ArchiveError(f"{what}: {exc}")


# -- the walk engine ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Dir:
    """One directory being walked: its fd, and the counterpart in the old tree if any."""

    fd: int
    path: str
    rel: str  # "" for the root, "/a/b" below it
    old_fd: int | None = None
    old_path: str = ""
    extra: Any = None

    @property
    def base(self) -> str:
        return _base(self.fd, self.path)

    @property
    def old_base(self) -> str:
        assert self.old_fd is not None
        return _base(self.old_fd, self.old_path)


_Child = tuple[str, bool, Any]  # (name, descend into the old tree's dir of that name, extra)


def _close(d: _Dir) -> None:
    os.close(d.fd)
    if d.old_fd is not None:
        os.close(d.old_fd)


def _walk(top: _Dir, scan: Callable[[_Dir], Iterable[_Child]]) -> None:
    """Depth-first: ``scan`` lists one directory and returns the subdirectories to enter.

    Open descriptors are those of the current path only (two per level with an old tree).
    """
    stack: list[tuple[_Dir, Any, bool]] = [(top, iter(scan(top)), False)]
    try:
        while stack:
            d, children, owned = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                if owned:
                    _close(d)
                continue
            name, descend_old, extra = child
            fd = _open_subdir(d.fd, name)
            if fd is None:
                continue
            old_fd = None
            if descend_old and d.old_fd is not None:
                old_fd = _open_subdir(d.old_fd, name)
            sub = _Dir(
                fd,
                f"{d.path}/{name}",
                f"{d.rel}/{name}",
                old_fd,
                f"{d.old_path}/{name}" if old_fd is not None else "",
                extra,
            )
            try:
                listed = iter(scan(sub))
            except BaseException:
                _close(sub)
                raise
            stack.append((sub, listed, True))
    finally:
        for d, _, owned in stack:
            if owned:
                _close(d)


def _scandir(fd: int) -> list[os.DirEntry[str]]:
    try:
        return list(os.scandir(fd))
    except OSError as exc:
        if exc.errno in _GONE:
            return []
        raise


def _finish(found: dict[str, ChangeKind]) -> list[Change]:
    """Insert a Modify for every unlisted parent of a change (not "/"), then sort by path."""
    for path in list(found):
        parent = path.rpartition("/")[0]
        while parent and parent not in found:
            found[parent] = _MODIFY
            parent = parent.rpartition("/")[0]
    return [Change(path, found[path]) for path in sorted(found)]


# -- changes_dirs -------------------------------------------------------------------------------


def changes_dirs(new: Path, old: Path | None) -> list[Change]:
    """The changes that turn tree ``old`` into tree ``new`` (``old=None``: everything is Add).

    The seed's naive comparison (spec 2.3). An entry present in both trees is Modify when any of
    these differ: the full ``st_mode`` (so a type change counts), uid, gid, rdev, size (not for
    directories), mtime (:func:`same_mtime`), any extended attribute except overlay's own, or a
    symlink's target. Inode, nlink, ctime and atime are not compared: they change on every copy.
    An entry missing from ``old`` is Add, and so is everything below it. An entry missing from
    ``new`` is one Delete (nothing is listed below it); a directory replaced by a non-directory is
    a single Modify. When anything inside a directory changed and the directory itself did not,
    a Modify for the directory is inserted, so an export carries its metadata.

    The root is never listed, also not when ``old`` is None: the seed listed ``A /`` there, which
    exports as nothing useful and makes the two cases differ for no reason.

    Returns:
        The changes sorted by path; paths are absolute (``/etc/passwd``).

    Raises:
        NotFound / InvalidArgument: a root that is missing or not a directory.
        ArchiveError / PermissionDenied: a directory that cannot be read.
    """
    found: dict[str, ChangeKind] = {}
    new_fd = _open_root(new, "tree")
    try:
        old_fd = _open_root(old, "parent tree") if old is not None else None
        top = _Dir(new_fd, os.fspath(new), "", old_fd, os.fspath(old) if old is not None else "")
        try:
            _walk(top, lambda d: _scan_pair(d, found))
        finally:
            if old_fd is not None:
                os.close(old_fd)
    except OSError as exc:
        raise _wrap_os_error(exc, f"cannot compare {os.fspath(new)!r} with {old!s}") from exc
    finally:
        os.close(new_fd)
    return _finish(found)


def _scan_pair(d: _Dir, found: dict[str, ChangeKind]) -> list[_Child]:
    subdirs: list[_Child] = []
    rel = d.rel
    entries = _scandir(d.fd)
    if d.old_fd is None:
        # a new subtree: every entry is Add, and only the names are needed (d_type, no stat)
        for entry in entries:
            found[f"{rel}/{entry.name}"] = _ADD
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append((entry.name, False, None))
            except OSError as exc:
                if exc.errno not in _GONE:
                    raise
        return subdirs

    old_entries = {entry.name: entry for entry in _scandir(d.old_fd)}
    old_get = old_entries.get
    new_base, old_base = d.base, d.old_base
    present: set[str] = set()
    for entry in entries:
        name = entry.name
        present.add(name)
        old_entry = old_get(name)
        if old_entry is None:
            # new here: the type from d_type is all that is needed
            found[f"{rel}/{name}"] = _ADD
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append((name, False, None))
            except OSError as exc:
                if exc.errno not in _GONE:
                    raise
            continue
        try:
            new_st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            if exc.errno in _GONE:
                present.discard(name)
                continue
            raise
        try:
            old_st = old_entry.stat(follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
            old_st = None
        is_dir = stat.S_ISDIR(new_st.st_mode)
        if old_st is None:
            found[f"{rel}/{name}"] = _ADD
            if is_dir:
                subdirs.append((name, False, None))
            continue
        if (new_st.st_ino != old_st.st_ino or new_st.st_dev != old_st.st_dev) and _differs(
            new_st, new_base + name, old_st, old_base + name
        ):
            found[f"{rel}/{name}"] = _MODIFY
        if is_dir:
            subdirs.append((name, stat.S_ISDIR(old_st.st_mode), None))
    for name in old_entries:
        if name not in present:
            found[f"{rel}/{name}"] = _DELETE
    return subdirs


# -- changes_from_upper -------------------------------------------------------------------------


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _special(entry: os.DirEntry[str]) -> bool:
    """Neither file, dir nor symlink (by d_type, no stat): a device, FIFO or socket."""
    return not (
        entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False) or entry.is_symlink()
    )


@dataclass(slots=True)
class _LowerView:
    """The parent's merged view of one directory: the lower dirs merged there, top-most first.

    ``merged`` says whether the layer's own merged view of the directory also shows these lower
    dirs (no opaque upper dir, no type change on the way down); when it does not, every name
    visible here that the upper dir lacks was deleted.
    """

    stack: list[str]
    merged: bool


class _UpperScan:
    def __init__(self, opaque_xattr: str, found: dict[str, ChangeKind]) -> None:
        self.opaque_xattr = opaque_xattr
        self.found = found

    def is_opaque(self, path: str) -> bool:
        try:
            return os.getxattr(path, self.opaque_xattr, follow_symlinks=False) == b"y"
        except OSError as exc:
            if exc.errno in _NO_XATTR:
                return False
            raise

    @staticmethod
    def lookup(stack: Sequence[str], name: str) -> tuple[int, os.stat_result, str] | None:
        """The entry ``name`` as the lower dirs show it: (layer index, lstat, path), or None."""
        for i, lower in enumerate(stack):
            path = f"{lower}/{name}"
            try:
                st = os.lstat(path)
            except OSError as exc:
                if exc.errno in _GONE:
                    continue
                raise
            return None if _is_whiteout(st) else (i, st, path)
        return None

    def dir_stack(self, stack: Sequence[str], index: int, name: str, first: str) -> list[str]:
        """The lower dirs merged at ``name``, as overlayfs's lookup builds them.

        The top-most hit is a directory; lower layers join while they hold a directory there,
        and the merge stops at a whiteout, a non-directory, or after an opaque directory.
        """
        merged = [first]
        if self.is_opaque(first):
            return merged
        for lower in stack[index + 1 :]:
            path = f"{lower}/{name}"
            try:
                st = os.lstat(path)
            except OSError as exc:
                if exc.errno in _GONE:
                    continue
                raise
            if not stat.S_ISDIR(st.st_mode):
                break
            merged.append(path)
            if self.is_opaque(path):
                break
        return merged

    @staticmethod
    def visible_names(stack: Sequence[str]) -> list[str]:
        """Names a merged directory of the lower dirs lists (whiteouts hide lower names)."""
        seen: set[str] = set()
        visible: list[str] = []
        for lower in stack:
            try:
                entries = list(os.scandir(lower))
            except OSError as exc:
                if exc.errno in _GONE:
                    continue
                raise
            for entry in entries:
                name = entry.name
                if name in seen:
                    continue
                seen.add(name)
                if _special(entry) and _is_whiteout(entry.stat(follow_symlinks=False)):
                    continue
                visible.append(name)
        return visible

    def __call__(self, d: _Dir) -> list[_Child]:
        view: _LowerView = d.extra
        found = self.found
        rel, base = d.rel, d.base
        subdirs: list[_Child] = []
        present: set[str] = set()
        whiteouts: list[str] = []
        for entry in _scandir(d.fd):
            name = entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                if exc.errno in _GONE:
                    continue
                raise
            if _is_whiteout(st):
                whiteouts.append(name)
                continue
            present.add(name)
            hit = self.lookup(view.stack, name) if view.stack else None
            if hit is None:
                found[f"{rel}/{name}"] = _ADD
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append((name, False, _LowerView([], False)))
                continue
            index, old_st, old_path = hit
            if _differs(st, base + name, old_st, old_path):
                found[f"{rel}/{name}"] = _MODIFY
            if stat.S_ISDIR(st.st_mode):
                if stat.S_ISDIR(old_st.st_mode):
                    child = self.dir_stack(view.stack, index, name, old_path)
                    merged = view.merged and not self.is_opaque(base + name)
                    subdirs.append((name, False, _LowerView(child, merged)))
                else:
                    subdirs.append((name, False, _LowerView([], False)))
        if view.stack:
            if view.merged:
                for name in whiteouts:
                    if self.lookup(view.stack, name) is not None:
                        found[f"{rel}/{name}"] = _DELETE
            else:
                for name in self.visible_names(view.stack):
                    if name not in present:
                        found[f"{rel}/{name}"] = _DELETE
        return subdirs


def changes_from_upper(
    upper: Path, lowers: Sequence[Path], *, xattr_prefix: str = "trusted."
) -> list[Change]:
    """The changes of an overlay layer, read from its upper dir and looked up in its lower dirs.

    ``lowers`` are the parent's layer dirs, top-most first (the order of overlay's ``lowerdir=``).
    In the upper dir a 0/0 character device is a whiteout and a directory with
    ``<xattr_prefix>overlay.opaque=y`` hides everything below it in the lowers.

    The result is exactly ``changes_dirs(merged, parent_merged)`` for the mounted views of the same
    layer on a kernel without ``redirect_dir`` or ``metacopy``; it is computed by walking the
    upper dir only and looking its names up in the lowers the way overlayfs does:

    - an upper entry hidden from the lowers (not there, or behind a whiteout or an opaque dir) is
      Add, and so is everything below it;
    - an upper entry the lowers show is compared with that lower entry by the rules of
      :func:`changes_dirs`, so a file that was only copied up (opened for writing, ``chmod`` to
      its own mode) is not listed, exactly as the two-tree comparison does not list it;
    - a whiteout is a Delete when the lowers show the name (a whiteout of a name no lower holds
      changes nothing in the merged view);
    - an opaque dir that the lowers show is compared like any dir, and every name the lowers show
      in it that the upper dir lacks is a Delete; a dir that replaced a lower non-directory
      likewise;
    - a directory with changed content gets a Modify, as in :func:`changes_dirs`.

    Opaque markers on the layer roots are ignored, as overlayfs ignores them: the mount's root
    always merges every layer.

    Raises:
        NotFound / InvalidArgument: ``upper`` or a lower that is missing or not a directory.
    """
    opaque_xattr = xattr_prefix + "overlay.opaque"
    stack = []
    for lower in lowers:
        fd = _open_root(lower, "lower dir")
        os.close(fd)
        stack.append(os.fspath(lower).rstrip("/") or "/")
    found: dict[str, ChangeKind] = {}
    upper_fd = _open_root(upper, "upper dir")
    try:
        top = _Dir(upper_fd, os.fspath(upper), "", extra=_LowerView(stack, True))
        _walk(top, _UpperScan(opaque_xattr, found))
    except OSError as exc:
        raise _wrap_os_error(exc, f"cannot read the changes of {os.fspath(upper)!r}") from exc
    finally:
        os.close(upper_fd)
    return _finish(found)


# -- sizes --------------------------------------------------------------------------------------


def changes_size(root: Path, changes: Sequence[Change]) -> int:
    """Bytes the changes add: the sum of ``lstat`` sizes of non-directory Add/Modify entries.

    As the seed (spec 2.5): a symlink counts its target's length, devices and FIFOs 0, Deletes 0;
    hard links are not de-duplicated, and entries that cannot be stat'ed count 0.
    """
    base = os.fspath(root)
    total = 0
    for change in changes:
        if change.kind is ChangeKind.DELETE:
            continue
        try:
            st = os.lstat(os.path.join(base, change.path.lstrip("/")))
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            total += st.st_size
    return total


def tree_size(root: Path) -> int:
    """Bytes of a whole tree: the sum of ``lstat`` sizes of its non-directory entries.

    As the seed (spec 2.6), but a file with several hard links counts once, keyed by
    ``(st_dev, st_ino)`` (the seed keyed by inode only, wrong across mount points).
    """
    total = 0
    linked: set[tuple[int, int]] = set()

    def scan(d: _Dir) -> list[_Child]:
        nonlocal total
        subdirs: list[_Child] = []
        for entry in _scandir(d.fd):
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                if exc.errno in _GONE:
                    continue
                raise
            if stat.S_ISDIR(st.st_mode):
                subdirs.append((entry.name, False, None))
                continue
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in linked:
                    continue
                linked.add(key)
            total += st.st_size
        return subdirs

    fd = _open_root(root, "tree")
    try:
        _walk(_Dir(fd, os.fspath(root), ""), scan)
    except OSError as exc:
        raise _wrap_os_error(exc, f"cannot measure {os.fspath(root)!r}") from exc
    finally:
        os.close(fd)
    return total
