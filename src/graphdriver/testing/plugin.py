"""pytest plugin of the conformance suite: a fresh driver per test, and a check that it cleans up.

Enable it in a ``conftest.py`` (graphdriver's own tests do)::

    pytest_plugins = ["graphdriver.testing.plugin"]

Fixtures (named ``gd_*`` so that they never collide with a test module's own ``driver``):

``gd_root``
    An empty directory for the test's graph root: under ``$GRAPHDRIVER_TEST_ROOT`` if set (say,
    an xfs mount to exercise reflinks), else on ``/dev/shm`` when that is a writable tmpfs, else
    under pytest's ``tmp_path``. tmpfs first because the suite should measure the driver, not a
    slow disk: a 10,000-file layer takes seconds on tmpfs and minutes on a throttled disk.
``gd_open``
    A function opening a driver on ``gd_root`` through the test class's ``make_driver(root)``
    hook (:class:`~graphdriver.testing.suite.DriverConformance`); ``gd_open(reopen=d)`` opens
    a new instance on ``d``'s home through ``reopen_driver(d)``. After the test every instance
    gets ``cleanup()``, then no mount may be left under the root (the test fails, after the
    mounts are detached, if one is), and the root is removed.
``gd_driver``
    ``gd_open()``: the driver under test.
``gd_unprivileged``
    (root only, else the test skips) an :class:`Unprivileged` runner: commands as uid/gid 65534
    with no groups and a clean environment (``setpriv``), HOME and TMPDIR in a scratch directory
    that user owns. Used to run the suite, or any check, the way a rootless user would.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from graphdriver.drivers.base import Driver
from graphdriver.fs.remove import mount_points_under, remove_tree
from graphdriver.fs.statfs import filesystem_type

__all__ = [
    "ENV_TEST_ROOT",
    "NOBODY",
    "DriverOpener",
    "Unprivileged",
    "gd_driver",
    "gd_open",
    "gd_root",
    "gd_unprivileged",
]

# the suite's and the tree helpers' asserts explain themselves, as a test module's do
pytest.register_assert_rewrite("graphdriver.testing.suite", "graphdriver.testing.trees")


class DriverOpener(Protocol):
    """The type of the ``gd_open`` fixture."""

    def __call__(self, *, reopen: Driver | None = None) -> Driver: ...


class _Suite(Protocol):
    def make_driver(self, root: Path) -> Driver: ...

    def reopen_driver(self, driver: Driver) -> Driver: ...


ENV_TEST_ROOT = "GRAPHDRIVER_TEST_ROOT"
_SHM = "/dev/shm"


def _fast_base() -> str | None:
    try:
        if filesystem_type(_SHM) == "tmpfs" and os.access(_SHM, os.W_OK | os.X_OK):
            return _SHM
    except OSError:
        pass
    return None


@pytest.fixture
def gd_root(tmp_path: Path) -> Iterator[Path]:
    """An empty graph root for one test (module docstring: where), removed after it."""
    base = os.environ.get(ENV_TEST_ROOT) or _fast_base()
    if base is None:
        root = tmp_path / "graph"
        root.mkdir()
        yield root  # pytest's tmp_path retention applies
        return
    root = Path(tempfile.mkdtemp(prefix="gd-graph-", dir=base))
    yield root
    if not mount_points_under(root):  # else gd_open has failed the test and detached them
        remove_tree(root)


def _detach(points: list[str]) -> None:
    from graphdriver.mount import unmount

    for point in points:
        try:
            unmount(point, detach=True)
        except Exception:  # best effort; the test fails anyway
            pass


@pytest.fixture
def gd_open(request: pytest.FixtureRequest, gd_root: Path) -> Iterator[DriverOpener]:
    """Open driver instances on ``gd_root``; clean them up and check for leftover mounts after."""
    suite: _Suite | None = request.instance
    if suite is None or not hasattr(suite, "make_driver"):
        raise pytest.UsageError("gd_open is for methods of a DriverConformance subclass (make_driver hook)")
    opened: list[Driver] = []

    def open_driver(*, reopen: Driver | None = None) -> Driver:
        assert suite is not None
        driver = suite.reopen_driver(reopen) if reopen is not None else suite.make_driver(gd_root)
        opened.append(driver)
        return driver

    yield open_driver

    errors: list[BaseException] = []
    for driver in reversed(opened):
        try:
            driver.cleanup()
        except Exception as exc:  # report after the checks below
            errors.append(exc)
    left = mount_points_under(gd_root)
    _detach(left)
    try:
        remove_tree(gd_root)
    except Exception as exc:  # report after the mount check
        errors.append(exc)
    if left:
        pytest.fail(f"mounts left under the graph root after cleanup(): {', '.join(left)}")
    if errors:
        raise errors[0]


@pytest.fixture
def gd_driver(gd_open: Callable[[], Driver]) -> Driver:
    """The driver under test, fresh for this test."""
    return gd_open()


# -- running as an unprivileged user -------------------------------------------------------------

NOBODY = 65534
"""The uid and gid unprivileged runs use."""


def _reachable(path: str) -> bool:
    """Whether any user may reach ``path`` (every directory on the way searchable by others)."""
    parts = Path(path).parts
    for i in range(1, len(parts) + 1):
        try:
            mode = os.stat(os.path.join(*parts[:i])).st_mode
        except OSError:
            return False
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return False
    return True


@dataclass(frozen=True)
class Unprivileged:
    """Runs commands as uid/gid :data:`NOBODY` (see the ``gd_unprivileged`` fixture)."""

    scratch: Path
    """a directory the user owns: HOME and TMPDIR of every command"""

    def command(self, argv: Sequence[str], *, python: bool = False) -> list[str]:
        """The full command line for ``argv`` (``python=True``: ``argv`` are this Python's args).

        When this Python lives where the user cannot reach it (pyenv under a 0700 /root), its
        installation is bind-mounted into the scratch directory in a private mount namespace
        that lives as long as the command.
        """
        drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--reset-env"]
        env = ["env", f"HOME={self.scratch}", f"TMPDIR={self.scratch}", "PYTHONDONTWRITEBYTECODE=1"]
        if not python:
            return [*drop, *env, *argv]
        exe = os.path.realpath(sys.executable)
        prefix = os.path.realpath(sys.base_prefix)
        if _reachable(exe) and _reachable(prefix) and _reachable(os.path.realpath(sys.prefix)):
            return [*drop, *env, exe, *argv]
        if sys.prefix != sys.base_prefix or not exe.startswith(prefix + "/"):
            pytest.skip(f"this Python ({exe}) is not reachable by uid {NOBODY}")
        if shutil.which("unshare") is None:
            pytest.skip("unshare (util-linux) is needed to lend this Python to an unprivileged user")
        mnt = self.scratch / "python"
        mnt.mkdir(exist_ok=True)
        inner = str(mnt / os.path.relpath(exe, prefix))
        # the interpreter's RUNPATH names libpython under the unreachable prefix: without this the
        # loader silently takes the system's libpython, with another stdlib's frozen modules
        env.append(f"LD_LIBRARY_PATH={mnt / 'lib'}")
        script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
                prefix, str(mnt), *drop, *env, inner, *argv]  # fmt: skip

    def run(
        self,
        argv: Sequence[str],
        *,
        python: bool = False,
        cwd: Path | str | None = None,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as the unprivileged user; output captured as text (stderr into stdout)."""
        return subprocess.run(
            self.command(argv, python=python),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.fixture
def gd_unprivileged() -> Iterator[Unprivileged]:
    """An :class:`Unprivileged` runner with a fresh scratch directory owned by uid 65534."""
    if os.geteuid() != 0:
        pytest.skip("switching to an unprivileged user needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    scratch = Path(tempfile.mkdtemp(prefix="gd-nobody-", dir="/tmp"))
    os.chown(scratch, NOBODY, NOBODY)
    try:
        yield Unprivileged(scratch)
    finally:
        from graphdriver.mount import unmount

        if mount_points_under(scratch):
            unmount(scratch / "python", detach=True)
        remove_tree(scratch)
