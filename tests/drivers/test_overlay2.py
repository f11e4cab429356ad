"""overlay2 on the real kernel: the whole conformance suite, plus what is overlay2's own: the
on-disk layout, read-only mounts of committed layers, counts shared by processes, Busy on
remove, native-diff fallback reasons, and the refusal of a backing filesystem without d_type."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver import mount as gm
from graphdriver.archive.types import Change, ChangeKind
from graphdriver.drivers.overlay2 import Overlay2Driver
from graphdriver.errors import (
    AlreadyExists,
    Busy,
    IncompatibleFilesystem,
    InvalidArgument,
    NotFound,
    NotSupported,
)
from graphdriver.testing.suite import DriverConformance

ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(not ROOT, reason="overlay2 needs root")


class TestOverlay2Conformance(DriverConformance):
    driver_name = "overlay2"


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Overlay2Driver]:
    d = Overlay2Driver(tmp_path / "overlay2")
    try:
        yield d
    finally:
        d.cleanup()


def _mountinfo(path: Path) -> gm.MountInfo:
    found = [m for m in gm.mounts() if m.mount_point == os.path.realpath(path)]
    assert found, f"{path} is not mounted"
    return found[-1]


def _lowerdirs(info: gm.MountInfo) -> list[str]:
    plus = [o.split("=", 1)[1] for o in info.super_options if o.startswith("lowerdir+=")]
    if plus:
        return plus
    value = info.option("lowerdir")
    return value.split(":") if value else []


def _lower_name(driver: Overlay2Driver, id: str) -> str:
    """How a mount names layer ``id`` as a lower: its diff/ with the new mount API (one
    ``lowerdir+`` each, no page limit), its ``l/<LINK>`` with the classic mount."""
    if gm.new_mount_api_available()[0]:
        return str(driver.home / id / "diff")
    return str(driver.home / "l" / (driver.home / id / "link").read_text())


def _tar(*entries: tuple[str, bytes | None]) -> io.BytesIO:
    """A small uncompressed tar: (name, data) files, (name/, None) dirs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name.rstrip("/"))
            info.mtime = 1_700_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


# -- layout ----------------------------------------------------------------------------------------


def test_layout(driver: Overlay2Driver) -> None:
    home = driver.home
    driver.create("base")
    driver.create("mid", "base")
    driver.create("top", "mid")
    assert oct(os.stat(home).st_mode & 0o7777) == "0o700"

    links = {}
    for id in ("base", "mid", "top"):
        link = (home / id / "link").read_text()
        assert re.fullmatch(r"[A-Z2-7]{26}", link), link
        assert os.readlink(home / "l" / link) == f"../{id}/diff"
        assert (home / "l" / link).resolve() == (home / id / "diff").resolve()
        links[id] = link
    assert sorted(os.listdir(home / "l")) == sorted(links.values())

    assert sorted(os.listdir(home / "base")) == ["committed", "diff", "link"]
    assert sorted(os.listdir(home / "mid")) == ["committed", "diff", "link", "lower", "parent", "work"]
    assert sorted(os.listdir(home / "top")) == ["diff", "link", "lower", "parent", "work"]
    assert (home / "mid" / "lower").read_text() == f"l/{links['base']}"
    assert (home / "top" / "lower").read_text() == f"l/{links['mid']}:l/{links['base']}"
    assert (home / "top" / "parent").read_text() == "mid"
    assert driver.parent_of("top") == "mid"
    assert driver.parent_of("base") is None
    assert oct(os.stat(home / "base" / "diff").st_mode & 0o7777) == "0o755"
    assert os.listdir(home / "top" / "diff") == []
    assert [n for n in os.listdir(home) if n.startswith(".tmp")] == []


def test_create_is_o1_no_data_copied(driver: Overlay2Driver) -> None:
    driver.create("base")
    with driver.mounted("base") as root:
        (root / "big").write_bytes(b"x" * 100_000)
    driver.create("child", "base")
    assert os.listdir(driver.home / "child" / "diff") == []


def test_get_base_layer_returns_diff_unmounted_but_counted(driver: Overlay2Driver) -> None:
    driver.create("base")
    path = driver.get("base")
    assert path == driver.home / "base" / "diff"
    assert not gm.is_mountpoint(path)
    with pytest.raises(Busy, match="base is in use"):
        driver.remove("base")
    driver.put("base")
    driver.remove("base")
    assert not driver.exists("base")


def test_get_mounts_read_write_with_upper_and_read_only_once_committed(driver: Overlay2Driver) -> None:
    home = driver.home
    driver.create("base")
    with driver.mounted("base") as root:
        (root / "a").write_text("a")
    driver.create("l1", "base")
    merged = driver.get("l1")
    try:
        assert merged == home / "l1" / "merged"
        info = _mountinfo(merged)
        assert info.fstype == "overlay" and not info.readonly
        assert info.option("upperdir") == str(home / "l1" / "diff")
        assert info.option("workdir") == str(home / "l1" / "work")
        assert _lowerdirs(info) == [_lower_name(driver, "base")]
        (merged / "b").write_text("b")
        assert (home / "l1" / "diff" / "b").read_text() == "b"
    finally:
        driver.put("l1")
    assert not (home / "l1" / "merged").exists()

    driver.create("l2", "l1")  # l1 now has a child: it mounts read-only, its diff/ a lower
    merged = driver.get("l1")
    try:
        info = _mountinfo(merged)
        assert info.readonly
        assert info.option("upperdir") is None
        assert _lowerdirs(info) == [str(home / "l1" / "diff"), _lower_name(driver, "base")]
        assert sorted(os.listdir(merged)) == ["a", "b"]
        with pytest.raises(OSError, match="Read-only file system"):
            (merged / "c").write_text("c")
    finally:
        driver.put("l1")


def test_nested_gets_mount_once(driver: Overlay2Driver) -> None:
    driver.create("base")
    driver.create("c", "base")
    p1 = driver.get("c")
    p2 = driver.get("c")
    assert p1 == p2
    assert [m.mount_point for m in gm.mounts()].count(str(p1)) == 1
    driver.put("c")
    assert gm.is_mountpoint(p1)
    driver.put("c")
    assert not gm.is_mountpoint(p1)
    driver.put("c")  # an extra put is harmless


def test_remove_while_mounted_is_busy(driver: Overlay2Driver) -> None:
    driver.create("base")
    driver.create("c", "base")
    link = (driver.home / "c" / "link").read_text()
    merged = driver.get("c")
    with pytest.raises(Busy, match="layer c is in use"):
        driver.remove("c")
    assert gm.is_mountpoint(merged) and driver.exists("c")
    driver.put("c")
    driver.remove("c")
    assert not driver.exists("c")
    assert not (driver.home / "c").exists()
    assert not os.path.lexists(driver.home / "l" / link)
    assert [n for n in os.listdir(driver.home) if n.startswith(".rm")] == []


def test_external_umount_resets_the_count(driver: Overlay2Driver) -> None:
    driver.create("base")
    driver.create("c", "base")
    merged = driver.get("c")
    driver.get("c")
    subprocess.run(["umount", str(merged)], check=True)
    driver.remove("c")  # the kernel says it is not mounted: not busy
    assert not driver.exists("c")


def test_errors(driver: Overlay2Driver) -> None:
    driver.create("base")
    with pytest.raises(AlreadyExists):
        driver.create("base")
    with pytest.raises(NotFound):
        driver.create("x", "missing")
    with pytest.raises(NotFound):
        driver.get("missing")
    with pytest.raises(NotFound):
        driver.remove("missing")
    for bad in ("../x", "a/b", "", "l"):
        with pytest.raises(InvalidArgument):
            driver.create(bad)
    with pytest.raises(InvalidArgument, match="unknown storage option"):
        Overlay2Driver(driver.home, {"size": "10G"})
    assert not driver.exists("x")


def test_get_of_a_layer_whose_ancestor_was_removed(driver: Overlay2Driver) -> None:
    driver.create("base")
    driver.create("c", "base")
    driver.remove("base")  # the layer store refuses this; the driver only stores
    if gm.new_mount_api_available()[0]:
        with pytest.raises(NotFound, match=r"layer c is missing its lower l/[A-Z2-7]{26}"):
            driver.get("c")
    assert not gm.is_mountpoint(driver.home / "c" / "merged")
    driver.remove("c")


def test_cleanup_unmounts_everything_and_resets_counts(driver: Overlay2Driver) -> None:
    driver.create("base")
    driver.create("a", "base")
    driver.create("b", "a")
    driver.get("base")
    pa = driver.get("a")
    pb = driver.get("b")
    driver.get("b")
    driver.cleanup()
    assert not gm.is_mountpoint(pa) and not gm.is_mountpoint(pb)
    assert gm.mounts_under(driver.home) == []
    for id in ("base", "a", "b"):
        driver.remove(id)


def test_init_removes_what_dead_processes_left(tmp_path: Path) -> None:
    home = tmp_path / "overlay2"
    Overlay2Driver(home).cleanup()
    proc = subprocess.Popen(["true"])
    proc.wait()
    gone, alive = proc.pid, os.getpid()
    names = [
        f".tmp-create-{gone}-x",
        f".rm-{gone}-layer-1234",
        f".overlay-probe-{gone}-y",
        f".dtype-probe-{gone}-z",
        f".tmp-create-{alive}-x",
        f".rm-{alive}-layer-1234",
    ]
    for name in names:
        (home / name / "sub").mkdir(parents=True)
        (home / name / "sub" / "file").write_text("x")
    Overlay2Driver(home).cleanup()
    assert sorted(n for n in os.listdir(home) if n.startswith(".") and n != ".mounts") == sorted(
        [f".rm-{alive}-layer-1234", f".tmp-create-{alive}-x"]
    )


# -- counts across processes (as the CLI uses them) ---------------------------------------------------

_CLI = textwrap.dedent(
    """
    import sys
    from graphdriver.drivers.overlay2 import Overlay2Driver
    from graphdriver.errors import GraphDriverError
    d = Overlay2Driver(sys.argv[1])
    op, id = sys.argv[2], sys.argv[3]
    try:
        if op == "get":
            print(d.get(id))
        elif op == "put":
            d.put(id)
        elif op == "remove":
            d.remove(id)
    except GraphDriverError as exc:
        print(type(exc).__name__, exc)
    """
)


def _cli(home: Path, op: str, id: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", _CLI, str(home), op, id], capture_output=True, text=True, check=True
    )
    return proc.stdout.strip()


def test_counts_survive_processes(driver: Overlay2Driver) -> None:
    driver.create("base")
    driver.create("c", "base")
    merged = str(driver.home / "c" / "merged")
    assert _cli(driver.home, "get", "c") == merged
    assert gm.is_mountpoint(merged)
    assert _cli(driver.home, "get", "c") == merged
    assert _cli(driver.home, "put", "c") == ""
    assert gm.is_mountpoint(merged)
    assert _cli(driver.home, "remove", "c").startswith("Busy overlay2: layer c is in use")
    assert _cli(driver.home, "put", "c") == ""
    assert not gm.is_mountpoint(merged)
    assert _cli(driver.home, "get", "base") == str(driver.home / "base" / "diff")
    assert _cli(driver.home, "remove", "base").startswith("Busy")
    assert _cli(driver.home, "put", "base") == ""
    assert _cli(driver.home, "remove", "c") == ""
    assert _cli(driver.home, "remove", "base") == ""
    assert not driver.exists("base")


# -- native diff and its fallback ---------------------------------------------------------------------


def _status(d: Overlay2Driver) -> dict[str, str]:
    return dict(d.status())


def test_status_default(driver: Overlay2Driver) -> None:
    driver.create("base")
    driver.create("c", "base")
    st = _status(driver)
    new = gm.new_mount_api_available()[0]
    assert list(st) == [
        "Backing Filesystem",
        "Supports d_type",
        "Native Overlay Diff",
        "Using metacopy",
        "Layers",
        "Max depth",
        "Mount API",
    ]
    assert st["Backing Filesystem"] in ("extfs", "xfs", "btrfs", "tmpfs")
    assert st["Supports d_type"] == "true"
    assert st["Layers"] == "2"
    assert st["Max depth"] == ("500" if new else "128")
    assert st["Mount API"].startswith("new" if new else "classic")
    redirect = Path("/sys/module/overlay/parameters/redirect_dir").read_text().strip()
    metacopy = Path("/sys/module/overlay/parameters/metacopy").read_text().strip()
    if redirect == "N" and metacopy == "N":
        assert st["Native Overlay Diff"] == "true"
        assert driver.capabilities.native_diff
        assert driver.native_diff_reason("c", "base") is None


def test_native_diff_falls_back_for_a_parent_that_is_not_the_direct_one(driver: Overlay2Driver) -> None:
    driver.create("base")
    with driver.mounted("base") as root:
        (root / "a").write_text("a")
    driver.create("mid", "base")
    with driver.mounted("mid") as root:
        (root / "b").write_text("b")
    driver.create("top", "mid")
    with driver.mounted("top") as root:
        (root / "c").write_text("c")
    assert driver.native_diff_reason("top", "base") == "base is not the direct parent of top (mid)"
    assert driver.native_diff_reason("top", None) == (
        "no parent given: top is compared with an empty tree, not with its parent mid"
    )
    assert driver.native_diff_reason("base", None) == "base has no parent: its diff/ is its whole root"
    # the naive path answers for the grandparent
    assert driver.changes("top", "base") == [Change("/b", ChangeKind.ADD), Change("/c", ChangeKind.ADD)]
    assert driver.changes("top", "mid") == [Change("/c", ChangeKind.ADD)]


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"mountopt": "redirect_dir=on"}, "false (the kernel uses redirect_dir: a renamed directory"),
        ({"overlay2.mountopt": "metacopy=on"}, "false (the kernel uses redirect_dir"),
        ({"native_diff": "false"}, "false (disabled by the native_diff=false storage option)"),
    ],
)
def test_status_says_why_native_diff_is_off(tmp_path: Path, options: dict[str, str], reason: str) -> None:
    d = Overlay2Driver(tmp_path / "overlay2", options)
    try:
        st = _status(d)
        assert st["Native Overlay Diff"].startswith(reason)
        if "metacopy" in options.get("overlay2.mountopt", ""):
            assert "the kernel uses metacopy" in st["Native Overlay Diff"]
            assert st["Using metacopy"] == "true"
        assert not d.capabilities.native_diff
        d.create("base")
        d.create("c", "base")
        assert d.native_diff_reason("c", "base") == st["Native Overlay Diff"][len("false (") : -1]
        # the naive path is used and is right, renamed directories included
        with d.mounted("base") as root:
            (root / "dir").mkdir()
            (root / "dir" / "f").write_text("f")
        with d.mounted("c") as root:
            shutil.move(root / "dir", root / "moved")  # a rename, or a copy on EXDEV
        assert d.changes("c", "base") == [
            Change("/dir", ChangeKind.DELETE),
            Change("/moved", ChangeKind.ADD),
            Change("/moved/f", ChangeKind.ADD),
        ]
        with d.diff("c", "base") as stream, tarfile.open(fileobj=stream, mode="r|") as tf:
            names = sorted(tf.getnames())
        assert names == [".wh.dir", "moved", "moved/f"]
    finally:
        d.cleanup()


def test_classic_mount_api_caps_the_depth_at_128(tmp_path: Path) -> None:
    d = Overlay2Driver(tmp_path / "overlay2", {"mount_api": "classic"})
    try:
        assert _status(d)["Max depth"] == "128"
        assert d.capabilities.max_depth == 128
        d.create("0")
        for i in range(1, 129):
            d.create(str(i), str(i - 1))
        with pytest.raises(InvalidArgument, match="max depth exceeded"):
            d.create("129", "128")
        with d.mounted("128") as root:  # 128 lowers, relative to home: fits in a page
            (root / "x").write_text("x")
            info = _mountinfo(root)
            assert len(_lowerdirs(info)) == 128
            assert _lowerdirs(info)[0].startswith("l/")
        with d.mounted("127") as root:  # committed: diff + 127 lowers, read-only
            assert _mountinfo(root).readonly
    finally:
        d.cleanup()


def test_native_apply_diff_writes_overlay_whiteouts_into_diff(driver: Overlay2Driver) -> None:
    driver.create("base")
    size = driver.apply_diff("base", None, _tar(("etc/", None), ("etc/a", b"aa"), ("etc/b", b"bbb")))
    assert size == 5
    driver.create("c", "base")
    size = driver.apply_diff("c", "base", _tar(("etc/", None), ("etc/.wh.a", b""), ("new", b"1234")))
    assert size == 4
    diff = driver.home / "c" / "diff"
    st = os.lstat(diff / "etc" / "a")
    assert (oct(st.st_mode), os.major(st.st_rdev), os.minor(st.st_rdev)) == (oct(0o20000), 0, 0)
    assert (diff / "new").read_text() == "1234"
    assert not (driver.home / "c" / "merged").exists()  # no mount was needed
    assert driver.changes("c", "base") == [
        Change("/etc", ChangeKind.MODIFY),
        Change("/etc/a", ChangeKind.DELETE),
        Change("/new", ChangeKind.ADD),
    ]
    assert driver.diff_size("c", "base") == 4
    with driver.diff("c", "base") as stream, tarfile.open(fileobj=stream, mode="r|") as tf:
        members = {m.name: m for m in tf}
    assert sorted(members) == ["etc", "etc/.wh.a", "new"]
    assert members["etc/.wh.a"].isreg() and members["etc/.wh.a"].size == 0
    with driver.mounted("c") as root:
        assert sorted(os.listdir(root / "etc")) == ["b"]


# -- support checks -------------------------------------------------------------------------------


def test_backing_filesystem_without_d_type_is_refused(tmp_path: Path) -> None:
    from graphdriver.testing.loopfs import loop_filesystem

    tried = []
    for fstype, size, mkfs in (
        ("xfs", "300M", ["-m", "crc=0", "-n", "ftype=0"]),
        ("ext4", "64M", ["-O", "^filetype"]),
    ):
        try:
            with loop_filesystem(fstype, size, mkfs_options=mkfs) as fs:
                home = fs.path / "graph" / "overlay2"
                with pytest.raises(IncompatibleFilesystem) as exc:
                    Overlay2Driver(home)
                msg = str(exc.value)
                assert "does not report d_type" in msg
                assert "mkfs.xfs -n ftype=1" in msg
                with pytest.raises(IncompatibleFilesystem):
                    Overlay2Driver.check_support(home)
                assert not home.exists()
                return
        except pytest.skip.Exception as skip:
            tried.append(f"{fstype}: {skip}")
    pytest.skip("no filesystem without d_type could be made: " + "; ".join(tried))


_CHECK = (
    "import os, sys\n"
    "from pathlib import Path\n"
    "from graphdriver.drivers.overlay2 import Overlay2Driver\n"
    "from graphdriver.errors import NotSupported\n"
    "if sys.argv[2] == 'nobody':\n"
    "    os.setegid(65534); os.seteuid(65534)\n"
    "try:\n"
    "    Overlay2Driver.check_support(Path(sys.argv[1]))\n"
    "except NotSupported as e:\n"
    "    print(e.reason)\n"
)


def test_check_support_refuses_non_root(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CHECK, str(tmp_path / "x"), "nobody"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "needs root; use fuse-overlayfs"


def test_check_support_refuses_a_user_namespace(tmp_path: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    argv = ["unshare", "--user", "--map-root-user", sys.executable, "-c", _CHECK, str(tmp_path / "x"), "root"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0 and proc.stderr.startswith("unshare:"):
        pytest.skip(f"the kernel refuses a user namespace: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    # euid 0, but of a user namespace: overlay could mount, trusted.* xattrs cannot be written
    assert proc.stdout.strip() == (
        "running in a user namespace (uid map 0 0 1): overlay2 keeps whiteouts in trusted.* xattrs, "
        "which need real root; use fuse-overlayfs"
    )


def test_check_support_refuses_an_overlay_backing_fs_and_creates_nothing(tmp_path: Path) -> None:
    d = Overlay2Driver(tmp_path / "overlay2")
    try:
        d.create("base")
        d.create("c", "base")
        with (
            d.mounted("c") as merged,
            pytest.raises(NotSupported, match="is overlayfs, which cannot hold overlay upper dirs"),
        ):
            Overlay2Driver.check_support(merged / "nested")
    finally:
        d.cleanup()
    Overlay2Driver.check_support(tmp_path / "does" / "not" / "exist")
    assert not (tmp_path / "does").exists()
