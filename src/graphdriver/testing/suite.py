"""The conformance suite: what every driver must do, as one pytest class to subclass.

A driver opts in with a test class (the plugin :mod:`graphdriver.testing.plugin` must be
enabled, e.g. ``pytest_plugins = ["graphdriver.testing.plugin"]`` in ``conftest.py``)::

    from graphdriver.testing.suite import DriverConformance

    class TestMyDriverConformance(DriverConformance):
        driver_name = "mydriver"                 # looked up in the driver registry
        driver_options = {"size": "1G"}          # optional

        def make_driver(self, root):             # optional: e.g. a root on a btrfs loop mount
            ...

Every test gets a fresh driver on a fresh root (``gd_driver``); afterwards ``cleanup()`` runs
and no mount may be left under the root. Which cases apply is decided from the driver's
:class:`~graphdriver.drivers.base.Capabilities` (never from its name):

- ``requires_root`` drivers are skipped, with the reason, when not running as root;
- ``mounts``: nested get/put must mount once and unmount at the last put, counts must survive a
  new driver instance, and removing a mounted layer is :class:`~graphdriver.errors.Busy`
  (``counts_gets``: removing a gotten layer is Busy, mounted or not);
- ``max_depth``: the 128-, 200- and 500-deep chains run only when the driver allows them;
- ``preserves_ownership`` (and euid 0): owners, device nodes and ``security.capability`` are
  part of the trees; otherwise these cases skip with the reason, and files are expected to
  belong to the caller;
- ``writable_parents``: a layer with children may still be written and its children do not see it.
  Overlay-family drivers share the parent's files with the children, so the "parent writes"
  half of the isolation case is skipped for them.

The cases: the seed's three graphtest cases exactly (CreateEmpty, CreateBase, CreateSnap, spec
section 5), then what the seed never tested: isolation both ways, contents read back, nested
get/put, exists after remove, remove of a mounted layer, AlreadyExists / NotFound /
InvalidArgument, a diff -> apply_diff round trip of every file kind compared stat for stat, exact
change lists, diff_size, a whole base layer through diff(id, None), deep chains, and a layer of
10,000 files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import ClassVar

import pytest

from graphdriver.archive.types import Change, ChangeKind
from graphdriver.drivers.base import Driver
from graphdriver.errors import AlreadyExists, Busy, InvalidArgument, NotFound, NotSupported
from graphdriver.testing.plugin import DriverOpener
from graphdriver.testing.trees import (
    SAMPLE_CAPABILITY,
    Entry,
    diff_snapshots,
    make_sample_tree,
    snapshot_tree,
)

__all__ = ["INVALID_IDS", "DriverConformance"]

INVALID_IDS = (
    ".",
    "..",
    "../escape",
    "a/b",
    "/abs",
    ".hidden",
    "-dash",
    "a:b",
    "a,b",
    "a b",
    "a\nb",
    "a\x00b",
    "x" * 129,
)
"""Ids every driver must refuse with InvalidArgument (``""`` too, except as a parent: no parent)."""

T0 = 1_400_000_000_111_111_111
"""The fixed mtime of base trees in the change tests: any later write is a visible change."""


# -- helpers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _set_times(root: Path, ns: int) -> None:
    """Set every entry's atime and mtime below and including ``root`` to ``ns``, children first."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in [*filenames, *dirnames]:
            os.utime(os.path.join(dirpath, name), ns=(ns, ns), follow_symlinks=False)
    os.utime(root, ns=(ns, ns))


def _caller() -> tuple[int, int]:
    return os.geteuid(), os.getegid()


def _without_root_mtime(snap: dict[str, Entry]) -> dict[str, Entry]:
    """A layer tar has no entry for "/" in a diff against a parent, so its mtime is not carried."""
    out = dict(snap)
    out["/"] = dataclasses.replace(out["/"], mtime_ns=0)
    return out


def _is_mountpoint(path: Path) -> bool:
    from graphdriver.mount import is_mountpoint

    return is_mountpoint(path)


def _names(changes: list[Change]) -> list[str]:
    return [str(c) for c in changes]


# -- the suite ---------------------------------------------------------------------------------


class DriverConformance:
    """Subclass as ``Test...`` and set :attr:`driver_name` (module docstring)."""

    driver_name: ClassVar[str]
    """The registry name of the driver under test."""
    driver_options: ClassVar[Mapping[str, str]] = {}
    """Options passed to the driver's constructor."""

    # -- hooks ---------------------------------------------------------------------------------

    def make_driver(self, root: Path) -> Driver:
        """Open the driver for graph root ``root`` (its home is ``root/<name>``).

        Override for special roots (a btrfs loop mount). Skips the test, with the reason, when
        the driver needs root and this is not root, or when it raises NotSupported here.
        """
        from graphdriver.drivers.registry import driver_class

        try:
            cls = driver_class(self.driver_name)
        except NotSupported as exc:
            pytest.skip(f"driver {self.driver_name} unavailable: {exc.reason}")
        if cls.capabilities.requires_root and os.geteuid() != 0:
            pytest.skip(f"driver {self.driver_name} requires root (running as uid {os.geteuid()})")
        try:
            return cls(root / self.driver_name, dict(self.driver_options))
        except NotSupported as exc:
            pytest.skip(f"driver {self.driver_name} not supported here: {exc.reason}")

    def reopen_driver(self, driver: Driver) -> Driver:
        """A new instance on the same home (another process, in effect). Override if need be."""
        return type(driver)(driver.home, driver.options)

    # -- capability helpers ---------------------------------------------------------------------

    @staticmethod
    def privileged(driver: Driver) -> bool:
        """Whether owners, device nodes and security.capability can be part of the trees."""
        return os.geteuid() == 0 and driver.capabilities.preserves_ownership

    @classmethod
    def require_privileged(cls, driver: Driver, what: str) -> None:
        if not cls.privileged(driver):
            why = "not running as root" if os.geteuid() != 0 else "the driver does not preserve ownership"
            pytest.skip(f"needs root for {what}: {why} (uid {os.geteuid()})")

    @staticmethod
    def writable_parents(driver: Driver) -> bool:
        return driver.capabilities.writable_parents

    # -- the seed's graphtest cases (spec section 5), exactly --------------------------------------

    @staticmethod
    def _verify(
        path: Path, kind: int, perm: int, *, sticky: bool, setuid: bool, owner: tuple[int, int]
    ) -> None:
        st = os.stat(path)  # the seed's verifyFile follows symlinks
        assert stat.S_IFMT(st.st_mode) == kind, f"{path}: type {stat.S_IFMT(st.st_mode):o} != {kind:o}"
        assert st.st_mode & 0o777 == perm, f"{path}: perm {st.st_mode & 0o777:03o} != {perm:03o}"
        assert bool(st.st_mode & stat.S_ISVTX) == sticky, f"{path}: sticky bit"
        assert bool(st.st_mode & stat.S_ISUID) == setuid, f"{path}: setuid bit"
        assert not st.st_mode & stat.S_ISGID, f"{path}: setgid bit"
        assert (st.st_uid, st.st_gid) == owner, f"{path}: owner {st.st_uid}:{st.st_gid} != {owner}"

    def _create_base(self, driver: Driver, id: str) -> None:
        with _umask(0):
            driver.create(id, None)
            with driver.mounted(id) as root:
                os.mkdir(root / "a subdir", 0o705 | stat.S_ISVTX)
                if self.privileged(driver):
                    os.chown(root / "a subdir", 1, 2)
                fd = os.open(root / "a file", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o222 | stat.S_ISUID)
                try:
                    os.write(fd, b"Some data")
                    # an unprivileged write clears setuid (the seed ran as root, which keeps it)
                    os.fchmod(fd, 0o222 | stat.S_ISUID)
                finally:
                    os.close(fd)

    def _verify_base(self, driver: Driver, id: str) -> None:
        with driver.mounted(id) as root:
            owner = (1, 2) if self.privileged(driver) else _caller()
            self._verify(root / "a subdir", stat.S_IFDIR, 0o705, sticky=True, setuid=False, owner=owner)
            self._verify(root / "a file", stat.S_IFREG, 0o222, sticky=False, setuid=True, owner=_caller())
            assert len(os.listdir(root)) == 2

    def test_create_empty(self, gd_driver: Driver) -> None:
        d = gd_driver
        d.create("empty", None)
        assert d.exists("empty")
        root = d.get("empty")
        try:
            assert root.is_absolute()
            self._verify(root, stat.S_IFDIR, 0o755, sticky=False, setuid=False, owner=_caller())
            assert os.listdir(root) == []
        finally:
            d.put("empty")
        d.remove("empty")

    def test_create_base(self, gd_driver: Driver) -> None:
        self._create_base(gd_driver, "Base")
        self._verify_base(gd_driver, "Base")
        gd_driver.remove("Base")

    def test_create_snap(self, gd_driver: Driver) -> None:
        d = gd_driver
        self._create_base(d, "Base")
        d.create("Snap", "Base")
        self._verify_base(d, "Snap")
        d.remove("Snap")
        d.remove("Base")

    # -- snapshots: isolation and contents ------------------------------------------------------

    @staticmethod
    def _small_base(driver: Driver, id: str) -> None:
        driver.create(id, None)
        with driver.mounted(id) as root:
            _write(root / "f", b"parent\n")
            os.mkdir(root / "d")
            _write(root / "d" / "g", b"g\n")
            _set_times(root, T0)

    def test_child_writes_do_not_reach_the_parent(self, gd_driver: Driver) -> None:
        d = gd_driver
        self._small_base(d, "parent")
        with d.mounted("parent") as root:
            before = snapshot_tree(root)
        d.create("child", "parent")
        with d.mounted("child") as root:
            assert diff_snapshots(before, snapshot_tree(root)) == []
            _write(root / "f", b"child wrote this\n")
            _write(root / "new", b"new\n")
            os.unlink(root / "d" / "g")
            os.chmod(root / "d", 0o700)
        with d.mounted("parent") as root:
            assert diff_snapshots(before, snapshot_tree(root)) == []
        with d.mounted("child") as root:
            assert (root / "f").read_bytes() == b"child wrote this\n"
            assert sorted(os.listdir(root)) == ["d", "f", "new"]
            assert os.listdir(root / "d") == []

    def test_parent_writes_do_not_reach_the_child(self, gd_driver: Driver) -> None:
        d = gd_driver
        if not self.writable_parents(d):
            pytest.skip("a layer with children shares its files with them (capability writable_parents)")
        self._small_base(d, "parent")
        d.create("child", "parent")
        with d.mounted("child") as root:
            before = snapshot_tree(root)
        with d.mounted("parent") as root:
            _write(root / "f", b"parent changed after the snapshot\n")
            _write(root / "later", b"later\n")
            os.unlink(root / "d" / "g")
        with d.mounted("child") as root:
            assert diff_snapshots(before, snapshot_tree(root)) == []

    def test_contents_read_back(self, gd_driver: Driver) -> None:
        d = gd_driver
        blobs = {
            "empty": b"",
            "one": b"\x00",
            "page-1": bytes(range(256)) * 15 + bytes(255),
            "page": hashlib.sha256(b"x").digest() * 128,
            "big": b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(40_000)) + b"tail",
        }
        d.create("base", None)
        with d.mounted("base") as root:
            for name, data in blobs.items():
                _write(root / name, data)
        with d.mounted("base") as root:
            assert {n: (root / n).read_bytes() for n in blobs} == blobs
        d.create("child", "base")
        with d.mounted("child") as root:
            assert {n: (root / n).read_bytes() for n in blobs} == blobs
            with open(root / "big", "r+b") as f:  # rewrite in place, in the middle
                f.seek(1_000_000)
                f.write(b"CHILD")
        with d.mounted("child") as root:
            big = (root / "big").read_bytes()
            assert big[1_000_000:1_000_005] == b"CHILD" and len(big) == len(blobs["big"])
        with d.mounted("base") as root:
            assert (root / "big").read_bytes() == blobs["big"]

    # -- get / put --------------------------------------------------------------------------------

    def test_nested_get_put(self, gd_driver: Driver, gd_open: DriverOpener) -> None:
        d = gd_driver
        self._small_base(d, "base")
        d.create("layer", "base")
        first = d.get("layer")
        second = d.get("layer")
        assert first == second
        assert (first / "f").read_bytes() == b"parent\n"
        d.put("layer")
        if d.capabilities.mounts:
            assert _is_mountpoint(first), "unmounted while one get was still outstanding"
        assert (first / "f").read_bytes() == b"parent\n"
        # the remaining count is on disk: another instance (process) releases it
        other = gd_open(reopen=d)
        other.put("layer")
        if d.capabilities.mounts:
            assert not _is_mountpoint(first), "still mounted after the last put"
        again = other.get("layer")
        try:
            assert (again / "d" / "g").read_bytes() == b"g\n"
        finally:
            other.put("layer")
        if d.capabilities.mounts:
            assert not _is_mountpoint(again)

    # -- remove, exists, errors -------------------------------------------------------------------

    def test_exists_after_remove(self, gd_driver: Driver) -> None:
        d = gd_driver
        d.create("gone", None)
        assert d.exists("gone")
        d.remove("gone")
        assert not d.exists("gone")
        with pytest.raises(NotFound):
            d.remove("gone")
        with pytest.raises(NotFound):
            d.get("gone")
        with pytest.raises(NotFound):
            d.create("child", "gone")
        d.create("gone", None)  # the id can be used again
        assert d.exists("gone")

    def test_remove_mounted(self, gd_driver: Driver) -> None:
        d = gd_driver
        self._small_base(d, "base")
        d.create("layer", "base")
        root = d.get("layer")
        if d.capabilities.mounts or d.capabilities.counts_gets:
            try:
                with pytest.raises(Busy):
                    d.remove("layer")
                assert d.exists("layer")
                assert (root / "f").read_bytes() == b"parent\n"
            finally:
                d.put("layer")
        d.remove("layer")
        assert not d.exists("layer")
        assert d.exists("base")

    def test_create_existing_id(self, gd_driver: Driver) -> None:
        d = gd_driver
        self._small_base(d, "x")
        d.create("other", None)
        with pytest.raises(AlreadyExists):
            d.create("x", None)
        with pytest.raises(AlreadyExists):
            d.create("x", "other")
        with d.mounted("x") as root:
            assert (root / "f").read_bytes() == b"parent\n"

    def test_create_on_unknown_parent(self, gd_driver: Driver) -> None:
        with pytest.raises(NotFound):
            gd_driver.create("orphan", "no-such-parent")
        assert not gd_driver.exists("orphan")

    @pytest.mark.parametrize("bad", INVALID_IDS, ids=[repr(b)[1:-1][:20] for b in INVALID_IDS])
    def test_invalid_ids(self, gd_driver: Driver, bad: str) -> None:
        d = gd_driver
        d.create("ok", None)
        for call in (
            lambda: d.create(bad, None),
            lambda: d.create("fine", bad),
            lambda: d.get(bad),
            lambda: d.put(bad),
            lambda: d.remove(bad),
            lambda: d.exists(bad),
        ):
            with pytest.raises(InvalidArgument):
                call()
        with pytest.raises(InvalidArgument):
            d.create("", None)
        assert not d.exists("fine")
        assert sorted(os.listdir(d.get("ok"))) == []
        d.put("ok")

    def test_status_and_cleanup(self, gd_driver: Driver) -> None:
        d = gd_driver
        self._small_base(d, "base")
        d.create("layer", "base")
        with d.mounted("layer"):
            status = d.status()
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in status)
        d.cleanup()
        d.cleanup()

    # -- diff / changes / apply -------------------------------------------------------------------

    @staticmethod
    def _round_trip_changes(root: Path, privileged: bool) -> None:
        """Every kind of change onto a sample tree (see :func:`make_sample_tree`)."""
        with _umask(0):
            os.mkdir(root / "new", 0o755)
            _write(root / "new" / "file", b"new content\n", 0o640)
            _write(root / "new" / "h1", b"hard linked\n", 0o644)
            os.link(root / "new" / "h1", root / "new" / "h2")
            os.symlink("../etc/passwd", root / "new" / "sym")
            os.symlink("/absolute/dangling", root / "new" / "dangling")
            os.mkfifo(root / "new" / "fifo", 0o600)
            _write(root / "new" / "suid", b"#!/bin/true\n", 0o4755)
            os.setxattr(root / "new" / "file", "user.k", b"v1")
            os.setxattr(root / "new", "user.dir", b"d")
            if privileged:
                os.mknod(root / "new" / "zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
                os.mknod(root / "new" / "sda", 0o660 | stat.S_IFBLK, os.makedev(8, 0))
                _write(root / "new" / "cap", b"cap\n", 0o755)
                os.setxattr(root / "new" / "cap", "security.capability", SAMPLE_CAPABILITY)
                os.chown(root / "new" / "file", 1000, 1001)
                os.chown(root / "new" / "sym", 7, 8, follow_symlinks=False)
                os.chown(root / "bin" / "tool", 2, 2)
                os.chmod(root / "bin" / "tool", 0o4755)
            _write(root / "etc" / "passwd", b"root:x:0:0::/root:/bin/bash\nuser:x:1000:1000::/home:/bin/sh\n")
            os.chmod(root / "etc" / "write-only", 0o600)  # metadata only
            os.unlink(root / "data" / "big")  # deletions: a file, a directory tree
            for dirpath, _, filenames in os.walk(root / "a" / "b" / "c" / "d", topdown=False):
                for name in filenames:
                    os.unlink(os.path.join(dirpath, name))
                os.rmdir(dirpath)
            for name in os.listdir(root / "shared"):  # opaque replacement of a directory
                os.unlink(root / "shared" / name)
            os.rmdir(root / "shared")
            os.mkdir(root / "shared", 0o750)
            _write(root / "shared" / "only-new", b"only this\n")
            os.unlink(root / "fifo")  # type changes: fifo -> file, symlink -> directory
            _write(root / "fifo", b"now a file\n")
            os.unlink(root / "link-dir")
            os.mkdir(root / "link-dir", 0o700)
            _write(root / "link-dir" / "inside", b"inside\n")
        stamp = 1_700_000_000_000_000_001
        for rel in ("new/file", "new/h1", "new/suid", "new/sym", "new/fifo", "shared/only-new", "fifo"):
            stamp += 1_000_003
            os.utime(root / rel, ns=(stamp, stamp), follow_symlinks=False)
        os.utime(root / "new", ns=(stamp + 7, stamp + 123_456_789))

    def _diff_to_file(self, driver: Driver, id: str, parent: str | None, tmp: Path) -> Path:
        out = tmp / f"{id}.tar"
        with driver.diff(id, parent) as stream, open(out, "wb") as f:
            while chunk := stream.read(1 << 20):
                f.write(chunk)
        return out

    @pytest.mark.parametrize("kinds", ["unprivileged", "privileged"], ids=["any-user", "root-only-kinds"])
    def test_diff_apply_round_trip(self, gd_driver: Driver, tmp_path: Path, kinds: str) -> None:
        d = gd_driver
        privileged = kinds == "privileged"
        if privileged:
            self.require_privileged(d, "device nodes, security.capability and other owners")
        d.create("base", None)
        with d.mounted("base") as root:
            make_sample_tree(root, privileged=privileged)
        d.create("layer", "base")
        with d.mounted("layer") as root:
            self._round_trip_changes(root, privileged)
        tar = self._diff_to_file(d, "layer", "base", tmp_path)
        d.create("applied", "base")
        with open(tar, "rb") as f:
            size = d.apply_diff("applied", "base", f)
        with d.mounted("layer") as root:
            want = snapshot_tree(root)
        with d.mounted("applied") as root:
            got = snapshot_tree(root)
        assert diff_snapshots(_without_root_mtime(want), _without_root_mtime(got)) == []
        assert size == d.diff_size("layer", "base")
        assert d.changes("applied", "base") == d.changes("layer", "base")

    def test_diff_is_deterministic(self, gd_driver: Driver, tmp_path: Path) -> None:
        d = gd_driver
        d.create("base", None)
        with d.mounted("base") as root:
            make_sample_tree(root, privileged=self.privileged(d))
        d.create("layer", "base")
        with d.mounted("layer") as root:
            self._round_trip_changes(root, self.privileged(d))
        (tmp_path / "1").mkdir()
        (tmp_path / "2").mkdir()
        first = self._diff_to_file(d, "layer", "base", tmp_path / "1").read_bytes()
        second = self._diff_to_file(d, "layer", "base", tmp_path / "2").read_bytes()
        assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()

    @staticmethod
    def _changes_base(driver: Driver, id: str) -> None:
        driver.create(id, None)
        with driver.mounted(id) as root, _umask(0o022):
            for name in ("d", "f", "h"):
                os.mkdir(root / name, 0o755)
            for rel, data in {
                "a": b"a",
                "b": b"b",
                "c": b"c",
                "d/x": b"x",
                "d/y": b"y",
                "e": b"e",
                "f/g": b"g1",
                "h/i": b"i",
                "j": b"j",
                "k": b"k",
            }.items():
                _write(root / rel, data)
            _set_times(root, T0)

    def _changes_layer(self, driver: Driver, id: str, parent: str) -> None:
        driver.create(id, parent)
        with driver.mounted(id) as root, _umask(0o022):
            _write(root / "new", b"new file\n")  # add
            _write(root / "a", b"a-modified")  # modify (size and mtime)
            os.unlink(root / "b")  # delete
            os.chmod(root / "c", 0o600)  # metadata only
            os.unlink(root / "e")  # type change: file -> directory
            os.mkdir(root / "e", 0o755)
            _write(root / "e" / "inside", b"inside")
            os.unlink(root / "d" / "x")  # opaque: the directory deleted and made anew
            os.unlink(root / "d" / "y")
            os.rmdir(root / "d")
            os.mkdir(root / "d", 0o755)
            _write(root / "d" / "z", b"zz")
            _write(root / "f" / "g", b"g2")  # same size, new mtime; /f itself unchanged
            os.unlink(root / "h" / "i")  # type change: directory -> symlink
            os.rmdir(root / "h")
            os.symlink("a", root / "h")
            os.setxattr(root / "k", "user.note", b"xattr only")  # no mtime change
            if self.privileged(driver):
                os.chown(root / "j", 1, 1)

    def _expected_changes(self, driver: Driver) -> list[str]:
        expected = [
            "C /a",
            "D /b",
            "C /c",
            "C /d",
            "D /d/x",
            "D /d/y",
            "A /d/z",
            "C /e",
            "A /e/inside",
            "C /f",
            "C /f/g",
            "C /h",
            "C /k",
            "A /new",
        ]
        if self.privileged(driver):
            expected.insert(expected.index("C /k"), "C /j")
        return expected

    def test_changes(self, gd_driver: Driver) -> None:
        d = gd_driver
        self._changes_base(d, "base")
        self._changes_layer(d, "layer", "base")
        assert _names(d.changes("layer", "base")) == self._expected_changes(d)
        expected_base = ["A /a", "A /b", "A /c", "A /d", "A /d/x", "A /d/y", "A /e", "A /f", "A /f/g"]
        expected_base += ["A /h", "A /h/i", "A /j", "A /k"]
        assert _names(d.changes("base", None)) == expected_base
        d.create("same", "base")
        assert d.changes("same", "base") == []

    def test_diff_size(self, gd_driver: Driver, tmp_path: Path) -> None:
        d = gd_driver
        self._changes_base(d, "base")
        self._changes_layer(d, "layer", "base")
        # a-modified 10, c 1, d/z 2, e/inside 6, f/g 2, h -> "a" 1, k 1, new 9 (+ j 1 as root)
        expected = 32 + (1 if self.privileged(d) else 0)
        assert d.diff_size("layer", "base") == expected
        with d.mounted("layer") as root:
            summed = sum(
                os.lstat(f"{root}{c.path}").st_size
                for c in d.changes("layer", "base")
                if c.kind is not ChangeKind.DELETE and not stat.S_ISDIR(os.lstat(f"{root}{c.path}").st_mode)
            )
        assert summed == expected
        tar = self._diff_to_file(d, "layer", "base", tmp_path)
        d.create("applied", "base")
        with open(tar, "rb") as f:
            assert d.apply_diff("applied", "base", f) == expected

    def test_whole_base_layer_into_an_empty_layer(self, gd_driver: Driver, tmp_path: Path) -> None:
        d = gd_driver
        d.create("base", None)
        with d.mounted("base") as root:
            make_sample_tree(root, privileged=self.privileged(d))
        tar = self._diff_to_file(d, "base", None, tmp_path)
        d.create("restored", None)
        with open(tar, "rb") as f:
            size = d.apply_diff("restored", None, f)
        with d.mounted("base") as root:
            want = snapshot_tree(root)
        with d.mounted("restored") as root:
            got = snapshot_tree(root)
        assert diff_snapshots(_without_root_mtime(want), _without_root_mtime(got)) == []
        seen: set[str] = set()
        tree_size = 0
        for entry in want.values():  # the seed's TreeSize: non-directories, hard links once
            if entry.type == "dir" or (entry.link_group is not None and entry.link_group in seen):
                continue
            if entry.link_group is not None:
                seen.add(entry.link_group)
            tree_size += entry.size
        assert size == tree_size

    def test_child_tar_through_the_parents_symlinks(self, gd_driver: Driver) -> None:
        """A child layer tar without entries for its parent directories, whose paths go through
        the parent's symlinks (a merged /usr: ``lib -> usr/lib``): files, a whiteout and an
        opaque marker below them, and a hard link to a parent's file. Every driver gives the
        view of the tar applied onto a copy of the parent (overlay2, which applies natively into
        the child's own dir, copies the directories up), and the same changes and size."""
        from io import BytesIO

        from graphdriver.testing.tarbuild import TarBuilder

        d = gd_driver
        privileged = self.privileged(d)
        d.create("base", None)
        with d.mounted("base") as root:
            for sub in ("usr", "usr/lib", "usr/bin", "usr/share"):
                (root / sub).mkdir()
            os.chmod(root / "usr/lib", 0o750)
            if privileged:
                os.chown(root / "usr/lib", 5, 6)
            _write(root / "usr/lib/old", b"old")
            _write(root / "usr/lib/keep", b"keep")
            _write(root / "usr/bin/sh", b"sh", 0o755)
            _write(root / "usr/share/doc", b"doc")
            for name in ("lib", "bin", "share"):
                os.symlink(f"usr/{name}", root / name)
            _set_times(root, 1_600_000_000_123_456_789)
        d.create("child", "base")
        tar = (
            TarBuilder()
            .file("lib/systemd/unit", b"u")
            .whiteout("lib/old")
            .opaque("share")
            .file("share/new", b"new")
            .hardlink("bin/sh2", "bin/sh")
            .build()
        )
        assert d.apply_diff("child", "base", BytesIO(tar)) == 6
        assert d.diff_size("child", "base") == 6
        assert _names(d.changes("child", "base")) == [
            "C /usr",
            "C /usr/bin",
            "A /usr/bin/sh2",
            "C /usr/lib",
            "D /usr/lib/old",
            "A /usr/lib/systemd",
            "A /usr/lib/systemd/unit",
            "C /usr/share",
            "D /usr/share/doc",
            "A /usr/share/new",
        ]
        with d.mounted("child") as root:
            snap = snapshot_tree(root)
        view = {
            path: (e.type, e.target or (e.sha256 and e.sha256[:8]), e.link_group)
            for path, e in snap.items()
            if path != "/"
        }
        digest = {data: hashlib.sha256(data).hexdigest()[:8] for data in (b"keep", b"u", b"sh", b"new")}
        assert view == {
            "/bin": ("symlink", "usr/bin", None),
            "/lib": ("symlink", "usr/lib", None),
            "/share": ("symlink", "usr/share", None),
            "/usr": ("dir", None, None),
            "/usr/bin": ("dir", None, None),
            "/usr/bin/sh": ("file", digest[b"sh"], "/usr/bin/sh"),
            "/usr/bin/sh2": ("file", digest[b"sh"], "/usr/bin/sh"),
            "/usr/lib": ("dir", None, None),
            "/usr/lib/keep": ("file", digest[b"keep"], None),
            "/usr/lib/systemd": ("dir", None, None),
            "/usr/lib/systemd/unit": ("file", digest[b"u"], None),
            "/usr/share": ("dir", None, None),
            "/usr/share/new": ("file", digest[b"new"], None),
        }
        lib = snap["/usr/lib"]
        assert (lib.mode, lib.uid, lib.gid) == ((0o750, 5, 6) if privileged else (0o750, *_caller()))

    # -- depth and breadth ------------------------------------------------------------------------

    # 500 layers take 30-60 s on the mounting drivers (a mount per layer, up to 500 lowers)
    @pytest.mark.parametrize("depth", [128, 200, pytest.param(500, marks=pytest.mark.slow)])
    def test_deep_chain(self, gd_driver: Driver, depth: int) -> None:
        d = gd_driver
        limit = d.capabilities.max_depth
        if limit is not None and limit < depth:
            pytest.skip(f"the driver's max_depth is {limit} < {depth}")
        d.create("c0", None)
        with d.mounted("c0") as root:
            _write(root / "f0", b"0")
        for i in range(1, depth):
            d.create(f"c{i}", f"c{i - 1}")
            with d.mounted(f"c{i}") as root:
                _write(root / f"f{i}", str(i).encode())
                os.unlink(root / f"f{i - 1}")
        for i in (depth - 1, depth // 2, 1):
            with d.mounted(f"c{i}") as root:
                assert os.listdir(root) == [f"f{i}"]
                assert (root / f"f{i}").read_bytes() == str(i).encode()
        assert _names(d.changes(f"c{depth - 1}", f"c{depth - 2}")) == [f"D /f{depth - 2}", f"A /f{depth - 1}"]

    def test_ten_thousand_files(self, gd_driver: Driver, tmp_path: Path) -> None:
        d = gd_driver
        d.create("wide", None)
        with d.mounted("wide") as root:
            for i in range(100):
                sub = root / f"d{i:02d}"
                sub.mkdir()
                for j in range(100):
                    _write(sub / f"f{j:02d}", f"{i}/{j}\n".encode())
        changes = d.changes("wide", None)
        assert len(changes) == 10_100
        assert all(c.kind is ChangeKind.ADD for c in changes)
        tar = self._diff_to_file(d, "wide", None, tmp_path)
        d.create("copy", None)
        with open(tar, "rb") as f:
            size = d.apply_diff("copy", None, f)
        assert size == sum(len(f"{i}/{j}\n") for i in range(100) for j in range(100))
        with d.mounted("wide") as root:
            want = snapshot_tree(root)
        with d.mounted("copy") as root:
            got = snapshot_tree(root)
        assert len(got) == 10_101
        assert diff_snapshots(_without_root_mtime(want), _without_root_mtime(got)) == []
