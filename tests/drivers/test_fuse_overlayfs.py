"""fuse-overlayfs: the conformance suite as root and as an unprivileged user, plus its specifics.

- the whole conformance suite as root (this process), and again in a child pytest run inside
  ``unshare --user --map-root-user --mount``: uid 0 there, but no capability in the initial user
  namespace, so no chown outside the mapping and no device nodes (the suite skips those cases
  with the reason). The 200- and 500-deep chains are left out of the second run: they exercise
  nothing privilege-dependent, and fuse-overlayfs's start-up grows with the number of layers, so
  each costs tens of seconds (they do run as root);
- whiteouts are stored the way fuse-overlayfs writes them, as root, unprivileged, and when it may
  not use mknod (``.wh.`` files), and read back right by a later mount and by the diff;
- selection in a user namespace, check_support reasons, read-only parents, cleanup, status.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from graphdriver.drivers import registry
from graphdriver.drivers.fuse_overlayfs import FuseOverlayfsDriver
from graphdriver.errors import NotSupported
from graphdriver.mount import mounts_under
from graphdriver.testing.suite import DriverConformance

REPO = Path(__file__).resolve().parents[2]
IN_USERNS = "GRAPHDRIVER_TEST_IN_USERNS"


def _support() -> str | None:
    try:
        FuseOverlayfsDriver.check_support(Path("/tmp"))
    except NotSupported as exc:
        return exc.reason
    return None


pytestmark = pytest.mark.skipif(_support() is not None, reason=f"fuse-overlayfs unusable here: {_support()}")


class TestFuseOverlayfsConformance(DriverConformance):
    driver_name = "fuse-overlayfs"


# -- helpers ------------------------------------------------------------------------------------


def userns_argv(*argv: str) -> list[str]:
    return ["unshare", "--user", "--map-root-user", "--mount", *argv]


def run_python(script: str, *args: str, userns: bool, env: dict[str, str] | None = None) -> str:
    """Run ``script`` with this Python (in a new user namespace if asked); return its stdout."""
    argv = [sys.executable, "-c", script, *args]
    if userns:
        if os.environ.get(IN_USERNS):
            pytest.skip("already inside a user namespace")
        if shutil.which("unshare") is None:
            pytest.skip("unshare (util-linux) is not installed")
        argv = userns_argv(*argv)
    env = {**os.environ, **(env or {})}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if userns and proc.returncode != 0 and proc.stderr.startswith("unshare:"):
        pytest.skip(f"the kernel refuses a user namespace: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# -- the suite without privilege -----------------------------------------------------------------


def test_conformance_suite_in_a_user_namespace(tmp_path: Path) -> None:
    if os.environ.get(IN_USERNS):
        pytest.skip("already inside a user namespace")
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    suite = f"{Path(__file__).relative_to(REPO)}::TestFuseOverlayfsConformance"
    argv = userns_argv(
        sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
        "--basetemp", str(tmp_path / "basetemp"),
        "--deselect", f"{suite}::test_deep_chain[200]",
        "--deselect", f"{suite}::test_deep_chain[500]",
        suite,
    )  # fmt: skip
    proc = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, env={**os.environ, IN_USERNS: "1"}, check=False
    )
    if proc.returncode != 0 and proc.stderr.startswith("unshare:"):
        pytest.skip(f"the kernel refuses a user namespace: {proc.stderr.strip()}")
    out = proc.stdout
    summary = out.strip().splitlines()[-1] if out.strip() else proc.stderr
    print(f"unprivileged run: {summary}")
    assert proc.returncode == 0, out[-6000:] + proc.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
    # the privileged cases skip, and say why
    assert "the driver does not preserve ownership" in out, out[-3000:]


# -- whiteouts ---------------------------------------------------------------------------------------

WHITEOUT_SCRIPT = textwrap.dedent(
    """
    import json, os, stat, sys, tempfile
    from graphdriver.drivers.fuse_overlayfs import FuseOverlayfsDriver

    root = tempfile.mkdtemp(prefix="gd-fo-wh-", dir=sys.argv[1])
    d = FuseOverlayfsDriver(os.path.join(root, "fuse-overlayfs"))
    d.create("base")
    with d.mounted("base") as p:
        open(p / "f", "w").write("f")
        os.mkdir(p / "d")
        open(p / "d" / "g", "w").write("g")
    d.create("child", "base")
    with d.mounted("child") as p:
        os.unlink(p / "f")
        os.unlink(p / "d" / "g")
        os.rmdir(p / "d")
        os.mkdir(p / "d")
        open(p / "d" / "new", "w").write("new")
    diff = d.home / "child" / "diff"
    def kind(path):
        st = os.lstat(path)
        if stat.S_ISCHR(st.st_mode):
            return f"chr {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        return "dir" if stat.S_ISDIR(st.st_mode) else "file"
    upper = {}
    for dirpath, dirs, files in os.walk(diff):
        for name in dirs + files:
            full = os.path.join(dirpath, name)
            upper[os.path.relpath(full, diff)] = kind(full)
    with d.mounted("child") as p:
        view = sorted(os.path.relpath(os.path.join(a, n), p) for a, ds, fs in os.walk(p) for n in ds + fs)
    import tarfile
    with d.diff("child", "base") as stream:
        members = [m.name for m in tarfile.open(fileobj=stream, mode="r|")]
    print(json.dumps({
        "upper": upper,
        "opaque_xattrs": sorted(x for x in os.listxattr(diff / "d") if "opaque" in x),
        "view": view,
        "changes": [str(c) for c in d.changes("child", "base")],
        "tar": members,
        "privileged": d.capabilities.preserves_ownership,
    }))
    d.cleanup()
    """
)

EXPECTED_VIEW = ["d", "d/new"]
EXPECTED_CHANGES = ["C /d", "D /d/g", "A /d/new", "D /f"]


def _whiteouts(where: Path, userns: bool, env: dict[str, str] | None = None) -> dict[str, object]:
    out = run_python(WHITEOUT_SCRIPT, str(where), userns=userns, env=env)
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def _check_common(result: dict[str, object]) -> None:
    assert result["view"] == EXPECTED_VIEW
    assert sorted(result["changes"]) == sorted(EXPECTED_CHANGES)  # type: ignore[arg-type]
    tar = result["tar"]
    assert isinstance(tar, list)
    assert ".wh.f" in tar and "d/new" in tar
    assert not any(".wh..wh." in name and name != "d/.wh..wh..opq" for name in tar)
    upper = result["upper"]
    assert isinstance(upper, dict)
    assert upper["d/new"] == "file"
    assert upper.get("d/.wh..wh..opq") == "file"  # fuse-overlayfs marks every opaque dir this way too


def test_whiteouts_as_root(tmp_path: Path) -> None:
    result = _whiteouts(tmp_path, userns=False)
    _check_common(result)
    assert result["privileged"] is True
    assert result["upper"]["f"] == "chr 0:0"  # type: ignore[index]
    assert result["opaque_xattrs"] == ["trusted.overlay.opaque"]


def test_whiteouts_unprivileged(tmp_path: Path) -> None:
    result = _whiteouts(tmp_path, userns=True)
    _check_common(result)
    assert result["privileged"] is False
    # a 0/0 whiteout needs no CAP_MKNOD since Linux 5.8; trusted.* xattrs are refused
    assert result["upper"]["f"] == "chr 0:0"  # type: ignore[index]
    assert result["opaque_xattrs"] == ["user.fuseoverlayfs.opaque"]


def test_whiteouts_without_mknod_are_wh_files(tmp_path: Path) -> None:
    """Where mknod of a whiteout is refused fuse-overlayfs writes ``.wh.<name>`` files; forced
    here with its FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT switch. A later mount reads them back."""
    result = _whiteouts(tmp_path, userns=True, env={"FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT": "1"})
    _check_common(result)
    upper = result["upper"]
    assert isinstance(upper, dict)
    assert upper.get(".wh.f") == "file"
    assert "f" not in upper


# -- selection and support ------------------------------------------------------------------------

SELECTION_SCRIPT = textwrap.dedent(
    """
    import os, sys, tempfile
    from graphdriver.drivers import registry
    from graphdriver.drivers.overlay2 import Overlay2Driver
    from graphdriver.errors import NotSupported
    scratch = tempfile.mkdtemp(prefix="gd-sel-", dir=sys.argv[1])
    try:
        Overlay2Driver(os.path.join(scratch, "probe", "overlay2"))
        kernel_overlay = "yes"
    except NotSupported as exc:
        kernel_overlay = "no: " + exc.reason
    except Exception as exc:
        kernel_overlay = f"crash: {type(exc).__name__}: {exc}"
    chosen = registry.open_driver(os.path.join(scratch, "store")).name
    print(kernel_overlay)
    print(chosen)
    """
)


def test_selection_in_a_user_namespace_picks_fuse_overlayfs(tmp_path: Path) -> None:
    out = run_python(SELECTION_SCRIPT, str(tmp_path), userns=True)
    kernel_overlay, chosen = out.strip().splitlines()[-2:]
    assert not kernel_overlay.startswith("crash"), kernel_overlay
    assert chosen == ("overlay2" if kernel_overlay == "yes" else "fuse-overlayfs")


def test_probe_reason_for_a_user_who_cannot_open_dev_fuse(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to become uid 65534")
    if os.stat("/dev/fuse").st_mode & stat.S_IROTH and os.stat("/dev/fuse").st_mode & stat.S_IWOTH:
        pytest.skip("/dev/fuse is usable by every user here")
    script = (
        "from graphdriver.drivers import registry\n"
        f"print({{s.name: s.reason for s in registry.probe_drivers({str(tmp_path / 'store')!r})}}"
        "['fuse-overlayfs'])"
    )
    proc = subprocess.run(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},  # the editable install's finder is under /root
        cwd="/",
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "cannot open /dev/fuse: Permission denied"


def test_check_support_reasons(tmp_path: Path) -> None:
    probe = {s.name: s for s in registry.probe_drivers(tmp_path)}["fuse-overlayfs"]
    assert (probe.supported, probe.reason) == (True, "ok")
    assert not (tmp_path / "fuse-overlayfs").exists()


def test_unknown_option_is_refused(tmp_path: Path) -> None:
    from graphdriver.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=r"unknown storage option 'size'"):
        FuseOverlayfsDriver(tmp_path / "fuse-overlayfs", {"size": "1G"})
    with pytest.raises(NotSupported, match=r"no-such-program is not installed"):
        FuseOverlayfsDriver(tmp_path / "fuse-overlayfs", {"mount_program": "no-such-program"})


# -- mounts ---------------------------------------------------------------------------------------


def test_parent_with_children_is_mounted_read_only(tmp_path: Path) -> None:
    d = FuseOverlayfsDriver(tmp_path / "fuse-overlayfs")
    try:
        d.create("a")
        d.create("b", "a")
        d.create("c", "b")
        with d.mounted("b") as p:
            with pytest.raises(OSError) as info:
                (p / "x").write_bytes(b"x")
            assert info.value.errno == 30  # EROFS
        with d.mounted("c") as p:
            (p / "x").write_bytes(b"x")
    finally:
        d.cleanup()


def test_mounts_are_fuse_overlayfs_and_cleanup_removes_them(tmp_path: Path) -> None:
    d = FuseOverlayfsDriver(tmp_path / "fuse-overlayfs")
    d.create("a")
    d.create("b", "a")
    d.create("c", "a")
    pb, pc = d.get("b"), d.get("c")
    assert d.get("b") == pb  # nested
    kinds = {m.mount_point: m.fstype for m in mounts_under(d.home)}
    assert kinds == {str(pb): "fuse.fuse-overlayfs", str(pc): "fuse.fuse-overlayfs"}
    d.cleanup()
    assert mounts_under(d.home) == []
    assert not pb.exists() and not pc.exists()
    d.put("b")  # harmless after cleanup
    d.remove("b")
    assert not d.exists("b")


def test_status(tmp_path: Path) -> None:
    d = FuseOverlayfsDriver(tmp_path / "fuse-overlayfs")
    d.create("a")
    status = dict(d.status())
    assert status["Mount Program"] == shutil.which("fuse-overlayfs")
    assert status["Native Overlay Diff"].startswith("false (")
    assert status["Layers"] == "1"
    unprivileged = "false (unprivileged: no chown outside the mapping)"
    assert status["Preserves Ownership"] == ("true" if d.capabilities.preserves_ownership else unprivileged)


def test_child_root_copies_attributes_but_not_the_opaque_flag(tmp_path: Path) -> None:
    d = FuseOverlayfsDriver(tmp_path / "fuse-overlayfs")
    try:
        d.create("base")
        with d.mounted("base") as p:
            (p / "kept").write_bytes(b"below")
        base_diff = d.home / "base" / "diff"
        os.setxattr(base_diff, "user.note", b"root attribute")
        os.setxattr(base_diff, "user.fuseoverlayfs.opaque", b"y")
        os.chmod(base_diff, 0o750)
        os.utime(base_diff, ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_001))
        d.create("child", "base")
        child_diff = d.home / "child" / "diff"
        assert sorted(os.listxattr(child_diff)) == ["user.note"]
        with d.mounted("child") as p:
            st = os.stat(p)
            assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o750, 1_500_000_000_000_000_001)
            assert os.getxattr(p, "user.note") == b"root attribute"
            assert (p / "kept").read_bytes() == b"below"
    finally:
        d.cleanup()
