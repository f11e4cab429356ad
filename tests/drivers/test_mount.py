"""graphdriver.mount and MountCounter on the real kernel: mountinfo, tmpfs and overlay mounts
(new mount API and the classic fallback with relative paths), counts shared by processes."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver import mount as gm
from graphdriver.drivers.mountcount import MountCounter
from graphdriver.errors import InvalidArgument, MountError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


def _new_api() -> bool:
    return gm.new_mount_api_available()[0]


def _info(path: Path) -> gm.MountInfo:
    target = os.path.realpath(path)
    found = [m for m in gm.mounts() if m.mount_point == target]
    assert found, f"{path} is not mounted"
    return found[-1]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    target = tmp_path / "mnt"
    target.mkdir()
    gm.mount("tmpfs", target, "tmpfs", 0, "size=4m,mode=0755")
    yield target
    gm.unmount(target, detach=True)


# -- mountinfo ----------------------------------------------------------------------------------


def test_parse_mountinfo_line_with_optional_fields_and_escapes() -> None:
    line = (
        "36 35 98:0 /mnt\\0401 /a\\040dir\\011tab\\012nl\\134bs rw,noatime master:1 shared:7 - "
        "overlay my\\040src rw,lowerdir=/x\\054y:/z,upperdir=/u\n"
    )
    info = gm.parse_mountinfo_line(line)
    assert info == gm.MountInfo(
        mount_id=36,
        parent_id=35,
        major_minor="98:0",
        root="/mnt 1",
        mount_point="/a dir\ttab\nnl\\bs",
        options=("rw", "noatime"),
        fstype="overlay",
        source="my src",
        super_options=("rw", "lowerdir=/x,y:/z", "upperdir=/u"),
    )
    assert info.option("lowerdir") == "/x,y:/z"
    assert info.option("rw") == ""
    assert info.option("workdir") is None
    assert not info.readonly


def test_parse_mountinfo_line_without_optional_fields() -> None:
    info = gm.parse_mountinfo_line("22 27 0:21 / /proc ro,relatime - proc proc rw\n")
    assert (info.mount_point, info.fstype, info.source, info.options, info.super_options) == (
        "/proc",
        "proc",
        "proc",
        ("ro", "relatime"),
        ("rw",),
    )
    assert info.readonly


def test_mounts_decodes_a_real_mount_point_with_spaces_and_utf8(tmp_path: Path) -> None:
    target = tmp_path / "a dir\twith\\odd ünïcode"
    target.mkdir()
    gm.mount("tmpfs", target, "tmpfs", 0, "size=1m")
    try:
        info = _info(target)
        assert info.mount_point == str(target)
        assert info.fstype == "tmpfs"
        assert gm.is_mountpoint(target)
        assert [m.mount_point for m in gm.mounts_under(tmp_path)] == [str(target)]
    finally:
        gm.unmount(target)
    assert not gm.is_mountpoint(target)


# -- mount / unmount ------------------------------------------------------------------------------


def test_mount_and_unmount_tmpfs(tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    assert not gm.is_mountpoint(target)
    gm.mount("tmpfs", target, "tmpfs", gm.MS_NODEV | gm.MS_NOSUID, "size=1m,mode=0710")
    assert gm.is_mountpoint(target)
    info = _info(target)
    assert "nodev" in info.options and "nosuid" in info.options
    assert info.option("mode") == "710"
    (target / "f").write_bytes(b"x")
    gm.unmount(target)
    assert not gm.is_mountpoint(target)
    assert os.listdir(target) == []
    gm.unmount(target)  # not mounted: fine by default
    with pytest.raises(MountError, match=r"unmount .*/t: Invalid argument"):
        gm.unmount(target, missing_ok=False)


def test_is_mountpoint_is_not_fooled_by_symlinks_or_missing_paths(tmpfs: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmpfs)
    assert gm.is_mountpoint(link)
    assert not gm.is_mountpoint(tmp_path)
    assert not gm.is_mountpoint(tmp_path / "missing")


def test_mount_error_names_target_and_errno(tmp_path: Path) -> None:
    with pytest.raises(MountError, match=r"mount tmpfs on .*/nowhere: No such file or directory") as exc:
        gm.mount("tmpfs", tmp_path / "nowhere", "tmpfs")
    assert isinstance(exc.value.__cause__, OSError)
    assert exc.value.__cause__.errno == 2


def test_detach_unmount_of_busy_mount(tmpfs: Path) -> None:
    fd = os.open(tmpfs, os.O_RDONLY)
    try:
        with pytest.raises(MountError, match="Device or resource busy"):
            os.chdir(tmpfs)
            try:
                gm.unmount(tmpfs)
            finally:
                os.chdir("/")
        gm.unmount(tmpfs, detach=True)
        assert not gm.is_mountpoint(tmpfs)
    finally:
        os.close(fd)


# -- overlay ----------------------------------------------------------------------------------------


def _make_chain(home: Path, n: int) -> list[Path]:
    """``n`` layers with moby's layout: ``<home>/<64 hex>/diff`` and ``<home>/l/<26>`` links.
    Layer i holds file ``f<i>`` and overwrites ``shared`` (uppermost wins). Returns the
    ``l/`` link paths, uppermost (last made) first."""
    (home / "l").mkdir(parents=True, exist_ok=True)
    links = []
    for i in range(n):
        lid = f"{i:064x}"
        diff = home / lid / "diff"
        diff.mkdir(parents=True)
        (diff / f"f{i}").write_text(str(i))
        (diff / "shared").write_text(str(i))
        link = base64.b32encode(i.to_bytes(16, "big")).decode()[:26]
        (home / "l" / link).symlink_to(f"../{lid}/diff")
        links.append(home / "l" / link)
    return links[::-1]


def _upper(home: Path) -> tuple[Path, Path, Path]:
    top = home / "top"
    for sub in ("diff", "work", "merged"):
        (top / sub).mkdir(parents=True)
    return top / "diff", top / "work", top / "merged"


@pytest.mark.parametrize("new_api", [True, False], ids=["new-api", "classic"])
def test_overlay_mount_read_write(tmp_path: Path, new_api: bool) -> None:
    if new_api and not _new_api():
        pytest.skip(f"new mount API unavailable: {gm.new_mount_api_available()[1]}")
    lowers = _make_chain(tmp_path, 3)
    upper, work, merged = _upper(tmp_path)
    gm.mount_overlay(merged, lowers=lowers, upper=upper, work=work, options=["index=off"], new_api=new_api)
    try:
        assert sorted(os.listdir(merged)) == ["f0", "f1", "f2", "shared"]
        assert (merged / "shared").read_text() == "2"
        (merged / "new").write_text("n")
        os.unlink(merged / "f0")
        info = _info(merged)
        assert info.fstype == "overlay"
        key = "lowerdir+" if new_api else "lowerdir"
        shown = [o.split("=", 1)[1] for o in info.super_options if o.startswith(key + "=")]
        expected = [str(p) for p in lowers]
        assert (shown if new_api else shown[0].split(":")) == expected
        assert info.option("upperdir") == str(upper)
    finally:
        gm.unmount(merged)
    assert (upper / "new").read_text() == "n"
    st = os.lstat(upper / "f0")
    assert (oct(st.st_mode), st.st_rdev) == (oct(0o20000), 0)  # 0/0 whiteout


@pytest.mark.parametrize("new_api", [True, False], ids=["new-api", "classic"])
def test_overlay_mount_read_only(tmp_path: Path, new_api: bool) -> None:
    if new_api and not _new_api():
        pytest.skip(f"new mount API unavailable: {gm.new_mount_api_available()[1]}")
    lowers = _make_chain(tmp_path, 2)
    merged = tmp_path / "merged"
    merged.mkdir()
    gm.mount_overlay(merged, lowers=lowers, readonly=True, new_api=new_api)
    try:
        assert _info(merged).readonly
        with pytest.raises(OSError, match="Read-only file system"):
            (merged / "x").write_text("")
        assert (merged / "shared").read_text() == "1"
    finally:
        gm.unmount(merged)


def test_classic_fallback_mounts_relative_to_home_when_absolute_options_exceed_a_page(
    tmp_path: Path,
) -> None:
    home = tmp_path / ("a-long-home-directory-name-" * 3)
    lowers = _make_chain(home, 120)
    upper, work, merged = _upper(home)
    absolute = ",".join(["lowerdir=" + ":".join(map(str, lowers)), f"upperdir={upper}", f"workdir={work}"])
    assert len(absolute) > 4096
    with pytest.raises(MountError, match="more than a page; pass relative_to"):
        gm.mount_overlay(merged, lowers=lowers, upper=upper, work=work, new_api=False)
    cwd = os.getcwd()
    gm.mount_overlay(merged, lowers=lowers, upper=upper, work=work, relative_to=home, new_api=False)
    try:
        assert os.getcwd() == cwd
        info = _info(merged)
        lowerdir = info.option("lowerdir")
        assert lowerdir is not None
        assert lowerdir.split(":") == [f"l/{p.name}" for p in lowers]
        assert (info.option("upperdir"), info.option("workdir")) == ("top/diff", "top/work")
        assert sorted(os.listdir(merged)) == sorted([*(f"f{i}" for i in range(120)), "shared"])
        assert (merged / "shared").read_text() == "119"
        (merged / "w").write_text("w")
        assert (upper / "w").read_text() == "w"
    finally:
        gm.unmount(merged)


def test_classic_refuses_what_does_not_fit_even_relative(tmp_path: Path) -> None:
    lowers = _make_chain(tmp_path, 150)
    merged = tmp_path / "merged"
    merged.mkdir()
    with pytest.raises(MountError, match=r"even relative to .* more than a page \(150 lowers\)"):
        gm.mount_overlay(merged, lowers=lowers, relative_to=tmp_path, readonly=True, new_api=False)
    assert not gm.is_mountpoint(merged)


def test_new_api_mounts_the_kernel_maximum_of_500_lowers(tmp_path: Path) -> None:
    if not _new_api():
        pytest.skip(f"new mount API unavailable: {gm.new_mount_api_available()[1]}")
    assert gm.overlay_max_lowers() == 500
    lowers = _make_chain(tmp_path, 501)
    upper, work, merged = _upper(tmp_path)
    with pytest.raises(MountError, match="501 lowers, the kernel takes at most 500"):
        gm.mount_overlay(merged, lowers=lowers, upper=upper, work=work)
    gm.mount_overlay(merged, lowers=lowers[:500], upper=upper, work=work, options=["index=off"])
    try:
        names = os.listdir(merged)
        assert len(names) == 501
        assert (merged / "shared").read_text() == "500"
        assert (merged / "f1").read_text() == "1"
        assert "f0" not in names
    finally:
        gm.unmount(merged)


def test_new_api_uses_relative_paths_for_values_longer_than_fsconfig_takes(tmp_path: Path) -> None:
    if not _new_api():
        pytest.skip(f"new mount API unavailable: {gm.new_mount_api_available()[1]}")
    home = tmp_path
    for _ in range(6):
        home = home / ("d" * 50)
    lowers = _make_chain(home, 2)
    upper, work, merged = _upper(home)
    assert len(str(lowers[0])) > 255
    with pytest.raises(MountError, match="fsconfig lowerdir\\+"):
        gm.mount_overlay(merged, lowers=lowers, upper=upper, work=work)
    gm.mount_overlay(merged, lowers=lowers, upper=upper, work=work, relative_to=home)
    try:
        assert (merged / "shared").read_text() == "1"
    finally:
        gm.unmount(merged)


def test_overlay_mount_errors_carry_the_reason(tmp_path: Path) -> None:
    merged = tmp_path / "m"
    merged.mkdir()
    with pytest.raises(MountError, match="No such file or directory"):
        gm.mount_overlay(merged, lowers=[tmp_path / "missing"], readonly=True)
    with pytest.raises(InvalidArgument, match="both upperdir and workdir"):
        gm.mount_overlay(merged, lowers=[tmp_path], upper=tmp_path)
    with pytest.raises(InvalidArgument, match="at least one lower"):
        gm.mount_overlay(merged, lowers=[])


def test_overlay_options() -> None:
    index = Path("/sys/module/overlay/parameters/index").exists()
    assert gm.overlay_options() == (["index=off"] if index else [])
    labelled = gm.overlay_options(userxattr=True, mount_label="system_u:object_r:c1")
    if gm.selinux_enabled():
        assert labelled[-2:] == ["userxattr", 'context="system_u:object_r:c1"']
    else:  # overlay refuses context= without SELinux: the label is dropped, as the seed did
        assert labelled[-1] == "userxattr"
        assert not any(o.startswith("context=") for o in labelled)
    with pytest.raises(InvalidArgument):
        gm.overlay_options(mount_label='x",lowerdir=/')


def test_run_in_dir_does_not_move_the_process_cwd(tmp_path: Path) -> None:
    cwd = os.getcwd()
    assert gm.run_in_dir(tmp_path, os.getcwd) == str(tmp_path)
    assert os.getcwd() == cwd
    with pytest.raises(ZeroDivisionError):
        gm.run_in_dir(tmp_path, lambda: 1 // 0)


# -- MountCounter -------------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from graphdriver.drivers.mountcount import MountCounter
    from graphdriver.mount import mount, unmount

    state, target, op = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    c = MountCounter(state)
    if op == "acquire":
        def do_mount():
            print("mounting")
            mount("tmpfs", target, "tmpfs", 0, "size=1m")
        n = c.acquire("layer", target, do_mount)
    elif op == "release":
        n = c.release("layer", target, lambda: (print("unmounting"), unmount(target, detach=True)))
    else:
        n = c.count("layer")
    print(n)
    """
)


def _child(state: Path, target: Path, op: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(state), str(target), op],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.split()


def test_counts_are_shared_by_processes(tmp_path: Path) -> None:
    state, target = tmp_path / "state", tmp_path / "mnt"
    target.mkdir()
    assert _child(state, target, "acquire") == ["mounting", "1"]
    assert gm.is_mountpoint(target)
    assert _child(state, target, "acquire") == ["2"]
    assert MountCounter(state).count("layer") == 2
    assert MountCounter(state).active() == {"layer": 2}
    assert _child(state, target, "release") == ["1"]
    assert gm.is_mountpoint(target)
    assert _child(state, target, "count") == ["1"]
    assert _child(state, target, "release") == ["unmounting", "0"]
    assert not gm.is_mountpoint(target)
    assert _child(state, target, "release") == ["0"]  # unknown: 0, no error
    assert os.listdir(state) == []


def test_stale_count_after_external_umount_is_reset(tmp_path: Path) -> None:
    state, target = tmp_path / "state", tmp_path / "mnt"
    target.mkdir()
    counter = MountCounter(state)
    calls: list[str] = []

    def do_mount() -> None:
        calls.append("mount")
        gm.mount("tmpfs", target, "tmpfs", 0, "size=1m")

    assert counter.acquire("x", target, do_mount) == 1
    assert counter.acquire("x", target, do_mount) == 2
    subprocess.run(["umount", str(target)], check=True)
    assert counter.count("x") == 0
    assert counter.active() == {}
    assert counter.acquire("x", target, do_mount) == 1
    assert calls == ["mount", "mount"]
    subprocess.run(["umount", str(target)], check=True)
    assert counter.release("x", target, lambda: calls.append("unmount")) == 0
    assert calls == ["mount", "mount"]  # nothing left to unmount


def test_release_of_an_uncounted_mount_still_unmounts(tmpfs: Path, tmp_path: Path) -> None:
    counter = MountCounter(tmp_path / "state")
    assert counter.release("y", tmpfs, lambda: gm.unmount(tmpfs)) == 0
    assert not gm.is_mountpoint(tmpfs)


def test_failed_mount_leaves_no_count(tmp_path: Path) -> None:
    counter = MountCounter(tmp_path / "state")

    def fail() -> None:
        raise MountError("no")

    with pytest.raises(MountError):
        counter.acquire("z", tmp_path / "nowhere", fail)
    assert counter.count("z") == 0
    assert os.listdir(tmp_path / "state") == []


def test_failed_unmount_keeps_the_count(tmpfs: Path, tmp_path: Path) -> None:
    counter = MountCounter(tmp_path / "state")
    assert counter.acquire("z", tmpfs, lambda: None) == 1

    def fail() -> None:
        raise MountError("busy")

    with pytest.raises(MountError):
        counter.release("z", tmpfs, fail)
    assert counter.count("z") == 1


def test_plain_counts_for_layers_that_are_not_mounted(tmp_path: Path) -> None:
    counter = MountCounter(tmp_path / "state")
    path = tmp_path / "diff"
    path.mkdir()
    assert counter.acquire("base", path, lambda: None, mounts=False) == 1
    assert counter.acquire("base", path, lambda: None, mounts=False) == 2
    assert counter.count("base") == 2  # not a mount point, still counted
    ran: list[int] = []
    assert counter.run_if_idle("base", lambda: ran.append(1)) == 2
    assert ran == []
    assert counter.release("base", path, lambda: None) == 1
    assert counter.release("base", path, lambda: None) == 0
    assert counter.run_if_idle("base", lambda: ran.append(1)) == 0
    assert ran == [1]
    counter.acquire("base", path, lambda: None, mounts=False)
    counter.forget("base")
    assert counter.count("base") == 0


def test_concurrent_acquire_release_keeps_exact_counts(tmp_path: Path) -> None:
    target = tmp_path / "mnt"
    target.mkdir()
    counter = MountCounter(tmp_path / "state")
    events: list[str] = []
    lock = threading.Lock()

    def do_mount() -> None:
        with lock:
            events.append("m")
        gm.mount("tmpfs", target, "tmpfs", 0, "size=1m")

    def do_unmount() -> None:
        with lock:
            events.append("u")
        gm.unmount(target, detach=True)

    counter.acquire("c", target, do_mount)  # keep it mounted through the storm

    def worker() -> None:
        for _ in range(25):
            MountCounter(tmp_path / "state").acquire("c", target, do_mount)
            MountCounter(tmp_path / "state").release("c", target, do_unmount)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.count("c") == 1
    assert events == ["m"]
    assert counter.release("c", target, do_unmount) == 0
    assert events == ["m", "u"]
    assert not gm.is_mountpoint(target)
