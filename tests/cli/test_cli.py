"""The ``graphdriver`` command, run as a subprocess the way a user runs it.

Every command's output and exit status with each driver that works here (vfs always; overlay2
when root and the kernel allow it, skipped with the reason otherwise), the ``--json`` shapes, the
error contract (one ``graphdriver: error:`` line, the error class's exit status, no traceback),
mount counts that survive the process, and the atomic ``diff -o``.
"""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from graphdriver import __version__
from graphdriver.drivers import known_drivers, probe_drivers
from graphdriver.errors import (
    AlreadyExists,
    ArchiveError,
    Busy,
    InvalidArgument,
    NotFound,
    NotSupported,
    PermissionDenied,
)

EXISTS = AlreadyExists.exit_code
BAD_ARCHIVE = ArchiveError.exit_code
BUSY = Busy.exit_code
INVALID = InvalidArgument.exit_code
MISSING = NotFound.exit_code
UNSUPPORTED = NotSupported.exit_code
DENIED = PermissionDenied.exit_code

MTIME = 1_600_000_000
COMMANDS = [
    "drivers",
    "status",
    "create",
    "remove",
    "mount",
    "unmount",
    "exists",
    "diff",
    "changes",
    "apply-diff",
    "diff-size",
    "cleanup",
]


# -- helpers -----------------------------------------------------------------------------------


def gd(
    root: Path | None,
    *args: str,
    stdin: Any = None,
    input: bytes | None = None,
    stdout: Any = subprocess.PIPE,
    stderr: Any = subprocess.PIPE,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m graphdriver [--root ROOT] ARGS`` and return the finished process."""
    argv = [sys.executable, "-m", "graphdriver"]
    if root is not None:
        argv += ["--root", str(root)]
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GRAPHDRIVER_") or k.startswith("GRAPHDRIVER_TEST")
    }
    return subprocess.run(
        [*argv, *args],
        stdin=stdin,
        input=input,
        stdout=stdout,
        stderr=stderr,
        env={**base, **(env or {})},
        check=False,
        timeout=120,
    )


def ok(root: Path, *args: str, **kw: Any) -> str:
    """Run a command that must succeed with nothing on stderr; return its stdout as text."""
    proc = gd(root, *args, **kw)
    assert proc.returncode == 0, (args, proc.returncode, proc.stderr.decode())
    assert proc.stderr == b"", proc.stderr.decode()
    return proc.stdout.decode()


def js(root: Path, *args: str, **kw: Any) -> Any:
    return json.loads(ok(root, "--json", *args, **kw))


def fails(root: Path | None, *args: str, status: int, match: str, **kw: Any) -> None:
    """The command fails with ``status`` and exactly one error line containing ``match``."""
    proc = gd(root, *args, **kw)
    err = proc.stderr.decode()
    assert proc.returncode == status, (args, proc.returncode, err)
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("graphdriver: error: "), err
    assert match in err, err


def make_tar(path: Path, entries: list[tuple[str, str | None]]) -> Path:
    """A layer tar: ``(name, content)`` entries; content None is a directory. Fixed times/owners."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            info.mtime = MTIME
            info.uid, info.gid = os.getuid(), os.getgid()
            if content is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                data = content.encode()
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    return path


APP_V2 = "workers = 16\n"
NEW = "fresh\n"
VERSION = "1.0\n"


@pytest.fixture
def layers(tmp_path: Path) -> tuple[Path, Path]:
    """Two layers: a base, and one that modifies, deletes (whiteout) and replaces (opaque)."""
    src = tmp_path / "tars"
    src.mkdir()
    l1 = make_tar(
        src / "layer1.tar",
        [
            ("etc", None),
            ("etc/app.conf", "workers = 2\n"),
            ("etc/old.conf", "legacy\n"),
            ("cache", None),
            ("cache/a", "a\n"),
            ("cache/b", "b\n"),
        ],
    )
    l2 = make_tar(
        src / "layer2.tar",
        [
            ("etc", None),
            ("etc/app.conf", APP_V2),
            ("etc/.wh.old.conf", ""),
            ("cache", None),
            ("cache/.wh..wh..opq", ""),
            ("cache/new", NEW),
            ("VERSION", VERSION),
        ],
    )
    return l1, l2


@pytest.fixture(params=["vfs", "overlay2"])
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    name: str = request.param
    support = {p.name: p for p in probe_drivers(tmp_path / "probe")}
    if not support[name].supported:
        pytest.skip(f"{name} does not work here: {support[name].reason}")
    return name


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "root"
    yield path
    if path.exists():
        gd(path, "cleanup")


def records_parents(driver: str) -> bool:
    """Whether the driver implements ``parent_of`` (the CLI's default for ``--parent``)."""
    from graphdriver.drivers import Driver, driver_class

    return driver_class(driver).parent_of is not Driver.parent_of


def is_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


# -- help, version -------------------------------------------------------------------------------


def test_version() -> None:
    proc = gd(None, "--version")
    assert proc.returncode == 0
    assert proc.stdout.decode() == f"graphdriver {__version__}\n"


def test_help_lists_every_command_and_each_has_an_example() -> None:
    top = gd(None, "--help")
    assert top.returncode == 0
    text = top.stdout.decode()
    for command in COMMANDS:
        assert f"    {command}" in text
        sub = gd(None, command, "--help")
        assert sub.returncode == 0, command
        example = sub.stdout.decode().partition("\nexample:\n  ")[2]
        assert "graphdriver " in example and command in example, command


# -- drivers, status --------------------------------------------------------------------------------


def test_drivers_reports_every_known_driver(tmp_path: Path) -> None:
    data = js(tmp_path / "r", "drivers")
    assert [d["name"] for d in data["drivers"]] == known_drivers()
    assert set(data) == {"root", "selected", "selected_because", "drivers"}
    assert data["root"] == str(tmp_path / "r")
    by_name = {d["name"]: d for d in data["drivers"]}
    assert by_name["vfs"]["supported"] is True and by_name["vfs"]["priority"] == 4
    for d in data["drivers"]:
        assert set(d) == {"name", "supported", "reason", "priority"}
        assert isinstance(d["reason"], str) and d["reason"]
    assert by_name["aufs"]["supported"] is False and by_name["aufs"]["priority"] is None
    assert by_name["devmapper"]["supported"] is False
    assert by_name[data["selected"]]["supported"] is True
    assert data["selected_because"] == "the first in priority order that works here"

    text = ok(tmp_path / "r", "drivers")
    lines = text.splitlines()
    assert lines[0].split() == ["DRIVER", "WORKS", "PRIORITY", "DETAILS"]
    for name in known_drivers():
        assert any(line.split()[0] == name for line in lines[1:] if line), name
    assert lines[-1] == f"selected: {data['selected']} (the first in priority order that works here)"
    assert not (tmp_path / "r").exists(), "drivers must not create anything"


def test_drivers_selection_explicit_and_by_existing_state(tmp_path: Path) -> None:
    root = tmp_path / "r"
    data = js(root, "--driver", "vfs", "drivers")
    assert (data["selected"], data["selected_because"]) == ("vfs", "chosen with --driver")
    data = js(root, "drivers", env={"GRAPHDRIVER_DRIVER": "vfs"})
    assert (data["selected"], data["selected_because"]) == ("vfs", "chosen with $GRAPHDRIVER_DRIVER")
    ok(root, "--driver", "vfs", "create", "base")
    data = js(root, "drivers")
    assert (data["selected"], data["selected_because"]) == ("vfs", f"its state already exists under {root}")
    assert js(root, "status")["driver"] == "vfs"


def test_status(root: Path, driver: str) -> None:
    text = ok(root, "--driver", driver, "status")
    pairs = [tuple(part.strip() for part in line.split(":", 1)) for line in text.splitlines()]
    assert pairs[:3] == [("Driver", driver), ("Root", str(root)), ("Home", str(root / driver))]
    starts = {len(line) - len(line.split(":", 1)[1].lstrip()) for line in text.splitlines()}
    assert len(starts) == 1, "values are aligned in one column"
    data = js(root, "--driver", driver, "status")
    assert (data["driver"], data["root"], data["home"]) == (driver, str(root), str(root / driver))
    assert isinstance(data["status"], dict)
    assert all(isinstance(v, str) for v in data["status"].values())


def test_global_options_after_the_command(root: Path) -> None:
    data = json.loads(ok(root, "status", "--driver", "vfs", "--json"))
    assert data["driver"] == "vfs"


def test_root_from_environment(tmp_path: Path) -> None:
    root = tmp_path / "envroot"
    proc = gd(None, "--driver", "vfs", "--json", "status", env={"GRAPHDRIVER_ROOT": str(root)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["root"] == str(root)


# -- the layer lifecycle --------------------------------------------------------------------------


def test_layer_lifecycle(root: Path, driver: str, layers: tuple[Path, Path], tmp_path: Path) -> None:
    l1, l2 = layers
    g = ("--driver", driver)

    assert ok(root, *g, "create", "base") == ""
    assert js(root, *g, "create", "--parent", "base", "app") == {"id": "app", "parent": "base"}
    assert gd(root, *g, "exists", "app").returncode == 0
    assert gd(root, *g, "exists", "app").stdout == b""
    missing = gd(root, *g, "exists", "nope")
    assert (missing.returncode, missing.stdout, missing.stderr) == (1, b"", b"")
    assert json.loads(gd(root, *g, "--json", "exists", "nope").stdout) == {"id": "nope", "exists": False}
    assert js(root, *g, "exists", "app") == {"id": "app", "exists": True}

    # apply-diff: the base from a file, the second layer from stdin; prints the change size
    base_size = int(ok(root, *g, "apply-diff", "--parent", "", "base", str(l1)))
    assert base_size > 0
    ok(root, *g, "remove", "app")
    ok(root, *g, "create", "--parent", "base", "app")
    with open(l2, "rb") as f:
        data = js(root, *g, "apply-diff", "--parent", "base", "app", "-", stdin=f)
    assert data == {"id": "app", "parent": "base", "bytes": len(APP_V2) + len(NEW) + len(VERSION)}

    # the image layer's changes: the whiteouts and the opaque dir are applied
    lines = ok(root, *g, "changes", "--parent", "base", "app").splitlines()
    assert lines == sorted(lines, key=lambda line: line[2:])
    assert {
        "C /etc/app.conf",
        "D /etc/old.conf",
        "D /cache/a",
        "D /cache/b",
        "A /cache/new",
        "A /VERSION",
    } <= set(lines)
    assert set(lines) <= {
        "C /etc/app.conf",
        "D /etc/old.conf",
        "D /cache/a",
        "D /cache/b",
        "A /cache/new",
        "A /VERSION",
        "C /etc",
        "C /cache",
    }
    whole = ok(root, *g, "changes", "--parent", "", "app").splitlines()
    assert "A /etc/app.conf" in whole and "A /cache/new" in whole and "A /etc/old.conf" not in whole
    assert all(line.startswith("A /") for line in whole)

    # a container layer: mount, write, changes, diff-size, diff
    ok(root, *g, "create", "--parent", "app", "ctr")
    path = ok(root, *g, "mount", "ctr").rstrip("\n")
    assert os.path.isabs(path) and os.path.isdir(path)
    assert js(root, *g, "mount", "ctr") == {"id": "ctr", "path": path}
    assert sorted(os.listdir(path)) == ["VERSION", "cache", "etc"]
    assert sorted(os.listdir(os.path.join(path, "cache"))) == ["new"]
    (Path(path) / "data").mkdir()
    (Path(path) / "data" / "x").write_text("12345")
    (Path(path) / "etc" / "app.conf").write_text("workers = 32\n")
    (Path(path) / "VERSION").unlink()
    assert ok(root, *g, "unmount", "ctr") == ""
    assert js(root, *g, "unmount", "ctr") == {"id": "ctr"}

    # /etc is reported because a child changed (as the seed does, to carry its metadata)
    expected = ["A /data", "A /data/x", "D /VERSION", "C /etc", "C /etc/app.conf"]
    expected_sorted = sorted(expected, key=lambda line: line[2:])
    p = ("--parent", "app")
    assert ok(root, *g, "changes", *p, "ctr").splitlines() == expected_sorted
    assert js(root, *g, "changes", *p, "ctr") == {
        "id": "ctr",
        "parent": "app",
        "changes": [{"kind": line[0], "path": line[2:]} for line in expected_sorted],
    }
    size = 5 + len("workers = 32\n")
    assert ok(root, *g, "diff-size", *p, "ctr") == f"{size}\n"
    assert js(root, *g, "diff-size", *p, "ctr") == {"id": "ctr", "parent": "app", "bytes": size}
    if records_parents(driver):  # without --parent: the parent the layer was created on
        assert ok(root, *g, "changes", "ctr").splitlines() == expected_sorted
        assert ok(root, *g, "diff-size", "ctr") == f"{size}\n"
    else:
        for command in ("changes", "diff-size", "diff"):
            fails(
                root,
                *g,
                command,
                "ctr",
                status=INVALID,
                match=f"the {driver} driver does not record parents",
            )

    proc = gd(root, *g, "diff", *p, "ctr")
    assert proc.returncode == 0 and proc.stderr == b""
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == [".wh.VERSION", "data", "data/x", "etc", "etc/app.conf"]
        assert tar.extractfile(members["data/x"]).read() == b"12345"  # type: ignore[union-attr]
    out = tmp_path / "ctr.tar.gz"
    data = js(root, *g, "diff", *p, "--compression", "gzip", "-o", str(out), "ctr")
    assert data == {
        "id": "ctr",
        "parent": "app",
        "output": str(out),
        "compression": "gzip",
        "bytes": out.stat().st_size,
    }
    with tarfile.open(out, "r:gz") as tar:
        assert sorted(tar.getnames()) == [".wh.VERSION", "data", "data/x", "etc", "etc/app.conf"]
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()

    assert js(root, *g, "remove", "ctr") == {"id": "ctr"}
    assert gd(root, *g, "exists", "ctr").returncode == 1
    assert js(root, *g, "cleanup") == {"driver": driver}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_apply_diff_of_compressed_layers(
    root: Path, driver: str, layers: tuple[Path, Path], tmp_path: Path
) -> None:
    import gzip

    l1, _ = layers
    gz = tmp_path / "layer1.tar.gz"
    gz.write_bytes(gzip.compress(l1.read_bytes()))
    ok(root, "--driver", driver, "create", "base")
    assert int(ok(root, "--driver", driver, "apply-diff", "--parent", "", "base", str(gz))) > 0
    path = ok(root, "--driver", driver, "mount", "base").strip()
    assert (Path(path) / "etc" / "app.conf").read_text() == "workers = 2\n"
    ok(root, "--driver", driver, "unmount", "base")


def test_mount_counts_persist_across_invocations(root: Path, driver: str) -> None:
    g = ("--driver", driver)
    ok(root, *g, "create", "base")
    ok(root, *g, "create", "--parent", "base", "ctr")
    first = ok(root, *g, "mount", "ctr").strip()
    second = ok(root, *g, "mount", "ctr").strip()
    assert first == second
    ok(root, *g, "unmount", "ctr")
    from graphdriver.drivers import driver_class

    if driver_class(driver).capabilities.mounts:
        assert is_mounted(first), "one unmount of two must leave the layer mounted"
        fails(root, *g, "remove", "ctr", status=BUSY, match="ctr")
        ok(root, *g, "unmount", "ctr")
        assert not is_mounted(first), "the last unmount must unmount"
    else:
        ok(root, *g, "unmount", "ctr")  # nothing is mounted, nothing is counted
    ok(root, *g, "remove", "ctr")


# -- diff -o is atomic -------------------------------------------------------------------------------


def test_diff_to_file_is_atomic(root: Path, tmp_path: Path, layers: tuple[Path, Path]) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "layer.tar"
    out.write_bytes(b"previous content")
    ok(root, "--driver", "vfs", "create", "base")
    ok(root, "--driver", "vfs", "apply-diff", "--parent", "", "base", str(layers[0]))
    fails(
        root,
        "--driver",
        "vfs",
        "diff",
        "--parent",
        "",
        "-o",
        str(out),
        "nope",
        status=MISSING,
        match="nope",
    )
    fails(
        root,
        "--driver",
        "vfs",
        "diff",
        "--parent",
        "nope",
        "-o",
        str(out),
        "base",
        status=MISSING,
        match="nope",
    )
    assert out.read_bytes() == b"previous content"
    assert sorted(os.listdir(out_dir)) == ["layer.tar"], "no temp file may be left behind"
    fails(
        root,
        "--driver",
        "vfs",
        "diff",
        "--parent",
        "",
        "-o",
        str(tmp_path / "no" / "such" / "dir.tar"),
        "base",
        status=MISSING,
        match="does not exist",
    )
    fails(
        root,
        "--driver",
        "vfs",
        "diff",
        "--parent",
        "",
        "-o",
        str(out_dir),
        "base",
        status=INVALID,
        match="is a directory",
    )
    ok(root, "--driver", "vfs", "diff", "--parent", "", "-o", str(out), "base")
    with tarfile.open(out) as tar:
        assert {"etc/app.conf", "etc/old.conf", "cache/a"} <= set(tar.getnames())
    assert sorted(os.listdir(out_dir)) == ["layer.tar"]


# -- errors ------------------------------------------------------------------------------------------


def test_user_mistakes_are_one_line_errors(root: Path, tmp_path: Path) -> None:
    g = ("--driver", "vfs")
    ok(root, *g, "create", "base")
    fails(root, *g, "create", "../escape", status=INVALID, match="invalid layer id")
    fails(root, *g, "create", "base", status=EXISTS, match="base")
    fails(root, *g, "create", "--parent", "nope", "child", status=MISSING, match="nope")
    fails(root, *g, "mount", "nope", status=MISSING, match="nope")
    fails(root, *g, "remove", "nope", status=MISSING, match="nope")
    fails(root, *g, "changes", "--parent", "", "nope", status=MISSING, match="nope")
    fails(root, *g, "diff-size", "--parent", "", "nope", status=MISSING, match="nope")
    fails(
        root,
        *g,
        "apply-diff",
        "base",
        str(tmp_path / "missing.tar"),
        status=MISSING,
        match=f"{tmp_path / 'missing.tar'}: No such file or directory",
    )
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar archive\n" * 100)
    ok(root, *g, "create", "victim")
    fails(
        root,
        *g,
        "apply-diff",
        "--parent",
        "",
        "victim",
        str(garbage),
        status=BAD_ARCHIVE,
        match="",
    )
    fails(
        root,
        *g,
        "apply-diff",
        "base",
        str(tmp_path),
        status=INVALID,
        match="Is a directory",
    )
    fails(
        root,
        "--driver",
        "nosuch",
        "status",
        status=INVALID,
        match="unknown driver 'nosuch'",
    )
    fails(root, "--storage-opt", "novalue", "status", status=2, match="expected KEY=VALUE")
    fails(root, *g, "frobnicate", status=2, match="invalid choice: 'frobnicate'")
    fails(root, *g, "diff", "--compression", "xz", "base", status=2, match="invalid choice: 'xz'")
    fails(root, *g, "create", status=2, match="the following arguments are required: ID")
    fails(root, "--root", "", "status", status=INVALID, match="--root must not be empty")
    fails(
        root,
        *g,
        "--json",
        "diff",
        "--parent",
        "",
        "base",
        status=INVALID,
        match="--json with diff needs -o FILE",
    )
    # with --json, errors still go to stderr as one line, and stdout stays empty
    proc = gd(root, *g, "--json", "mount", "nope")
    assert proc.stdout == b"" and proc.stderr.decode().startswith("graphdriver: error: ")


def test_a_driver_that_cannot_work_here(root: Path) -> None:
    support = {p.name: p for p in probe_drivers(root)}
    if support["btrfs"].supported:
        pytest.skip("the test root is on btrfs")
    fails(root, "--driver", "btrfs", "create", "x", status=UNSUPPORTED, match="btrfs")


def test_read_only_root_is_a_permission_error(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only tmpfs")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        fails(ro, "--driver", "vfs", "create", "x", status=DENIED, match=str(ro))
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_refuses_to_write_a_tar_to_a_terminal(root: Path) -> None:
    ok(root, "--driver", "vfs", "create", "base")
    leader, follower = pty.openpty()
    try:
        proc = gd(root, "--driver", "vfs", "diff", "--parent", "", "base", stdout=follower)
        assert proc.returncode == INVALID
        err = proc.stderr.decode()
        assert err == (
            "graphdriver: error: refusing to write a tar archive to a terminal: "
            "use -o FILE or redirect stdout\n"
        )
        proc = gd(root, "--driver", "vfs", "apply-diff", "--parent", "", "base", stdin=follower)
        assert proc.returncode == INVALID
        err = proc.stderr.decode()
        assert err.startswith("graphdriver: error: refusing to read a layer tar from a terminal"), err
    finally:
        os.close(leader)
        os.close(follower)


def test_broken_pipe_is_quiet(root: Path, layers: tuple[Path, Path]) -> None:
    ok(root, "--driver", "vfs", "create", "base")
    ok(root, "--driver", "vfs", "apply-diff", "--parent", "", "base", str(layers[0]))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = gd(root, "--driver", "vfs", "changes", "--parent", "", "base", stdout=write_end)
    finally:
        os.close(write_end)
    assert proc.returncode == 141
    assert proc.stderr == b""
