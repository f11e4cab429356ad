"""The test suite runs, as root, in a namespace where the machine outside the scratch dirs is read-only."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest


@pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox is entered only as root")
def test_outside_scratch_is_read_only(tmp_path: Path) -> None:
    if os.environ.get("GRAPHDRIVER_TEST_NO_SANDBOX") == "1":
        pytest.skip("sandbox disabled by GRAPHDRIVER_TEST_NO_SANDBOX=1")
    with pytest.raises(OSError) as info:
        Path("/etc/graphdriver-sandbox-probe").write_text("x")
    assert info.value.errno == errno.EROFS
    (tmp_path / "ok").write_text("scratch is writable")
    assert (tmp_path / "ok").read_text() == "scratch is writable"
