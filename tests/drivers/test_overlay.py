"""The seed's overlay driver: the conformance suite, plus what is particular to its 2014 design.

- the two create cases and the container init-layer pattern (whiteouts and opaque dirs made in
  the ``-init`` upper survive the copy into the container's upper);
- apply_diff's conversion of image layers to hard-linked ``root/`` trees, the invariant that the
  parent's shared inodes are never modified, and the refusal to apply over an upper with changes;
- get/put counts shared across processes; remove, cleanup, status and check_support.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver.drivers.overlay import OverlayDriver
from graphdriver.errors import AlreadyExists, Busy, IncompatibleFilesystem, InvalidArgument, NotFound
from graphdriver.mount import is_mountpoint, mount_overlay, unmount
from graphdriver.testing.suite import DriverConformance

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the overlay driver needs root")


class TestOverlayConformance(DriverConformance):
    driver_name = "overlay"


# -- helpers ------------------------------------------------------------------------------------


def layer_tar(*entries: tuple[str, str, bytes | str | None]) -> io.BytesIO:
    """A layer tar from (type, name, data) entries: type "f" file, "d" dir, "l" symlink, "h" link."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for kind, name, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_600_000_000
            info.uid = info.gid = 0
            if kind == "f":
                payload = data.encode() if isinstance(data, str) else (data or b"")
                info.size = len(payload)
                info.mode = 0o644
                tf.addfile(info, io.BytesIO(payload))
                continue
            if kind == "d":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "l":
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, str(data), 0o777
            elif kind == "h":
                info.type, info.linkname, info.mode = tarfile.LNKTYPE, str(data), 0o644
            tf.addfile(info)
    buf.seek(0)
    return buf


BASE_TAR = (
    ("d", "etc", None),
    ("f", "etc/hosts", "127.0.0.1 localhost\n"),
    ("f", "etc/mtab", "rootfs / rootfs rw 0 0\n"),
    ("d", "opt", None),
    ("d", "opt/app", None),
    ("f", "opt/app/a", "a\n"),
    ("f", "opt/app/b", "b\n"),
    ("f", "keep", "unchanged\n"),
    ("f", "motd", "hello\n"),
)


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[OverlayDriver]:
    d = OverlayDriver(tmp_path / "overlay")
    try:
        yield d
    finally:
        d.cleanup()


def make_image(driver: OverlayDriver, id: str = "image") -> Path:
    driver.create(id, None)
    driver.apply_diff(id, None, layer_tar(*BASE_TAR))
    return driver.home / id / "root"


def is_whiteout(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


# -- layout and create ----------------------------------------------------------------------------


def test_layout_root_layer_and_overlay_layer(driver: OverlayDriver) -> None:
    assert stat.S_IMODE(os.stat(driver.home).st_mode) == 0o700
    driver.create("base")
    base = driver.home / "base"
    assert sorted(os.listdir(base)) == ["root"]
    assert stat.S_IMODE(os.stat(base).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(base / "root").st_mode) == 0o755
    os.chmod(base / "root", 0o750)
    os.chown(base / "root", 12, 34)
    os.setxattr(base / "root", "user.k", b"v")
    os.utime(base / "root", ns=(1, 1_500_000_000_123_456_789))

    driver.create("child", "base")
    child = driver.home / "child"
    assert sorted(os.listdir(child)) == ["lower-id", "merged", "parent", "upper", "work"]
    assert (child / "lower-id").read_bytes() == b"base"
    assert os.listdir(child / "upper") == []
    up = os.lstat(child / "upper")
    assert (stat.S_IMODE(up.st_mode), up.st_uid, up.st_gid) == (0o750, 12, 34)
    assert up.st_mtime_ns == 1_500_000_000_123_456_789
    assert os.getxattr(child / "upper", "user.k") == b"v"
    for name in ("work", "merged"):
        assert stat.S_IMODE(os.stat(child / name).st_mode) == 0o700
    assert driver.is_root_layer("base") and not driver.is_root_layer("child")
    assert driver.lower_of("child") == "base" and driver.lower_of("base") is None


def test_create_errors_leave_nothing(driver: OverlayDriver) -> None:
    driver.create("base")
    with pytest.raises(AlreadyExists):
        driver.create("base")
    with pytest.raises(NotFound):
        driver.create("orphan", "missing")
    assert not (driver.home / "orphan").exists()
    with pytest.raises(InvalidArgument):
        driver.create("../escape")
    # a corrupt parent (an overlay layer that lost its lower-id): the new id dir is removed
    driver.create("mid", "base")
    os.unlink(driver.home / "mid" / "lower-id")
    with pytest.raises(Exception, match="neither root/ nor lower-id"):
        driver.create("top", "mid")
    assert not (driver.home / "top").exists()


def test_init_layer_pattern_whiteouts_and_opaque_survive(driver: OverlayDriver) -> None:
    """`<cid>-init` on an image (case A), `<cid>` on the init layer (case B), as the daemon does."""
    make_image(driver)
    driver.create("c1-init", "image")
    with driver.mounted("c1-init") as init:
        os.unlink(init / "etc" / "hosts")  # SetupInitLayer unlinks, then recreates
        (init / "etc" / "hosts").write_text("10.0.0.2 c1\n")
        os.unlink(init / "etc" / "mtab")
        os.symlink("/proc/mounts", init / "etc" / "mtab")
        os.unlink(init / "motd")  # a plain deletion: a whiteout
        for name in os.listdir(init / "opt" / "app"):
            os.unlink(init / "opt" / "app" / name)
        os.rmdir(init / "opt" / "app")
        os.mkdir(init / "opt" / "app")  # deleted and recreated: opaque
        (init / "opt" / "app" / "new").write_text("new\n")
        os.mkdir(init / "dev")
        os.mknod(init / "dev" / "console", 0o620 | stat.S_IFCHR, os.makedev(5, 1))
    init_upper = driver.home / "c1-init" / "upper"
    assert is_whiteout(init_upper / "motd")
    assert os.getxattr(init_upper / "opt" / "app", "trusted.overlay.opaque") == b"y"

    driver.create("c1", "c1-init")
    c1 = driver.home / "c1"
    assert (c1 / "lower-id").read_bytes() == b"image"
    assert sorted(os.listdir(c1)) == ["lower-id", "merged", "parent", "upper", "work"]
    upper = c1 / "upper"
    assert is_whiteout(upper / "motd")
    assert os.getxattr(upper / "opt" / "app", "trusted.overlay.opaque") == b"y"
    assert os.readlink(upper / "etc" / "mtab") == "/proc/mounts"
    assert os.lstat(upper / "dev" / "console").st_rdev == os.makedev(5, 1)
    # a real copy, not links into the init layer
    assert os.lstat(upper / "etc" / "hosts").st_ino != os.lstat(init_upper / "etc" / "hosts").st_ino

    with driver.mounted("c1") as root:
        assert not (root / "motd").exists()
        assert (root / "etc" / "hosts").read_text() == "10.0.0.2 c1\n"
        assert sorted(os.listdir(root / "opt" / "app")) == ["new"]
        assert (root / "keep").read_text() == "unchanged\n"
        (root / "keep").write_text("container write\n")
    # the container's writes stay in its own upper
    with driver.mounted("c1-init") as init:
        assert (init / "keep").read_text() == "unchanged\n"
    assert (driver.home / "image" / "root" / "keep").read_text() == "unchanged\n"
    names = {c.path for c in driver.changes("c1", "c1-init")}
    assert names == {"/keep"}


def test_case_b_layers_chain_on_the_same_root(driver: OverlayDriver) -> None:
    make_image(driver)
    driver.create("a", "image")
    with driver.mounted("a") as root:
        (root / "from-a").write_text("a")
    driver.create("b", "a")
    with driver.mounted("b") as root:
        os.unlink(root / "from-a")
        (root / "from-b").write_text("b")
    driver.create("c", "b")
    assert (driver.home / "c" / "lower-id").read_bytes() == b"image"
    with driver.mounted("c") as root:
        assert not (root / "from-a").exists()
        assert (root / "from-b").read_text() == "b"


# -- apply_diff: the hard-link farm -----------------------------------------------------------------


def test_apply_diff_converts_to_hardlinked_root(driver: OverlayDriver) -> None:
    parent_root = make_image(driver, "l1")
    driver.create("l2", "l1")
    size = driver.apply_diff(
        "l2", "l1", layer_tar(("f", "motd", "changed!\n"), ("f", "added", "12345"), ("f", ".wh.keep", b""))
    )
    l2 = driver.home / "l2"
    assert sorted(os.listdir(l2)) == ["parent", "root"]  # upper, work, merged, lower-id, tmproot gone
    assert size == len("changed!\n") + len("12345")
    assert driver.is_root_layer("l2")
    # unchanged files are the parent's inodes
    for rel in ("etc/hosts", "etc/mtab", "opt/app/a"):
        assert os.lstat(l2 / "root" / rel).st_ino == os.lstat(parent_root / rel).st_ino
        assert os.lstat(l2 / "root" / rel).st_nlink == 2
    # directories are never shared
    assert os.lstat(l2 / "root" / "etc").st_ino != os.lstat(parent_root / "etc").st_ino
    assert not (l2 / "root" / "keep").exists()
    assert (parent_root / "keep").read_text() == "unchanged\n"

    driver.create("l3", "l2")
    driver.apply_diff("l3", "l2", layer_tar(("f", "l3file", "3")))
    assert os.lstat(driver.home / "l3" / "root" / "etc" / "hosts").st_nlink == 3
    assert os.lstat(driver.home / "l3" / "root" / "motd").st_nlink == 2
    assert os.lstat(driver.home / "l3" / "root" / "motd").st_ino == os.lstat(l2 / "root" / "motd").st_ino
    assert [str(c) for c in driver.changes("l3", "l2")] == ["A /l3file"]
    with driver.mounted("l3") as root:
        assert root == driver.home / "l3" / "root"
        assert not is_mountpoint(root)


def test_apply_diff_never_modifies_the_parents_shared_inode(driver: OverlayDriver) -> None:
    parent_root = make_image(driver, "l1")
    target = parent_root / "etc" / "hosts"
    os.utime(target, ns=(1_000_000_001, 1_000_000_002))
    before = os.lstat(target)
    driver.create("l2", "l1")
    driver.apply_diff("l2", "l1", layer_tar(("f", "etc/hosts", "rewritten by the child\n")))
    after = os.lstat(target)
    assert target.read_text() == "127.0.0.1 localhost\n"
    assert (after.st_ino, after.st_mtime_ns, after.st_size, after.st_nlink) == (
        before.st_ino,
        1_000_000_002,
        before.st_size,
        1,
    )
    child = driver.home / "l2" / "root" / "etc" / "hosts"
    assert child.read_text() == "rewritten by the child\n"
    assert os.lstat(child).st_ino != before.st_ino
    assert os.lstat(child).st_nlink == 1


def test_apply_diff_naive_path_through_the_mount(driver: OverlayDriver) -> None:
    """On a parent without root/ (a case B layer), apply goes through merged/: kernel whiteouts."""
    make_image(driver)
    driver.create("init", "image")
    driver.create("top", "init")
    size = driver.apply_diff("top", "init", layer_tar(("f", ".wh.motd", b""), ("f", "new", "xyz")))
    assert size == 3
    upper = driver.home / "top" / "upper"
    assert is_whiteout(upper / "motd")
    assert (upper / "new").read_text() == "xyz"
    assert not (driver.home / "top" / "root").exists()
    assert not is_mountpoint(driver.home / "top" / "merged")


def test_apply_diff_refuses_an_upper_with_changes(driver: OverlayDriver) -> None:
    make_image(driver, "l1")
    driver.create("l2", "l1")
    with driver.mounted("l2") as root:
        (root / "written").write_text("x")
        with pytest.raises(Busy):
            driver.apply_diff("l2", "l1", layer_tar(("f", "f", "f")))
    with pytest.raises(InvalidArgument, match="changes in its upper"):
        driver.apply_diff("l2", "l1", layer_tar(("f", "f", "f")))
    assert (driver.home / "l2" / "upper" / "written").read_text() == "x"
    assert not (driver.home / "l2" / "root").exists()
    assert [n for n in os.listdir(driver.home / "l2") if n.startswith("tmproot")] == []

    driver.create("l3", "l1")
    driver.apply_diff("l3", "l1", layer_tar(("f", "f", "f")))
    with pytest.raises(InvalidArgument, match="already holds a complete tree"):
        driver.apply_diff("l3", "l1", layer_tar(("f", "g", "g")))
    driver.create("other", None)
    driver.create("l4", "l1")
    with pytest.raises(InvalidArgument, match="created on l1, not on other"):
        driver.apply_diff("l4", "other", layer_tar(("f", "g", "g")))


def test_apply_diff_failure_removes_tmproot(driver: OverlayDriver) -> None:
    make_image(driver, "l1")
    driver.create("l2", "l1")
    with pytest.raises(Exception):  # noqa: B017 - whatever archive error apply_layer raises
        driver.apply_diff("l2", "l1", io.BytesIO(b"this is not a tar archive" * 40))
    assert sorted(os.listdir(driver.home / "l2")) == ["lower-id", "merged", "parent", "upper", "work"]


def test_128_deep_chain_link_counts(driver: OverlayDriver) -> None:
    driver.create("d0")
    driver.apply_diff("d0", None, layer_tar(("f", "shared", "s"), ("f", "f0", "0")))
    for i in range(1, 128):
        driver.create(f"d{i}", f"d{i - 1}")
        driver.apply_diff(f"d{i}", f"d{i - 1}", layer_tar(("f", f"f{i}", str(i))))
    top = driver.home / "d127" / "root"
    assert os.lstat(top / "shared").st_nlink == 128
    assert os.lstat(top / "f100").st_nlink == 28
    assert sorted(os.listdir(top)) == sorted(["shared", *(f"f{i}" for i in range(128))])
    driver.create("c", "d127")
    with driver.mounted("c") as root:
        assert (root / "f127").read_text() == "127"


# -- get / put, counts across processes ----------------------------------------------------------


def _run(home: Path, code: str) -> str:
    script = textwrap.dedent(
        f"""
        from graphdriver.drivers.overlay import OverlayDriver
        d = OverlayDriver({str(home)!r})
        """
    ) + textwrap.dedent(code)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_counts_survive_the_process(driver: OverlayDriver) -> None:
    make_image(driver)
    driver.create("c", "image")
    merged = driver.home / "c" / "merged"
    assert _run(driver.home, "print(d.get('c'))") == str(merged)
    assert is_mountpoint(merged)
    assert _run(driver.home, "print(d.get('c'))") == str(merged)
    with pytest.raises(Busy):
        driver.remove("c")
    driver.put("c")
    assert is_mountpoint(merged)
    _run(driver.home, "d.put('c')")
    assert not is_mountpoint(merged)
    # a root layer is counted too, without a mount
    assert _run(driver.home, "print(d.get('image'))") == str(driver.home / "image" / "root")
    with pytest.raises(Busy):
        driver.remove("image")
    driver.put("image")
    driver.put("image")  # an extra put is harmless, as in the seed
    driver.remove("c")
    driver.remove("image")
    assert not driver.exists("image")


def test_mount_options_and_label(driver: OverlayDriver) -> None:
    make_image(driver)
    driver.create("c", "image")
    merged = driver.get("c", mount_label="system_u:object_r:container_file_t:s0")
    try:
        from graphdriver.mount import mounts

        (m,) = [m for m in mounts() if m.mount_point == str(merged)]
        assert m.fstype == "overlay"
        # one lower: lowerdir= from mount(2), lowerdir+= from fsconfig(2) (the new mount API)
        lower = m.option("lowerdir") if m.option("lowerdir") is not None else m.option("lowerdir+")
        assert lower == str(driver.home / "image" / "root")
        assert m.option("upperdir") == str(driver.home / "c" / "upper")
        assert m.option("workdir") == str(driver.home / "c" / "work")
        selinux = os.path.exists("/sys/fs/selinux/enforce")
        assert (m.option("context") is not None) == selinux  # the label is dropped without SELinux
        assert driver.get("c") == merged
        driver.put("c")
        assert is_mountpoint(merged)
    finally:
        driver.put("c")
    assert not is_mountpoint(merged)
    with pytest.raises(InvalidArgument):
        driver.get("c", mount_label='bad",label')


def test_remove_refuses_the_lower_of_a_mounted_layer(driver: OverlayDriver) -> None:
    make_image(driver)
    driver.create("c", "image")
    with driver.mounted("c"), pytest.raises(Busy, match="lower of mounted layer c"):
        driver.remove("image")
    driver.remove("c")
    driver.remove("image")
    with pytest.raises(NotFound):
        driver.remove("image")


def test_cleanup_unmounts_everything(driver: OverlayDriver) -> None:
    make_image(driver)
    for id in ("a", "b"):
        driver.create(id, "image")
        driver.get(id)
        driver.get(id)
    driver.get("image")
    driver.cleanup()
    assert not is_mountpoint(driver.home / "a" / "merged")
    assert not is_mountpoint(driver.home / "b" / "merged")
    for id in ("a", "b", "image"):
        driver.remove(id)


def test_status(driver: OverlayDriver) -> None:
    make_image(driver)
    driver.create("c-init", "image")
    driver.create("c", "c-init")
    with driver.mounted("c"):
        status = dict(driver.status())
    assert status["Backing Filesystem"] in {"extfs", "xfs", "btrfs", "tmpfs"}
    assert (status["Layers"], status["Root Layers"], status["Overlay Layers"], status["Mounted"]) == (
        "3",
        "1",
        "2",
        "1",
    )


def test_check_support_refuses_an_overlay_backing_fs(tmp_path: Path) -> None:
    for name in ("l", "u", "w", "m"):
        (tmp_path / name).mkdir()
    mount_overlay(tmp_path / "m", lowers=[tmp_path / "l"], upper=tmp_path / "u", work=tmp_path / "w")
    try:
        with pytest.raises(IncompatibleFilesystem, match="is on overlayfs"):
            OverlayDriver.check_support(tmp_path / "m" / "graph" / "overlay")
        with pytest.raises(IncompatibleFilesystem):
            OverlayDriver(tmp_path / "m" / "overlay")
        assert not (tmp_path / "m" / "overlay").exists()
    finally:
        unmount(tmp_path / "m")
    OverlayDriver.check_support(tmp_path / "overlay")
    with pytest.raises(InvalidArgument, match="takes no options"):
        OverlayDriver(tmp_path / "overlay", {"size": "1G"})
