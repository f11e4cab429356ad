"""overlay2's records (``link``, ``parent``, ``lower``) are written without fsync, so a crash can
leave them empty or torn: the driver rebuilds each from what it is derived from when it reads it,
and refuses (NotFound, naming the way out) only when both ``parent`` and ``lower`` are lost.

The torn states are made the way a crash leaves them: the file truncated to 0 bytes (ext4's
delayed allocation) or its bytes replaced by NULs (XFS).
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver import mount as gm
from graphdriver.drivers.overlay2 import Overlay2Driver
from graphdriver.errors import Busy, NotFound

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="overlay2 needs root")


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Overlay2Driver]:
    d = Overlay2Driver(tmp_path / "overlay2")
    try:
        yield d
    finally:
        d.cleanup()


def _file_tar(name: str, data: bytes) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
        tf.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def _stack(driver: Overlay2Driver) -> dict[str, str]:
    """base <- mid <- top, a file in each of base and mid; returns each layer's record files."""
    driver.create("base")
    driver.apply_diff("base", None, _file_tar("a", b"from base\n"))
    driver.create("mid", "base")
    driver.apply_diff("mid", "base", _file_tar("b", b"from mid\n"))
    driver.create("top", "mid")
    return _records(driver)


def _tear(path: Path, how: str) -> None:
    if how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"\0" * len(path.read_bytes()))


def _records(driver: Overlay2Driver) -> dict[str, str]:
    home = driver.home
    return {
        f"{id}/{name}": (home / id / name).read_text()
        for id in ("base", "mid", "top")
        for name in ("link", "parent", "lower")
        if (home / id / name).exists()
    }


def _assert_mount_shows_the_stack(driver: Overlay2Driver) -> None:
    with driver.mounted("top") as root:
        assert sorted(os.listdir(root)) == ["a", "b"]
        assert (root / "a").read_bytes() == b"from base\n"
        assert (root / "b").read_bytes() == b"from mid\n"


@pytest.mark.parametrize("how", ["empty", "nuls"])
def test_torn_lower_is_rebuilt_from_the_parent_chain_on_get(driver: Overlay2Driver, how: str) -> None:
    before = _stack(driver)
    _tear(driver.home / "top" / "lower", how)
    _assert_mount_shows_the_stack(driver)
    assert _records(driver) == before
    assert before["top/lower"] == f"l/{before['mid/link']}:l/{before['base/link']}"
    assert [n for n in os.listdir(driver.home / "top") if n.startswith(".")] == []  # no temp left


@pytest.mark.parametrize("how", ["empty", "nuls"])
def test_torn_parent_is_read_from_lower(driver: Overlay2Driver, how: str) -> None:
    before = _stack(driver)
    _tear(driver.home / "top" / "parent", how)
    assert driver.parent_of("top") == "mid"
    assert _records(driver) == before


def test_torn_link_is_found_again_in_l(driver: Overlay2Driver) -> None:
    before = _stack(driver)
    _tear(driver.home / "mid" / "link", "empty")
    driver.create("sibling", "mid")  # reads mid's link
    assert _records(driver) == before
    assert (driver.home / "sibling" / "lower").read_text() == before["top/lower"]
    links = {before[f"{id}/link"] for id in ("base", "mid", "top")}
    links.add((driver.home / "sibling" / "link").read_text())
    assert set(os.listdir(driver.home / "l")) == links  # mid's own link found, no new one


def test_lower_and_link_of_every_layer_torn_at_once(driver: Overlay2Driver) -> None:
    before = _stack(driver)
    for id in ("base", "mid", "top"):
        _tear(driver.home / id / "link", "empty")
    for id in ("mid", "top"):
        _tear(driver.home / id / "lower", "nuls")
    _assert_mount_shows_the_stack(driver)
    # what the mount read is rebuilt; top's own link is read only by a child or by remove
    assert _records(driver) == {**before, "top/link": ""}
    driver.create("child", "top")
    assert _records(driver) == before


def test_parent_and_lower_both_lost_is_not_found_naming_check_repair(driver: Overlay2Driver) -> None:
    _stack(driver)
    _tear(driver.home / "top" / "parent", "empty")
    _tear(driver.home / "top" / "lower", "empty")
    message = r"layer top has lost its parent and lower files .* `check --repair` rewrites them"
    with pytest.raises(NotFound, match=message):
        driver.get("top")
    assert not gm.is_mountpoint(driver.home / "top" / "merged")
    with pytest.raises(NotFound, match=message):
        driver.parent_of("top")


def test_verify_records_reports_then_repairs(driver: Overlay2Driver) -> None:
    before = _stack(driver)
    assert driver.verify_records("top", ["mid", "base"], repair=False) == []
    assert driver.verify_records("base", [], repair=False) == []
    _tear(driver.home / "top" / "parent", "empty")
    _tear(driver.home / "top" / "lower", "empty")
    _tear(driver.home / "top" / "link", "nuls")
    wrong = driver.verify_records("top", ["mid", "base"], repair=False)
    nuls = "\0" * 26
    assert wrong == [
        f"link file {nuls!r} does not name its l/ symlink",
        "parent file '', the record says mid",
        "lower file '' does not list the parent chain's links",
    ]
    assert (driver.home / "top" / "lower").read_bytes() == b""  # reads only
    assert driver.verify_records("top", ["mid", "base"], repair=True) == wrong
    assert _records(driver) == before
    assert driver.verify_records("top", ["mid", "base"], repair=False) == []
    _assert_mount_shows_the_stack(driver)


def test_reset_empties_the_layer_and_keeps_its_identity(driver: Overlay2Driver) -> None:
    """reset (LayerStore.import_layers applies a layer again with it): ``diff/`` is as create
    left it, the records and the ``l/`` link stay, and the layer above still mounts on it."""
    before = _stack(driver)
    driver.reset("mid")
    assert os.listdir(driver.home / "mid" / "diff") == []
    assert _records(driver) == before
    with driver.mounted("top") as root:
        assert sorted(os.listdir(root)) == ["a"]
    driver.apply_diff("mid", "base", _file_tar("c", b"again\n"))
    with driver.mounted("top") as root:
        assert sorted(os.listdir(root)) == ["a", "c"]
        assert (root / "c").read_bytes() == b"again\n"
    with driver.mounted("mid"), pytest.raises(Busy):
        driver.reset("mid")
