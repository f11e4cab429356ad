#!/usr/bin/env python3
"""Write the seed corpus of fuzz_apply.py into fuzz/corpus/ (deterministic: same bytes each run).

One small archive per shape the applier must understand or refuse: every entry type, the ustar,
GNU and PAX encodings, whiteouts and opaque markers, aufs hard-link storage, devices, the hostile
shapes of reference/security.md, and each compression. Run it again after changing a seed;
inputs the fuzzer found worth keeping are added by hand (``-merge=1``, see fuzz/README.md).
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from graphdriver.testing.tarbuild import Header, TarBuilder, compress, encode_header

T = 1_700_000_000_123_456_789
CORPUS = Path(__file__).resolve().parent / "corpus"


def basic() -> bytes:
    return (
        TarBuilder()
        .dir("etc", mtime_ns=T)
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mode=0o644, mtime_ns=T)
        .file("etc/shadow", b"root:*:1::::::\n", mode=0o600, uid=0, gid=42)
        .dir("usr/bin", mode=0o755)
        .file("usr/bin/tool", b"#!/bin/sh\necho hi\n", mode=0o4755)
        .symlink("bin", "usr/bin")
        .hardlink("usr/bin/tool2", "usr/bin/tool")
        .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
        .dir("tmp", mode=0o1777)
        .build()
    )


def encodings() -> bytes:
    long = "d/" * 60 + "file-with-a-long-name"
    return (
        TarBuilder(longnames="gnu")
        .file(long, b"gnu long name")
        .symlink("s" * 120, "t" * 150)
        .build()
        + TarBuilder()
        .file(long + "-pax", b"pax long name", mtime_ns=T, atime_ns=T + 1)
        .file("x", b"xattrs", xattrs={"user.a": b"1", "security.capability": b"\x01\x00\x00\x02" + bytes(16)})
        .global_header({"comment": "global"})
        .file("big-uid", b"", uid=2**22, gid=2**21)
        .build()
    )


def whiteouts() -> bytes:
    return (
        TarBuilder()
        .dir("a")
        .file("a/keep", b"k")
        .opaque("a")
        .whiteout("b")
        .whiteout("c/d")
        .file("x", b"new x")
        .whiteout("x")
        .file("c/.wh..wh..opq")
        .build()
    )


def devices() -> bytes:
    return (
        TarBuilder()
        .char("dev/null", 1, 3, mode=0o666)
        .block("dev/loop9", 7, 9, mode=0o660)
        .fifo("run/fifo", mode=0o600)
        .char("wh", 0, 0)
        .build()
    )


def aufs() -> bytes:
    return (
        TarBuilder()
        .dir(".wh..wh.plnk")
        .file(".wh..wh.plnk/1234.5678", b"linked data")
        .hardlink("a/one", ".wh..wh.plnk/1234.5678")
        .hardlink("b/two", ".wh..wh.plnk/1234.5678")
        .file(".wh..wh.aufs", b"")
        .build()
    )


def hostile_names() -> bytes:
    return (
        TarBuilder()
        .file("../escape", b"x")
        .file("/abs/file", b"y")
        .file("a/../../up", b"z")
        .dir("./")
        .file(".wh..", b"")
        .build(end=False)
        + bytes(1024)
    )


def hostile_links() -> bytes:
    return (
        TarBuilder()
        .dir("inner")
        .symlink("inner/go_up", "..")
        .symlink("inner/go_up/escape", "../victim")
        .file("inner/go_up/escape/newfile", b"n")
        .symlink("loophole", "/")
        .file("loophole/tmp/x", b"x")
        .symlink("X", "/etc/passwd")
        .hardlink("sketchy", "X", mode=0o777)
        .hardlink("h", "../../etc/passwd")
        .build()
    )


def override_path() -> bytes:
    return (
        TarBuilder()
        .dir("foo")
        .dir("foo/tmp")
        .file("foo/tmp/f", b"345")
        .symlink("foo", "/")
        .file("foo/tmp/f", b"678")
        .dir("d", mode=0o000, mtime_ns=T)
        .file("d/child", b"c")
        .symlink("d", "/etc")
        .build()
    )


def malformed() -> bytes:
    return (
        TarBuilder()
        .file("neg", b"", raw={"size": -1})
        .char("dev/big", 0, 0, raw={"devmajor": 2**32})
        .entry("unknown", b"Z")
        .file("nul", pax={"path": b"a\0b"})
        .build()
    )


def old_style() -> bytes:
    v7 = encode_header(Header(name=b"v7file", size=3, typeflag=b"\0", magic=b"\0" * 6, version=b"\0\0"))
    olddir = encode_header(Header(name=b"olddir/", typeflag=b"\0"))
    return v7 + b"abc" + bytes(509) + olddir + bytes(1024)


def gnu_tar() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        (src / "dir/sub").mkdir(parents=True)
        (src / "dir/sub/file").write_bytes(b"made by GNU tar\n")
        (src / "dir/link").symlink_to("sub/file")
        return subprocess.run(
            [
                *("tar", "--format=pax", "--numeric-owner", "--owner=0", "--group=0", "--sort=name"),
                *("--mtime=@1700000000", "--pax-option=delete=atime,delete=ctime"),
                *("-C", str(src), "-cf", "-", "."),
            ],
            check=True,
            capture_output=True,
        ).stdout


def multi_member() -> bytes:
    tar = basic()
    return gzip.compress(tar[:1024], mtime=0) + gzip.compress(tar[1024:], mtime=0)


SEEDS: dict[str, Callable[[], bytes]] = {
    "basic.tar": basic,
    "encodings.tar": encodings,
    "whiteouts.tar": whiteouts,
    "devices.tar": devices,
    "aufs.tar": aufs,
    "hostile-names.tar": hostile_names,
    "hostile-links.tar": hostile_links,
    "override-path.tar": override_path,
    "malformed.tar": malformed,
    "old-style.tar": old_style,
    "gnu-tar.tar": gnu_tar,
    "empty.tar": lambda: bytes(1024),
    "basic.tar.gz": lambda: compress(basic(), "gzip"),
    "whiteouts.tar.zst": lambda: compress(whiteouts(), "zstd"),
    "encodings.tar.bz2": lambda: compress(encodings(), "bzip2"),
    "devices.tar.xz": lambda: compress(devices(), "xz"),
    "multi-member.tar.gz": multi_member,
    "hostile-links.tar.gz": lambda: compress(hostile_links(), "gzip"),
}


def main() -> int:
    CORPUS.mkdir(exist_ok=True)
    for name, make in SEEDS.items():
        (CORPUS / name).write_bytes(make())
    print(f"wrote {len(SEEDS)} seeds to {CORPUS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
