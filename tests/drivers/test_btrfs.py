"""The btrfs driver on a real btrfs (a loop device): the conformance suite, plus btrfs specifics.

- snapshots are O(1): a child of a layer holding 200 MiB of data takes almost no extra space, and
  the two then diverge independently;
- ``size=`` qgroup limits: writing past the limit fails with EDQUOT; ``status`` reports the limit;
- remove destroys nested subvolumes (by id: a symlink planted in the layer is never followed),
  refuses a layer with outstanding gets, also gets taken by another process;
- check_support: a root not on btrfs, or a process without CAP_SYS_ADMIN in the initial user
  namespace, is NotSupported with the reason;
- the loop-device fixture itself tears everything down, also when the body fails.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver.drivers import registry
from graphdriver.drivers.base import Driver
from graphdriver.drivers.btrfs import BtrfsDriver, parse_size
from graphdriver.errors import AlreadyExists, Busy, InvalidArgument, NotFound, PrerequisitesNotMet
from graphdriver.testing.loopfs import LoopFilesystem, loop_filesystem
from graphdriver.testing.suite import DriverConformance

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the btrfs driver needs root (subvolume ioctls)")

MiB = 1 << 20


@pytest.fixture(scope="module")
def btrfs_fs() -> Iterator[LoopFilesystem]:
    with loop_filesystem("btrfs", "2G") as fs:
        yield fs


@pytest.fixture
def root(btrfs_fs: LoopFilesystem, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh graphdriver root on the shared btrfs, emptied after the test."""
    path = btrfs_fs.path / request.node.name.replace("/", "_")[:100]
    path.mkdir()
    yield path
    for driver_home in [path / "btrfs"]:
        if driver_home.exists():
            driver = BtrfsDriver(driver_home)
            driver.cleanup()
            for entry in sorted(os.listdir(driver_home / "subvolumes")):
                driver.remove(entry)
    shutil.rmtree(path)


class TestBtrfsConformance(DriverConformance):
    """The whole conformance suite, every graph root on the module's btrfs loop filesystem."""

    driver_name = "btrfs"

    @pytest.fixture(autouse=True)
    def _on_btrfs(self, btrfs_fs: LoopFilesystem) -> None:
        self.fs = btrfs_fs

    def make_driver(self, root: Path) -> Driver:
        on_btrfs = Path(tempfile.mkdtemp(prefix="conformance-", dir=self.fs.path))
        return BtrfsDriver(on_btrfs / self.driver_name, dict(self.driver_options))


def write_data(path: Path, nbytes: int) -> str:
    """Write ``nbytes`` of real data (non-zero, every MiB different, no holes); return its sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(nbytes // MiB):
            block = (i.to_bytes(4, "little") + b"\xa5" * 4092) * (MiB // 4096)
            f.write(block)
            h.update(block)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def subvolume_paths(fs: LoopFilesystem, under: Path) -> list[str]:
    """Every subvolume of ``fs`` below ``under``, as paths relative to ``under``."""
    out = subprocess.run(
        ["btrfs", "subvolume", "list", str(fs.path)], capture_output=True, text=True, check=True
    ).stdout
    prefix = str(under.relative_to(fs.path)) + "/"
    paths = [line.split(" path ", 1)[1] for line in out.splitlines() if " path " in line]
    return sorted(p.removeprefix(prefix) for p in paths if p.startswith(prefix))


# -- layout and basics ----------------------------------------------------------------------------


def test_layers_are_subvolumes_and_snapshots(root: Path, btrfs_fs: LoopFilesystem) -> None:
    old = os.umask(0o077)
    try:
        d = BtrfsDriver(root / "btrfs")
        d.create("base")
        d.create("child", "base")
    finally:
        os.umask(old)
    base = root / "btrfs" / "subvolumes" / "base"
    assert stat.S_IMODE(os.stat(root / "btrfs").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(root / "btrfs" / "subvolumes").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(base).st_mode) == 0o755  # whatever the umask
    assert (os.stat(base).st_uid, os.stat(base).st_gid) == (0, 0)
    # the inode of every subvolume root is 256, and each subvolume has its own st_dev
    assert os.stat(base).st_ino == 256
    assert os.stat(root / "btrfs" / "subvolumes" / "child").st_ino == 256
    assert subvolume_paths(btrfs_fs, root) == ["btrfs/subvolumes/base", "btrfs/subvolumes/child"]
    assert d.parent_of("child") == "base"
    assert d.parent_of("base") is None
    assert d.get("child") == root / "btrfs" / "subvolumes" / "child"
    d.put("child")
    with pytest.raises(AlreadyExists):
        d.create("child", "base")
    with pytest.raises(NotFound):
        d.create("orphan", "missing")
    assert not d.exists("orphan")
    assert sorted(os.listdir(root / "btrfs" / "meta")) == ["base", "child"]


def test_snapshot_is_o1_in_space_and_diverges(root: Path, btrfs_fs: LoopFilesystem) -> None:
    d = BtrfsDriver(root / "btrfs")
    d.create("big")
    with d.mounted("big") as p:
        digest = write_data(p / "blob", 200 * MiB)
    btrfs_fs.sync()
    before = btrfs_fs.used_bytes()
    d.create("snap", "big")
    btrfs_fs.sync()
    grown = btrfs_fs.used_bytes() - before
    assert grown < 2 * MiB, f"a snapshot of a 200 MiB layer used {grown} bytes"
    with d.mounted("snap") as p:
        assert sha256_file(p / "blob") == digest
        with open(p / "blob", "r+b") as f:
            f.write(b"changed in the child")
        (p / "new").write_bytes(b"only in the child")
    with d.mounted("big") as p:
        assert sha256_file(p / "blob") == digest
        assert not (p / "new").exists()


# -- quotas ---------------------------------------------------------------------------------------


def test_size_limit_is_enforced_with_edquot(root: Path) -> None:
    d = BtrfsDriver(root / "btrfs", {"size": "32M"})
    assert ("Size Limit", f"{32 * MiB} bytes referenced per layer (qgroup max_rfer)") in d.status()
    d.create("small")
    with d.mounted("small") as p:
        write_data(p / "fits", 16 * MiB)
        with pytest.raises(OSError) as info, open(p / "too-much", "wb") as f:
            for _ in range(64):
                f.write(b"\x5a" * MiB)
                f.flush()
            os.fsync(f.fileno())
        assert info.value.errno == errno.EDQUOT
    out = subprocess.run(
        ["btrfs", "qgroup", "show", "-r", "--raw", str(root)], capture_output=True, text=True, check=True
    ).stdout
    # columns with -r: qgroupid, referenced, exclusive, max referenced, path
    limits = {line.split()[-1]: line.split()[3] for line in out.splitlines() if line.startswith("0/")}
    rel = str((root / "btrfs" / "subvolumes" / "small").relative_to(root.parent))
    assert limits[rel] == str(32 * MiB)


def test_no_limit_by_default(root: Path) -> None:
    d = BtrfsDriver(root / "btrfs")
    assert ("Size Limit", "none") in d.status()
    assert dict(d.status())["Backing Filesystem"] == "btrfs"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1048576", MiB), ("100M", 100 * MiB), ("100MB", 100 * MiB), ("1.5GiB", 3 * (1 << 29)), ("2k", 2048)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "-1M", "0", "12Q", "1,5G"])
def test_bad_size_is_invalid_argument(root: Path, text: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid size"):
        BtrfsDriver(root / "btrfs", {"size": text})


def test_unknown_option_is_invalid_argument(root: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"btrfs: unknown option 'min_space' \(known: size\)"):
        BtrfsDriver(root / "btrfs", {"min_space": "1G"})


# -- remove ---------------------------------------------------------------------------------------


def test_remove_destroys_nested_subvolumes_without_following_symlinks(
    root: Path, btrfs_fs: LoopFilesystem
) -> None:
    d = BtrfsDriver(root / "btrfs")
    d.create("keep")
    with d.mounted("keep") as keep:
        (keep / "precious").write_bytes(b"do not touch")
    d.create("victim")
    with d.mounted("victim") as p:
        subprocess.run(["btrfs", "-q", "subvolume", "create", str(p / "nested")], check=True)
        subprocess.run(["btrfs", "-q", "subvolume", "create", str(p / "nested" / "deeper")], check=True)
        (p / "nested" / "deeper" / "file").write_bytes(b"x")
        # a hostile layer pointing at another layer: remove must never go through it
        os.symlink(root / "btrfs" / "subvolumes" / "keep", p / "escape")
    assert subvolume_paths(btrfs_fs, root / "btrfs" / "subvolumes") == [
        "keep",
        "victim",
        "victim/nested",
        "victim/nested/deeper",
    ]
    d.remove("victim")
    assert subvolume_paths(btrfs_fs, root / "btrfs" / "subvolumes") == ["keep"]
    assert not d.exists("victim")
    assert sorted(os.listdir(root / "btrfs" / "meta")) == ["keep"]
    with d.mounted("keep") as keep:
        assert (keep / "precious").read_bytes() == b"do not touch"


def test_snapshot_leaves_nested_subvolumes_out(root: Path) -> None:
    d = BtrfsDriver(root / "btrfs")
    d.create("outer")
    with d.mounted("outer") as p:
        subprocess.run(["btrfs", "-q", "subvolume", "create", str(p / "inner")], check=True)
        (p / "inner" / "file").write_bytes(b"in the nested subvolume")
    d.create("copy", "outer")
    with d.mounted("copy") as p:
        assert (p / "inner").is_dir()
        assert os.listdir(p / "inner") == []


def test_remove_refuses_layer_with_gets_from_another_process(root: Path) -> None:
    d = BtrfsDriver(root / "btrfs")
    d.create("held")
    script = textwrap.dedent(
        f"""
        from graphdriver.drivers.btrfs import BtrfsDriver
        print(BtrfsDriver({str(root / "btrfs")!r}).get("held"))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(root / "btrfs" / "subvolumes" / "held")
    with pytest.raises(Busy, match="layer held is in use: 1 get"):
        d.remove("held")
    d.put("held")
    d.remove("held")
    assert not d.exists("held")
    with pytest.raises(NotFound):
        d.remove("held")


# -- check_support --------------------------------------------------------------------------------


def test_root_not_on_btrfs_is_not_supported(tmp_path: Path) -> None:
    fstype = subprocess.run(
        ["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    if fstype == "btrfs":
        pytest.skip("the temp dir is itself on btrfs")
    with pytest.raises(PrerequisitesNotMet) as info:
        registry.open_driver(tmp_path / "store", "btrfs")
    reason = info.value.reason
    assert reason.startswith(f"{tmp_path} is on "), reason
    assert reason.endswith("not btrfs"), reason
    assert "statfs magic 0x" in reason
    assert not (tmp_path / "store").exists()
    probe = {s.name: s for s in registry.probe_drivers(tmp_path / "store")}["btrfs"]
    assert (probe.supported, probe.reason) == (False, reason)


def test_probe_says_ok_on_btrfs(root: Path) -> None:
    probe = {s.name: s for s in registry.probe_drivers(root)}["btrfs"]
    assert (probe.supported, probe.reason) == (True, "ok")
    assert not (root / "btrfs").exists()  # probing creates nothing


def test_unprivileged_user_namespace_is_not_supported(root: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    script = textwrap.dedent(
        f"""
        from graphdriver.drivers.btrfs import BtrfsDriver
        from graphdriver.errors import NotSupported
        try:
            BtrfsDriver.check_support({str(root / "btrfs")!r})
        except NotSupported as exc:
            print(exc.reason)
        """
    )
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 and "unshare" in proc.stderr:
        pytest.skip(f"cannot create a user namespace: {proc.stderr.strip()}")
    assert proc.stdout.strip() == (
        "btrfs subvolume destroy, tree search and quotas need CAP_SYS_ADMIN "
        "in the initial user namespace (run as root)"
    )


# -- the loop-device fixture ----------------------------------------------------------------------


def _attached(image: Path) -> str:
    return subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True, check=True).stdout


def test_loop_filesystem_tears_down_when_the_body_fails() -> None:
    seen: list[LoopFilesystem] = []
    with pytest.raises(RuntimeError, match="boom"), loop_filesystem("btrfs", "256M") as fs:
        seen.append(fs)
        assert fs.path.is_mount()
        assert _attached(fs.image).startswith(fs.device + ":")
        (fs.path / "busy").write_bytes(b"x")
        raise RuntimeError("boom")
    (fs,) = seen
    assert not fs.path.exists()
    assert not fs.image.exists()
    assert not fs.image.parent.exists()
    assert not os.path.exists(f"/sys/block/{os.path.basename(fs.device)}/loop/backing_file")


def test_loop_filesystem_skips_for_unknown_filesystem() -> None:
    expected = r"no nosuchfs loop filesystem: mkfs\.nosuchfs is not installed"
    with pytest.raises(pytest.skip.Exception, match=expected), loop_filesystem("nosuchfs"):
        pass


def test_loop_filesystem_tears_down_when_mkfs_fails(tmp_path: Path) -> None:
    bad = loop_filesystem("btrfs", "256M", mkfs_options=["--no-such-option"], directory=tmp_path)
    with pytest.raises(RuntimeError, match=r"mkfs\.btrfs .* failed"), bad:
        pytest.fail("the body must not run")
    assert os.listdir(tmp_path) == []
    attached = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    assert str(tmp_path) not in attached
