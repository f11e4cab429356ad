"""Driver probes: every known driver answers yes or no with a reason, and creates nothing.

aufs and devmapper are probes only: on this kernel they must say exactly what is missing. The
last test applies a layer tar as an aufs host writes it (hard-link pool ``.wh..wh.plnk``, aufs
metadata ``.wh..wh.aufs`` / ``.wh..wh.orph``) and checks the exact resulting tree.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver.archive.apply import apply_layer
from graphdriver.drivers import registry
from graphdriver.drivers.aufs import AufsDriver, kernel_filesystems
from graphdriver.drivers.base import Driver
from graphdriver.drivers.devmapper import DM_CONTROL, DevmapperDriver, kernel_has_device_mapper
from graphdriver.errors import InvalidArchive, NotSupported
from graphdriver.testing.loopfs import loop_filesystem
from graphdriver.testing.tarbuild import TarBuilder
from graphdriver.testing.trees import Entry, diff_snapshots, format_entry, snapshot_tree

AUFS_MISSING = (
    "aufs is not in /proc/filesystems: this kernel has no aufs (graphdriver does not load kernel modules)"
)
DM_MISSING = (
    "the kernel has no device-mapper: no device-mapper entry in /proc/misc"
    + ("" if os.path.exists(DM_CONTROL) else f" and {DM_CONTROL} does not exist")
)


def test_every_known_driver_answers_yes_or_no_with_a_reason(tmp_path: Path) -> None:
    root = tmp_path / "store"
    results = registry.probe_drivers(root)
    assert [r.name for r in results] == registry.known_drivers()
    for r in results:
        assert isinstance(r.supported, bool)
        if r.supported:
            assert r.reason == "ok"
        else:
            assert r.reason and r.reason != "ok", r
            assert "\n" not in r.reason, r
            # a driver that is missing from the package is not an answer about this machine
            assert "driver module not available" not in r.reason, r
        assert r.priority == (registry.PRIORITY.index(r.name) + 1 if r.name in registry.PRIORITY else None)
    assert not root.exists(), "probing must create nothing"


def test_probes_change_nothing_outside(tmp_path: Path) -> None:
    before = os.path.exists("/dev/mapper")
    registry.probe_drivers(tmp_path / "store")
    assert os.path.exists("/dev/mapper") == before, "a probe must not create /dev/mapper/control"


@pytest.mark.skipif("aufs" in kernel_filesystems(), reason="this kernel has aufs")
def test_aufs_says_exactly_what_is_missing(tmp_path: Path) -> None:
    probe = {r.name: r for r in registry.probe_drivers(tmp_path)}["aufs"]
    assert (probe.supported, probe.reason) == (False, AUFS_MISSING)
    with pytest.raises(NotSupported) as info:
        registry.open_driver(tmp_path, "aufs")
    assert info.value.reason == AUFS_MISSING
    assert str(info.value) == f"aufs: {AUFS_MISSING}"
    with pytest.raises(NotSupported):
        AufsDriver(tmp_path / "aufs")
    assert not (tmp_path / "aufs").exists()


@pytest.mark.skipif(kernel_has_device_mapper(), reason="this kernel has device-mapper")
def test_devmapper_says_exactly_what_is_missing(tmp_path: Path) -> None:
    probe = {r.name: r for r in registry.probe_drivers(tmp_path)}["devmapper"]
    assert (probe.supported, probe.reason) == (False, DM_MISSING)
    with pytest.raises(NotSupported) as info:
        registry.open_driver(tmp_path, "devmapper")
    assert info.value.reason == DM_MISSING
    with pytest.raises(NotSupported):
        DevmapperDriver(tmp_path / "devmapper")
    assert not (tmp_path / "devmapper").exists()


def test_probe_only_drivers_are_never_auto_selected() -> None:
    assert "aufs" not in registry.PRIORITY
    assert "devmapper" not in registry.PRIORITY


# -- layer tars written on aufs hosts ---------------------------------------------------------------

T0 = 1_400_000_000_000_000_000  # a 2014 host
POOL1 = b"pooled data, linked twice\n"
POOL2 = b"the second layer's pool\n"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the exact trees carry owners: needs root")


def _t(n: int) -> int:
    return T0 + n * 1_000_000_000 + 123_456_789


def aufs_base_layer() -> bytes:
    """A base layer as docker on aufs exported it: aufs metadata at the top, a hard-link pool, and
    two names hard-linked into the pool (relative and absolute link names)."""
    return (
        TarBuilder()
        .file(".wh..wh.aufs", b"", mode=0o444, mtime_ns=_t(0))
        .dir(".wh..wh.orph", mode=0o700, mtime_ns=_t(0))
        .dir(".wh..wh.plnk", mode=0o700, mtime_ns=_t(0))
        .file(".wh..wh.plnk/262.4", POOL1, mode=0o2750, uid=1000, gid=1000, mtime_ns=_t(1))
        .dir("etc", mode=0o755, mtime_ns=_t(2))
        .hardlink("etc/hostname", ".wh..wh.plnk/262.4", mode=0o777, mtime_ns=_t(9))
        .file("etc/plain", b"plain\n", mode=0o644, mtime_ns=_t(3))
        .file("etc/motd", b"hello\n", mode=0o644, mtime_ns=_t(3))
        .dir("usr", mode=0o755, mtime_ns=_t(4))
        .dir("usr/bin", mode=0o755, mtime_ns=_t(4))
        .hardlink("usr/bin/tool", "/.wh..wh.plnk/262.4")
        .build()
    )


def aufs_child_layer() -> bytes:
    """A child layer: an aufs whiteout, a pooled file replacing a lower one, aufs metadata."""
    return (
        TarBuilder()
        .file(".wh..wh.aufs", b"", mode=0o444, mtime_ns=_t(10))
        .dir(".wh..wh.plnk", mode=0o700, mtime_ns=_t(10))
        .file(".wh..wh.plnk/300.5", POOL2, mode=0o600, mtime_ns=_t(11))
        .dir("etc", mode=0o750, mtime_ns=_t(12))
        .whiteout("etc/motd")
        .hardlink("etc/plain", ".wh..wh.plnk/300.5")
        .build()
    )


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_base() -> dict[str, Entry]:
    """The exact tree the base layer gives: pool data at every linked name, with the pool entry's
    metadata (the seed's behaviour: each link becomes its own file), no aufs metadata."""
    pooled = Entry("file", 0o2750, 1000, 1000, len(POOL1), _t(1), sha256=_sha(POOL1))
    return {
        "/etc": Entry("dir", 0o755, 0, 0, 0, _t(2)),
        "/etc/hostname": pooled,
        "/etc/motd": Entry("file", 0o644, 0, 0, 6, _t(3), sha256=_sha(b"hello\n")),
        "/etc/plain": Entry("file", 0o644, 0, 0, 6, _t(3), sha256=_sha(b"plain\n")),
        "/usr": Entry("dir", 0o755, 0, 0, 0, _t(4)),
        "/usr/bin": Entry("dir", 0o755, 0, 0, 0, _t(4)),
        "/usr/bin/tool": pooled,
    }


def expected_child() -> dict[str, Entry]:
    tree = expected_base()
    del tree["/etc/motd"]
    tree["/etc"] = Entry("dir", 0o750, 0, 0, 0, _t(12))
    tree["/etc/plain"] = Entry("file", 0o600, 0, 0, len(POOL2), _t(11), sha256=_sha(POOL2))
    return tree


def without_root(snapshot: dict[str, Entry]) -> dict[str, Entry]:
    return {path: entry for path, entry in snapshot.items() if path != "/"}


def assert_tree(actual: dict[str, Entry], expected: dict[str, Entry]) -> None:
    problems = diff_snapshots(without_root(actual), expected)
    listing = "\n".join(f"{p}: {format_entry(e)}" for p, e in actual.items())
    assert problems == [], "\n".join(problems) + "\n--- actual tree:\n" + listing


@needs_root
def test_aufs_layer_tar_applies_exactly(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    stats = apply_layer(root, io.BytesIO(aufs_base_layer()))
    assert_tree(snapshot_tree(root), expected_base())
    assert sorted(os.listdir(root)) == ["etc", "usr"]  # no .wh..wh.aufs, .wh..wh.orph, .wh..wh.plnk
    assert os.stat(root / "etc" / "hostname").st_nlink == 1
    assert stats.entries == 11
    apply_layer(root, io.BytesIO(aufs_child_layer()))
    assert_tree(snapshot_tree(root), expected_child())


def test_aufs_link_to_missing_pool_entry_is_invalid(tmp_path: Path) -> None:
    tar = TarBuilder().dir("etc").hardlink("etc/x", ".wh..wh.plnk/404.1").build()
    with pytest.raises(InvalidArchive, match=r"aufs hard link.*'etc/x'"):
        apply_layer(tmp_path, io.BytesIO(tar))


def _working_drivers() -> list[str]:
    """Drivers that work on the temp dir, plus btrfs (on a loop device)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gd-probe-") as probe_root:
        names = [s.name for s in registry.probe_drivers(probe_root) if s.supported]
    return names if "btrfs" in names else [*names, "btrfs"]


@pytest.fixture(params=_working_drivers())
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Driver]:
    with contextlib.ExitStack() as stack:
        root = tmp_path / "store"
        if request.param == "btrfs":
            support = {s.name: s for s in registry.probe_drivers(tmp_path)}["btrfs"]
            if not support.supported:
                root = stack.enter_context(loop_filesystem("btrfs", "512M")).path / "store"
        d = registry.open_driver(root, request.param)
        stack.callback(d.cleanup)
        yield d


@needs_root
def test_aufs_layer_tars_apply_on_every_driver(driver: Driver) -> None:
    driver.create("base")
    driver.apply_diff("base", None, io.BytesIO(aufs_base_layer()))
    driver.create("child", "base")
    driver.apply_diff("child", "base", io.BytesIO(aufs_child_layer()))
    with driver.mounted("base") as base:
        assert_tree(snapshot_tree(base), expected_base())
    with driver.mounted("child") as child:
        assert_tree(snapshot_tree(child), expected_child())
