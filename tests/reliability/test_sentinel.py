"""The sentinel oracle itself: it sees every kind of damage a breakout can do, and nothing else."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from graphdriver.testing.sentinel import Sentinel


def arm(tmp_path: Path) -> Sentinel:
    (tmp_path / "root").mkdir()
    s = Sentinel(tmp_path, exclude=("root",))
    s.arm()
    return s


def overwrite(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)  # root: the 0400 mode does not stop it
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def relink(path: Path, target: str) -> None:
    os.unlink(path)
    os.symlink(target, path)


DAMAGE: dict[str, Callable[[Sentinel], None]] = {
    "overwrite-same-size": lambda s: overwrite(s.victim / "hello", s.hello.upper()),
    "chmod-to-the-same-mode": lambda s: os.chmod(s.victim / "hello", 0o400),
    "chown": lambda s: os.chown(s.victim / "dir/inner", 1, 1),
    "utime": lambda s: os.utime(s.victim / "dir", ns=(1, 1)),
    "xattr": lambda s: os.setxattr(s.victim / "hello", "user.x", b"1"),
    "hardlink-into-root": lambda s: os.link(s.victim / "hello", s.base / "root/grab"),
    "new-file-next-to-root": lambda s: write(s.base / "planted", b"x"),
    "new-file-in-victim": lambda s: write(s.victim / "new", b"x"),
    "unlink-symlink": lambda s: os.unlink(s.victim / "link"),
    "replace-symlink-target": lambda s: relink(s.victim / "link", "dir"),
    "remove-fifo": lambda s: os.unlink(s.victim / "fifo"),
    "sibling-secret-changed": lambda s: overwrite(s.evil / "secret", b"!"),
}


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damage_is_seen(name: str, tmp_path: Path) -> None:
    s = arm(tmp_path)
    DAMAGE[name](s)
    with pytest.raises(AssertionError, match="the sentinel tree was touched"):
        s.assert_intact(scan=[tmp_path / "root"])


def test_a_copy_inside_the_root_is_seen(tmp_path: Path) -> None:
    s = arm(tmp_path)
    (tmp_path / "root/copy").write_bytes(s.hello)
    with pytest.raises(AssertionError, match="holds a sentinel's bytes"):
        s.assert_intact(scan=[tmp_path / "root"])


def test_reading_and_work_inside_the_root_are_not_damage(tmp_path: Path) -> None:
    s = arm(tmp_path)
    for path in (s.victim / "hello", s.victim / "dir/inner", s.evil / "secret"):
        assert path.read_bytes() in s.secrets
    os.listdir(s.victim)
    (tmp_path / "root/sub").mkdir()
    os.symlink(s.victim / "hello", tmp_path / "root/sub/link")  # links out are not copies
    s.assert_intact(scan=[tmp_path / "root"])
    # the excluded root may go
    shutil.rmtree(tmp_path / "root")
    s.assert_intact()
