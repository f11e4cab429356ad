"""The vfs driver: the conformance suite (as root and as an unprivileged user), plus vfs specifics:
its layout, crash-safe create and remove, and what it cannot do without root."""

from __future__ import annotations

import fcntl
import os
import re
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver.drivers.registry import open_driver
from graphdriver.drivers.vfs import VfsDriver, filesystem_type
from graphdriver.errors import InvalidArgument, NotFound
from graphdriver.fs.copy import copy_tree, supports_reflink
from graphdriver.testing.plugin import NOBODY, Unprivileged
from graphdriver.testing.suite import DriverConformance
from graphdriver.testing.trees import diff_snapshots, make_sample_tree, snapshot_tree

REPO = Path(__file__).resolve().parents[2]
ROOT = os.geteuid() == 0


class TestVfsConformance(DriverConformance):
    driver_name = "vfs"


@pytest.fixture
def vfs(gd_root: Path) -> Iterator[VfsDriver]:
    d = VfsDriver(gd_root / "vfs")
    try:
        yield d
    finally:
        d.cleanup()


def _listing(d: VfsDriver) -> list[str]:
    return sorted(os.listdir(d.layers_dir))


# -- layout ---------------------------------------------------------------------------------------


def test_layout(vfs: VfsDriver) -> None:
    assert stat.S_IMODE(os.stat(vfs.home).st_mode) == 0o700
    vfs.create("base")
    assert stat.S_IMODE(os.stat(vfs.layers_dir).st_mode) == 0o700
    base = vfs.layers_dir / "base"
    assert vfs.get("base") == base
    vfs.put("base")
    make_sample_tree(base)
    vfs.create("child", "base")
    child = vfs.layers_dir / "child"
    assert _listing(vfs) == ["base", "child"]
    assert diff_snapshots(snapshot_tree(base), snapshot_tree(child)) == []
    # a real copy: no inode is shared with the parent
    base_inodes = {os.lstat(p).st_ino for p in base.rglob("*")}
    assert not base_inodes & {os.lstat(p).st_ino for p in child.rglob("*")}


def test_home_is_made_private(gd_root: Path) -> None:
    home = gd_root / "vfs"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o711)  # the docker <20.10.9 mode that let other users reach setuid binaries
    VfsDriver(home)
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700


def test_capabilities_and_status(vfs: VfsDriver) -> None:
    caps = vfs.capabilities
    assert (caps.mounts, caps.requires_root, caps.native_diff, caps.max_depth) == (False, False, False, None)
    assert caps.preserves_ownership is ROOT
    assert caps.copy_on_write is supports_reflink(vfs.home)
    vfs.create("a")
    vfs.create("b", "a")
    assert vfs.status() == [
        ("Backing Filesystem", filesystem_type(vfs.home)),
        ("Supports reflink", "true" if caps.copy_on_write else "false"),
        ("Layers", "2"),
    ]
    assert filesystem_type(vfs.home) in {"tmpfs", "ext4", "xfs", "btrfs"}
    VfsDriver.check_support(vfs.home)


def test_options_are_refused(gd_root: Path) -> None:
    with pytest.raises(InvalidArgument, match="vfs takes none"):
        VfsDriver(gd_root / "vfs", {"size": "10G"})


def test_selected_as_prior_state_and_by_name(gd_root: Path) -> None:
    d = open_driver(gd_root, "vfs")
    assert isinstance(d, VfsDriver)
    d.create("layer")
    assert isinstance(open_driver(gd_root), VfsDriver)  # its state is there: the prior driver


def test_put_and_get_of_unknown_layers(vfs: VfsDriver) -> None:
    with pytest.raises(NotFound):
        vfs.get("nope")
    with pytest.raises(NotFound):
        vfs.put("nope")
    vfs.create("x")
    vfs.put("x")  # an unbalanced put of a known layer is harmless: nothing is counted


# -- crash safety ---------------------------------------------------------------------------------


def test_leftovers_are_invisible_and_cleaned_up(vfs: VfsDriver) -> None:
    vfs.create("real")
    vfs.layers_dir.joinpath(".tmp-half-0123456789ab").mkdir()
    vfs.layers_dir.joinpath(".tmp-half-0123456789ab", "file").write_text("half a copy")
    vfs.layers_dir.joinpath(".rm-old-ba9876543210", "sub").mkdir(parents=True)
    assert not vfs.exists("half")
    assert vfs.layers() == ["real"]
    assert dict(vfs.status())["Layers"] == "1"
    with pytest.raises(InvalidArgument):
        vfs.exists(".tmp-half-0123456789ab")  # no id begins with a dot
    vfs.cleanup()
    assert _listing(vfs) == ["real"]


def test_cleanup_spares_a_create_in_progress(vfs: VfsDriver) -> None:
    busy = vfs.layers_dir / ".tmp-busy-000000000000"
    vfs.layers_dir.mkdir(exist_ok=True)
    busy.mkdir()
    fd = os.open(busy, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what create() holds while it copies
        vfs.cleanup()
        assert busy.is_dir()
    finally:
        os.close(fd)
    vfs.cleanup()
    assert not busy.exists()


def test_killed_create_leaves_no_layer(vfs: VfsDriver) -> None:
    """SIGKILL at the worst moment: the copy is complete, the rename has not happened."""
    vfs.create("base")
    make_sample_tree(vfs.get("base"))
    script = textwrap.dedent(
        """
        import os, signal, sys
        import graphdriver.drivers.vfs as vfs

        real_copy = vfs.copy_tree

        def copy_then_die(src, dst, **kw):
            real_copy(src, dst, **kw)
            os.kill(os.getpid(), signal.SIGKILL)

        vfs.copy_tree = copy_then_die
        vfs.VfsDriver(sys.argv[1]).create("child", "base")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script, str(vfs.home)], check=False)
    assert proc.returncode == -9
    assert [n for n in _listing(vfs) if n.startswith(".tmp-child-")], "the copy should be left over"
    again = VfsDriver(vfs.home)
    assert not again.exists("child")
    assert again.layers() == ["base"]
    again.cleanup()
    assert _listing(vfs) == ["base"]
    again.create("child", "base")  # the id is free
    assert diff_snapshots(snapshot_tree(vfs.get("base")), snapshot_tree(vfs.get("child"))) == []


def test_failed_create_leaves_nothing(vfs: VfsDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    import graphdriver.drivers.vfs as vfs_module

    vfs.create("base")
    make_sample_tree(vfs.get("base"))

    def copy_then_fail(src: Path, dst: Path) -> None:
        copy_tree(src, dst)
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(vfs_module, "copy_tree", copy_then_fail)
    with pytest.raises(OSError, match="injected"):
        vfs.create("child", "base")
    assert _listing(vfs) == ["base"]


def test_remove_is_atomic_and_leaves_nothing(vfs: VfsDriver) -> None:
    vfs.create("base")
    make_sample_tree(vfs.get("base"))  # read-only dirs, 0000 files
    vfs.create("child", "base")
    vfs.remove("child")
    assert _listing(vfs) == ["base"]
    vfs.remove("base")
    assert _listing(vfs) == []


# -- without root ---------------------------------------------------------------------------------


def _store_owned_by_nobody(unpriv: Unprivileged, with_device: bool) -> Path:
    """A vfs home under the scratch dir with a base layer (and a device node), owned by nobody."""
    home = unpriv.scratch / "graph" / "vfs"
    d = VfsDriver(home)
    d.create("base")
    base = d.get("base")
    (base / "etc").mkdir()
    (base / "etc" / "hostname").write_text("box\n")
    if with_device:
        (base / "dev").mkdir()
        os.mknod(base / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    for dirpath, dirnames, filenames in os.walk(unpriv.scratch / "graph"):
        os.chown(dirpath, NOBODY, NOBODY)
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), NOBODY, NOBODY, follow_symlinks=False)
    return home


@pytest.mark.skipif(not ROOT, reason="needs root to set up a store for an unprivileged user")
def test_unprivileged_create_of_a_layer_with_a_device(gd_unprivileged: Unprivileged) -> None:
    home = _store_owned_by_nobody(gd_unprivileged, with_device=True)
    code = textwrap.dedent(
        """
        import sys
        from graphdriver.drivers.vfs import VfsDriver
        from graphdriver.errors import PermissionDenied
        d = VfsDriver(sys.argv[1])
        assert not d.capabilities.preserves_ownership
        d.create("empty")          # no copy: fine without root
        try:
            d.create("child", "base")
        except PermissionDenied as exc:
            print("PermissionDenied:", exc)
        else:
            print("created")
        """
    )
    proc = gd_unprivileged.run(["-c", code, str(home)], python=True)
    assert proc.returncode == 0, proc.stdout
    base = home / "dir" / "base"
    assert f"PermissionDenied: cannot create character device {base}/dev/null" in proc.stdout
    assert "CAP_MKNOD" in proc.stdout
    assert sorted(os.listdir(home / "dir")) == ["base", "empty"]


@pytest.mark.skipif(not ROOT, reason="needs root to set up a store for an unprivileged user")
def test_unprivileged_create_copies_what_the_owner_cannot_read(gd_unprivileged: Unprivileged) -> None:
    home = _store_owned_by_nobody(gd_unprivileged, with_device=False)
    code = textwrap.dedent(
        """
        import os, sys
        from graphdriver.drivers.vfs import VfsDriver
        from graphdriver.testing.trees import diff_snapshots, make_sample_tree, snapshot_tree
        d = VfsDriver(sys.argv[1])
        base = d.get("base")
        os.mkdir(base / "sample")
        make_sample_tree(base / "sample")                   # 0000 and 0222 files, a 0555 dir
        os.mkdir(base / "locked"); open(base / "locked" / "secret", "w").write("s")
        os.chmod(base / "locked", 0o000)                    # a directory the owner cannot read
        before = snapshot_tree(base)
        d.create("child", "base")
        after = snapshot_tree(base)
        print("parent unchanged:", diff_snapshots(before, after))
        print("copy differences:", diff_snapshots(before, snapshot_tree(d.get("child"))))
        print("locked mode:", oct(os.lstat(base / "locked").st_mode & 0o7777))
        """
    )
    proc = gd_unprivileged.run(["-c", code, str(home)], python=True)
    assert proc.returncode == 0, proc.stdout
    assert "parent unchanged: []" in proc.stdout
    assert "copy differences: []" in proc.stdout
    assert "locked mode: 0o0\n" in proc.stdout


@pytest.mark.skipif(not ROOT, reason="running the suite as another user needs root")
def test_conformance_suite_passes_unprivileged(gd_unprivileged: Unprivileged) -> None:
    """The vfs suite as uid 65534 with no groups: rootless use works, root-only cases skip."""
    argv = [
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rs",
        str(Path(__file__)),
        "-k",
        "TestVfsConformance",
    ]
    proc = gd_unprivileged.run(argv, python=True, cwd=REPO)
    tail = "\n".join(proc.stdout.splitlines()[-40:])
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "failed" not in summary and "error" not in summary, summary
    skips = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips, tail
    assert all("needs root for" in line and f"(uid {NOBODY})" in line for line in skips), "\n".join(skips)
    assert any("device nodes, security.capability" in line for line in skips)
