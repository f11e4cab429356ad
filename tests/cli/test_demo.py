"""scripts/demo.sh, the README's quick start, runs end to end and leaves nothing behind.

As the current user (root: the default driver, overlay2 where it works), and, when running as
root, once more as ``nobody`` with the vfs driver, the way a normal user runs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "scripts" / "demo.sh"

# what the container layer's changes must show (the demo writes, edits, deletes, chmods)
CONTAINER_CHANGES = [
    "A /srv/app/logs",
    "A /srv/app/logs/app.log",
    "C /srv/app/config/app.conf",
    "C /srv/app/run.sh",
    "D /srv/app/VERSION",
    "D /usr/lib/python3/logging",
]
# what the image's second layer must show against the first (whiteouts and the opaque dir)
IMAGE_CHANGES = [
    "A /srv/app/VERSION",
    "A /srv/app/cache/fresh",
    "C /srv/app/config/app.conf",
    "D /srv/app/cache/entry1",
    "D /srv/app/config/old.conf",
    "D /usr/lib/python3/http",
]


def run_demo(env: dict[str, str], user: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(user or []), "bash", str(DEMO)], env=env, capture_output=True, text=True,
                          check=False, timeout=600)


def check_output(proc: subprocess.CompletedProcess[str], driver: str | None) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    lines = out.splitlines()
    assert "Traceback" not in out + proc.stderr
    for line in CONTAINER_CHANGES + IMAGE_CHANGES:
        assert line in lines, f"{line!r} missing from the demo's output:\n{out}"
    assert "$ graphdriver diff-size --parent app ctr" in lines
    size = lines[lines.index("$ graphdriver diff-size --parent app ctr") + 1]
    assert size.isdigit() and int(size) > 0
    used = [line for line in lines if line.startswith("== using driver: ")]
    assert len(used) == 1
    if driver is not None:
        assert used[0] == f"== using driver: {driver}"
    # the exported diff's member list (tar -tv): the new log file and the whiteout of VERSION
    assert any(line.endswith(" srv/app/logs/app.log") for line in lines), out
    assert any(line.endswith(" srv/app/.wh.VERSION") for line in lines), out
    assert lines[-1].startswith("== done (driver ")


def test_demo_as_current_user(tmp_path: Path) -> None:
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPHDRIVER_") or "_TEST" in k}
    env.update(TMPDIR=str(tmp_path), PYTHON=sys.executable)
    proc = run_demo(env)
    check_output(proc, None)
    assert os.listdir(tmp_path) == [], "the demo must remove its temp dir"


def test_demo_as_a_normal_user_with_vfs() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the nobody user (this run already is the normal-user case)")
    python = "/usr/bin/python3"
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8",
           "PYTHON": python, "PYTHONPATH": str(REPO / "src")}
    probe = subprocess.run([*nobody, python, "-c", "import graphdriver.cli.main"], env=env,
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"the nobody user cannot import graphdriver from {REPO / 'src'} with {python}: "
                    f"{probe.stderr.strip().splitlines()[-1:] }")
    work = tempfile.mkdtemp(prefix="gd-demo-nobody-", dir="/var/tmp")
    try:
        os.chown(work, 65534, 65534)
        proc = run_demo({**env, "TMPDIR": work}, nobody)
        check_output(proc, "vfs")
        assert os.listdir(work) == [], "the demo must remove its temp dir"
    finally:
        shutil.rmtree(work, ignore_errors=True)
