"""Test-wide setup: as root, run the whole suite inside a read-only mount namespace.

Everything but the scratch directories (the temp dirs and this checkout) becomes read-only, so a
bug that escapes a layer root fails with EROFS instead of damaging the machine. Set
GRAPHDRIVER_TEST_NO_SANDBOX=1 to opt out (never in CI).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["graphdriver.testing.plugin"]

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0 or os.environ.get("GRAPHDRIVER_TEST_NO_SANDBOX") == "1":
        return
    if os.environ.get("GRAPHDRIVER_TEST_SANDBOXED") == "1":
        return
    from graphdriver.testing.sandbox import enter_readonly_sandbox

    writable = [tempfile.gettempdir(), "/tmp", "/var/tmp", str(REPO), "/dev/shm", "/run"]
    enter_readonly_sandbox(writable)
    os.environ["GRAPHDRIVER_TEST_SANDBOXED"] = "1"
