"""Hostile layers (reference/security.md): each case ends in its documented typed error, or stays
inside the root with exact expected content; and in every case the sentinel tree next to the root
is unchanged byte for byte and stat for stat, and no file in the root holds its bytes.

Layout of each case (the moby testBreakout oracle, extended)::

    base/
      dest/                 the layer root; holds an empty victim/ and etc/passwd ("inside")
      victim/hello          unique bytes, mode 0400, xattr user.sentinel, fixed times
      victim/dir/inner      a directory with a file
      victim/link -> hello
      dest-evil/secret      the sibling-prefix trap (base/dest vs base/dest-evil)
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import os
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from graphdriver.archive.apply import apply_layer
from graphdriver.archive.types import Limits, WhiteoutFormat
from graphdriver.errors import (
    BreakoutError,
    CorruptStream,
    InvalidArchive,
    LimitExceeded,
)
from graphdriver.fs.inroot import force_fallback, open_in_root, openat2_available
from graphdriver.testing import tarbuild
from graphdriver.testing.tarbuild import TarBuilder, compress, describe_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="hostile-layer tests run as root, like the store")

HELLO = f"hello {uuid.uuid4()}\n".encode()
SECRET = f"secret {uuid.uuid4()}\n".encode()
HOST_TMP_NAME = f"gd-breakout-{uuid.uuid4().hex}"
T = 1_234_567_890_123_456_789

# the tree every case starts from (paths relative to dest)
BASE_TREE = {"etc": "dir 0755 0:0", "etc/passwd": "file 0644 0:0 b'inside\\n'", "victim": "dir 0755 0:0"}


def tree(paths: dict[str, str | None] | None = None, **extra: str | None) -> dict[str, str]:
    """BASE_TREE with entries added, changed or (value None) removed; keyword names spell "/" as
    "__" (paths that are not identifiers go in ``paths``)."""
    out = dict(BASE_TREE)
    for key, value in [*(paths or {}).items(), *((k.replace("__", "/"), v) for k, v in extra.items())]:
        path = key
        if value is None:
            out.pop(path)
        else:
            out[path] = value
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Case:
    """``layers(base)`` gives the tars (all but the last must apply cleanly); then either
    ``error`` (with ``match``) or ``expect`` (the exact tree of dest, without times)."""

    layers: Callable[[Path], list[bytes]]
    error: type[Exception] | None = None
    match: str | None = None
    expect: dict[str, str] | Callable[[Path], dict[str, str]] | None = None
    setup: Callable[[Path, Path], None] | None = None
    fmt: WhiteoutFormat = WhiteoutFormat.OCI
    limits: Limits | None = None
    extra_check: Callable[[Path, Path], None] | None = field(default=None)


def one(b: TarBuilder) -> Callable[[Path], list[bytes]]:
    data = b.build()
    return lambda base: [data]


def victim_path(base: Path, *parts: str) -> str:
    return str(base.joinpath("victim", *parts))


def no_host_tmp_file(dest: Path, base: Path) -> None:
    assert not os.path.lexists(f"/tmp/{HOST_TMP_NAME}")


def realpath_limit_attack(base: Path) -> list[bytes]:
    """CPython test_realpath_limit_attack (CVE-2025-4517), aimed at base/victim/hello."""
    return [tarbuild.realpath_limit_attack(os.pathconf(base, "PC_PATH_MAX"), len(str(base / "dest")))]


def gzip_members(base: Path) -> list[bytes]:
    tar = TarBuilder().file("one", b"1").file("two", b"2").build()
    return [gzip.compress(tar[:1024], mtime=0) + gzip.compress(tar[1024:], mtime=0)]


def damaged_gzip(offset: int) -> Callable[[Path], list[bytes]]:
    blob = bytearray(gzip.compress(TarBuilder().file("f", b"x" * 3000).build(), mtime=0))
    blob[offset] ^= 0x01
    return lambda base: [bytes(blob)]


def setup_links(links: dict[str, str]) -> Callable[[Path, Path], None]:
    def setup(dest: Path, base: Path) -> None:
        for name, target in links.items():
            os.symlink(target.replace("{base}", str(base)), dest / name)

    return setup


def setup_inner_hello(dest: Path, base: Path) -> None:
    (dest / "victim/hello").write_bytes(b"inner copy")
    os.symlink("../victim", dest / "localvictim")


SUB = TarBuilder  # short alias for the table

CASES: dict[str, Case] = {
    # --- moby go-archive: names and links climbing out (rejected) -------------------------
    "moby-dotdot-file": Case(one(SUB().file("../victim/dotdot", b"x")), BreakoutError, "climbs above"),
    "moby-slash-dotdot-file": Case(one(SUB().file("/../victim/slash-dotdot", b"x")), BreakoutError, "climbs"),
    "moby-parent-traversal-dir": Case(one(SUB().dir("..")), BreakoutError, "climbs above"),
    "moby-parent-traversal-deep": Case(one(SUB().file("a/../../pwned", b"x")), BreakoutError, "climbs"),
    "moby-hardlink-dotdot": Case(one(SUB().hardlink("dotdot", "../victim/hello")), BreakoutError, "'dotdot'"),
    "moby-hardlink-slash-dotdot": Case(
        one(SUB().hardlink("slash-dotdot", "/../victim/hello")), BreakoutError, "climbs"
    ),
    "moby-hardlink-loophole-dir": Case(
        one(SUB().hardlink("loophole-victim", "../victim").file("loophole-victim/file", b"x")),
        BreakoutError,
        "'loophole-victim'",
    ),
    "moby-sibling-prefix-hardlink": Case(
        one(SUB().hardlink("grab", "../dest-evil/secret")),
        BreakoutError,
        "climbs above the layer root: 'grab'",
    ),
    # --- moby: symlinks are stored verbatim and followed only inside the root --------------
    "moby-symlink-loophole-file": Case(
        one(SUB().symlink("loophole-victim", "../victim").file("loophole-victim/file", b"pwn")),
        expect=tree({"loophole-victim": "symlink 0:0 -> ../victim"}, victim__file="file 0644 0:0 b'pwn'"),
    ),
    "moby-symlink-through-loophole": Case(
        one(SUB().symlink("loophole-victim", "../victim").symlink("symlink", "loophole-victim/hello")),
        expect=tree(
            {"loophole-victim": "symlink 0:0 -> ../victim"}, symlink="symlink 0:0 -> loophole-victim/hello"
        ),
    ),
    "moby-hardlink-through-symlink-loophole": Case(
        one(SUB().symlink("loophole-victim", "../victim").hardlink("hardlink", "loophole-victim/hello")),
        InvalidArchive,
        "hard link target 'loophole-victim/hello' not found",
    ),
    "moby-regular-replaces-loophole": Case(
        one(SUB().symlink("loophole-victim", "../victim").file("loophole-victim", b"plain")),
        expect=tree({"loophole-victim": "file 0644 0:0 b'plain'"}),
    ),
    "moby-nested-loophole": Case(
        one(
            SUB().dir("dir").symlink("dir/loophole", "../../victim").file("dir/loophole/newdir/newfile", b"n")
        ),
        expect=tree(
            dir="dir 0755 0:0",
            dir__loophole="symlink 0:0 -> ../../victim",
            victim__newdir="dir 0755 0:0",
            victim__newdir__newfile="file 0644 0:0 b'n'",
        ),
    ),
    "moby-symlink-breakout-two-hops": Case(
        one(
            SUB()
            .dir("inner")
            .symlink("inner/go_up", "..")
            .symlink("inner/go_up/escape", "../victim")
            .file("inner/go_up/escape/newfile", b"n")
        ),
        expect=tree(
            inner="dir 0755 0:0",
            inner__go_up="symlink 0:0 -> ..",
            escape="symlink 0:0 -> ../victim",
            victim__newfile="file 0644 0:0 b'n'",
        ),
    ),
    "moby-hardlink-to-symlink": Case(
        one(SUB().symlink("symlink1", "regfile").hardlink("symlink2", "symlink1").file("regfile", b"r")),
        expect=tree(
            regfile="file 0644 0:0 b'r'",
            symlink1="symlink 0:0 -> regfile links=2",
            symlink2="symlink 0:0 -> regfile links=2",
        ),
    ),
    # --- containerd TestBreakouts: clamped inside the root ---------------------------------
    "containerd-symlink-absolute": Case(
        one(SUB().symlink("localetc", "/etc").file("/localetc/unbroken", b"unbroken")),
        expect=tree(localetc="symlink 0:0 -> /etc", etc__unbroken="file 0644 0:0 b'unbroken'"),
    ),
    "containerd-symlink-up-and-out": Case(
        one(SUB().dir("dummy").symlink("localetc", "/dummy/../etc").file("localetc/unbroken", b"u")),
        expect=tree(
            dummy="dir 0755 0:0", localetc="symlink 0:0 -> /dummy/../etc", etc__unbroken="file 0644 0:0 b'u'"
        ),
    ),
    "containerd-symlink-multiple-absolute": Case(
        one(
            SUB()
            .dir("dummy")
            .symlink("dummy/etc", "/etc")
            .symlink("localetc", "/dummy/etc")
            .file("localetc/u", b"u")
        ),
        expect=tree(
            dummy="dir 0755 0:0",
            dummy__etc="symlink 0:0 -> /etc",
            localetc="symlink 0:0 -> /dummy/etc",
            etc__u="file 0644 0:0 b'u'",
        ),
    ),
    "containerd-symlink-multiple-relative": Case(
        one(
            SUB()
            .dir("dummy")
            .symlink("dummy/etc", "../etc")
            .symlink("localetc", "./dummy/etc")
            .file("localetc/u", b"u")
        ),
        expect=tree(
            dummy="dir 0755 0:0",
            dummy__etc="symlink 0:0 -> ../etc",
            localetc="symlink 0:0 -> ./dummy/etc",
            etc__u="file 0644 0:0 b'u'",
        ),
    ),
    "containerd-hardlink-through-relative-symlink": Case(
        one(
            SUB()
            .dir("breakouts")
            .symlink("breakouts/d1", "../../etc")
            .hardlink("breakouts/mypasswd", "/breakouts/d1/passwd")
        ),
        expect=tree(
            breakouts="dir 0755 0:0",
            breakouts__d1="symlink 0:0 -> ../../etc",
            breakouts__mypasswd="file 0644 0:0 b'inside\\n' links=2",
            etc__passwd="file 0644 0:0 b'inside\\n' links=2",
        ),
    ),
    "containerd-hardlink-absolute-target": Case(
        one(SUB().hardlink("localpasswd", "/etc/passwd")),
        expect=tree(
            localpasswd="file 0644 0:0 b'inside\\n' links=2", etc__passwd="file 0644 0:0 b'inside\\n' links=2"
        ),
    ),
    "containerd-hardlink-relative-escape": Case(
        one(SUB().hardlink("localpasswd", "../../../../../etc/passwd")), BreakoutError, "'localpasswd'"
    ),
    "containerd-symlink-override-path-CVE-2025-47290": Case(
        one(
            SUB()
            .dir("tmp")
            .dir("foo")
            .dir("foo/tmp")
            .file(f"foo/tmp/{HOST_TMP_NAME}", b"345")
            .symlink("foo", "/")
            .file(f"foo/tmp/{HOST_TMP_NAME}", b"678")
        ),
        expect=tree(
            {f"tmp/{HOST_TMP_NAME}": "file 0644 0:0 b'678'"}, tmp="dir 0755 0:0", foo="symlink 0:0 -> /"
        ),
        extra_check=no_host_tmp_file,
    ),
    "containerd-symlink-override-path-to-host-victim": Case(
        lambda base: [
            SUB()
            .dir("foo")
            .file("foo/hello", b"1")
            .symlink("foo", victim_path(base))
            .file("foo/hello", b"pwned")
            .build()
        ],
        InvalidArchive,
        "dangling symlink: 'foo/hello'",
    ),
    "containerd-hardlink-symlink-chmod-CVE-2021-32760": Case(
        lambda base: [
            SUB().symlink("X", victim_path(base, "hello")).hardlink("sketchylink", "X", mode=0o777).build()
        ],
        expect=lambda base: tree(
            X=f"symlink 0:0 -> {victim_path(base, 'hello')} links=2",
            sketchylink=f"symlink 0:0 -> {victim_path(base, 'hello')} links=2",
        ),
    ),
    # --- the root's type never changes (umoci CVE-2021-29136) -----------------------------
    "umoci-root-symlink-dot": Case(
        lambda base: [SUB().symlink(".", victim_path(base)).file("hello", b"pwned").build()],
        BreakoutError,
        "would replace the layer root",
    ),
    "umoci-root-symlink-slash": Case(
        one(SUB().symlink("/", "/")), BreakoutError, "symlink entry would replace"
    ),
    "umoci-root-file-dotslash": Case(
        one(SUB().file("./", b"x")), BreakoutError, "regular file entry would replace"
    ),
    "umoci-root-fifo-a-dotdot": Case(one(SUB().fifo("a/..")), BreakoutError, "fifo entry would replace"),
    "umoci-symlink-scoping": Case(
        one(SUB().symlink("link", "/../../../").file("link/file", b"f")),
        expect=tree(link="symlink 0:0 -> /../../../", file="file 0644 0:0 b'f'"),
    ),
    # --- CPython tarfile bypass shapes -----------------------------------------------------
    "cpython-realpath-limit-CVE-2025-4517": Case(
        realpath_limit_attack, InvalidArchive, "hard link target 'escape/victim/hello' not found"
    ),
    "cpython-hardlink-deeper-symlink-CVE-2026-11940": Case(
        one(
            SUB()
            .dir("a")
            .dir("a/b")
            .symlink("a/b/s", "../victim/hello")
            .hardlink("h", "a/b/s")
            .file("h", b"overwrite")
        ),
        expect=tree(
            a="dir 0755 0:0",
            a__b="dir 0755 0:0",
            a__b__s="symlink 0:0 -> ../victim/hello",
            h="file 0644 0:0 b'overwrite'",
        ),
    ),
    "cpython-write-through-hardlinked-symlink": Case(
        one(SUB().dir("a").symlink("a/s", "../victim").hardlink("h", "a/s").file("h/hello", b"pwned")),
        expect=tree(
            a="dir 0755 0:0",
            a__s="symlink 0:0 -> ../victim links=2",
            h="symlink 0:0 -> ../victim links=2",
            victim__hello="file 0644 0:0 b'pwned'",
        ),
    ),
    "cpython-deferred-dir-attrs-on-replaced-dir-CVE-2024-12718": Case(
        lambda base: [SUB().dir("d", mode=0o777, mtime_ns=T).symlink("d", victim_path(base)).build()],
        expect=lambda base: tree(d=f"symlink 0:0 -> {victim_path(base)}"),
    ),
    # --- whiteouts aimed outside -----------------------------------------------------------
    "whiteout-dot": Case(one(SUB().file(".wh..")), InvalidArchive, "invalid whiteout entry: '.wh..'"),
    "whiteout-dotdot": Case(one(SUB().file(".wh...")), InvalidArchive, "invalid whiteout entry"),
    "whiteout-empty": Case(one(SUB().file("etc/.wh.")), InvalidArchive, "invalid whiteout entry"),
    "whiteout-subdir-dotdot": Case(one(SUB().file("etc/.wh...")), InvalidArchive, "invalid whiteout entry"),
    "whiteout-parent-escape": Case(one(SUB().file("../.wh.victim")), BreakoutError, "climbs above"),
    "whiteout-slash-parent-escape": Case(one(SUB().file("/../.wh.victim")), BreakoutError, "climbs above"),
    "whiteout-of-symlinks-removes-only-links": Case(
        one(SUB().whiteout("abs").whiteout("rel")),
        setup=setup_links({"abs": "{base}/victim", "rel": "../victim"}),
        expect=tree(),
    ),
    "whiteout-inside-symlinked-dir": Case(
        one(SUB().whiteout("localvictim/hello")),
        setup=setup_inner_hello,
        expect=tree(localvictim="symlink 0:0 -> ../victim"),
    ),
    "whiteout-dead-symlink-parent": Case(
        one(SUB().whiteout("dead/etc")),
        setup=setup_links({"dead": "/dne"}),
        expect=tree(dead="symlink 0:0 -> /dne"),
    ),
    "whiteout-relative-path-cleaned": Case(
        one(SUB().whiteout("dne/../etc")), expect=tree(etc=None, etc__passwd=None)
    ),
    "opaque-through-escaping-symlink": Case(
        one(SUB().opaque("localvictim")),
        setup=setup_inner_hello,
        expect=tree(localvictim="symlink 0:0 -> ../victim"),
    ),
    "overlay-whiteout-through-escaping-symlink": Case(
        one(SUB().whiteout("localvictim/hello")),
        setup=setup_inner_hello,
        fmt=WhiteoutFormat.OVERLAY,
        expect=tree(localvictim="symlink 0:0 -> ../victim", victim__hello="char 0000 0:0 0:0"),
    ),
    # --- symlinked parents -----------------------------------------------------------------
    "symlinked-parent-absolute-escape": Case(
        lambda base: [SUB().symlink("abs", victim_path(base)).file("abs/hello", b"pwned").build()],
        InvalidArchive,
        "dangling symlink: 'abs/hello'",
    ),
    "symlinked-parent-relative-escape": Case(
        one(SUB().symlink("rel", "../../../../victim").file("rel/hello", b"inside")),
        expect=tree(rel="symlink 0:0 -> ../../../../victim", victim__hello="file 0644 0:0 b'inside'"),
    ),
    "dir-replaces-symlink": Case(
        one(SUB().symlink("loop", "../victim").dir("loop", mode=0o777).file("loop/hello", b"x")),
        expect=tree(loop="dir 0777 0:0", loop__hello="file 0644 0:0 b'x'"),
    ),
    "dir-entry-over-host-symlink": Case(
        one(SUB().dir("sv", mode=0o777, mtime_ns=T, xattrs={"user.x": b"1"})),
        setup=setup_links({"sv": "{base}/victim"}),
        expect=tree(sv="dir 0777 0:0 xattrs[user.x=b'1']"),
    ),
    "metadata-never-through-symlink": Case(
        lambda base: [
            SUB()
            .symlink("s", victim_path(base, "hello"), uid=1, gid=1, mtime_ns=T, xattrs={"user.x": b"1"})
            .build()
        ],
        expect=lambda base: tree(s=f"symlink 1:1 -> {victim_path(base, 'hello')}"),
    ),
    "duplicate-entries": Case(
        one(SUB().file("x", b"1").file("x", b"2").symlink("x", "../victim/hello").file("x", b"3")),
        expect=tree(x="file 0644 0:0 b'3'"),
    ),
    "hardlink-to-directory": Case(
        one(SUB().hardlink("h", "etc")), InvalidArchive, "hard link to a directory"
    ),
    # --- malformed input ---------------------------------------------------------------------
    "device-outside-uint32": Case(
        one(SUB().char("dev/x", 0, 0, raw={"devmajor": 2**32})), InvalidArchive, "outside uint32"
    ),
    "device-outside-linux-dev-t": Case(one(SUB().block("dev/x", 4096, 1)), InvalidArchive, "out of range"),
    "overlong-component": Case(one(SUB().file("a" * 300, b"x")), InvalidArchive, "longer than 255 bytes"),
    "overlong-path": Case(one(SUB().file("/".join(["p" * 250] * 20), b"x")), InvalidArchive, "cannot apply"),
    "nul-in-pax-path": Case(one(SUB().file("good", pax={"path": b"evil\0/../../x"})), InvalidArchive, "NUL"),
    "huge-pax-header": Case(one(SUB().file("f", pax={"comment": "c" * (2 << 20)})), LimitExceeded, "1048576"),
    "negative-size": Case(one(SUB().file("f", raw={"size": -1})), InvalidArchive, "negative number"),
    "truncated-stream": Case(
        lambda base: [SUB().file("f", b"x" * 5000).build()[:3000]], CorruptStream, "inside the data of: 'f'"
    ),
    "corrupt-second-header-checksum": Case(
        one(SUB().file("a", b"1").file("b", b"2", raw={"chksum": 7})), CorruptStream, "checksum mismatch"
    ),
    "gzip-bad-crc": Case(damaged_gzip(-8), CorruptStream, "CRC32 mismatch"),
    "gzip-truncated-trailer": Case(
        lambda base: [gzip.compress(SUB().file("f", b"x").build(), mtime=0)[:-4]], CorruptStream, "truncated"
    ),
    "gzip-trailing-garbage": Case(
        lambda base: [gzip.compress(SUB().file("f", b"x").build(), mtime=0) + b"garbage"],
        CorruptStream,
        "trailing garbage",
    ),
    "gzip-multi-member": Case(gzip_members, expect=tree(one="file 0644 0:0 b'1'", two="file 0644 0:0 b'2'")),
    "zstd-truncated": Case(
        lambda base: [compress(SUB().file("f", os.urandom(5000)).build(), "zstd")[:-6]], CorruptStream, "zstd"
    ),
    "gzip-bomb-over-limit": Case(
        lambda base: [gzip.compress(SUB().file("zeros", bytes(16 << 20)).build(), mtime=0)],
        LimitExceeded,
        "limit of 4194304 uncompressed bytes",
        limits=Limits(max_decompressed_bytes=4 << 20),
    ),
    "trusted-overlay-opaque-xattr-in-layer": Case(
        one(SUB().dir("victim", xattrs={"trusted.overlay.opaque": b"y"})), expect=tree()
    ),
    "trusted-overlay-opaque-xattr-overlay-format": Case(
        one(SUB().dir("victim", xattrs={"trusted.overlay.opaque": b"y"})),
        fmt=WhiteoutFormat.OVERLAY,
        expect=tree(),
    ),
}


def snapshot(base: Path) -> dict[str, tuple[object, ...]]:
    """Everything under base except dest/, stat for stat and byte for byte."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        if Path(dirpath) == base:
            dirnames[:] = [d for d in dirnames if d != "dest"]
        for name in [*dirnames, *filenames, "."]:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            xattrs = tuple(
                (n, os.getxattr(full, n, follow_symlinks=False))
                for n in sorted(os.listxattr(full, follow_symlinks=False))
            )
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    detail: object = f.read()
            elif stat.S_ISLNK(st.st_mode):
                detail = os.readlink(full)
            else:
                detail = sorted(os.listdir(full)) if stat.S_ISDIR(st.st_mode) else None
            key = os.path.relpath(full, base)
            out[key] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_mtime_ns,
                st.st_size,
                st.st_nlink,
                xattrs,
                detail,
            )
    return out


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    base = tmp_path / "base"
    dest = base / "dest"
    (dest / "victim").mkdir(parents=True)
    (dest / "etc").mkdir()
    (dest / "etc/passwd").write_bytes(b"inside\n")
    for d in (dest, dest / "victim", dest / "etc"):
        os.chmod(d, 0o755)
    os.chmod(dest / "etc/passwd", 0o644)
    victim = base / "victim"
    (victim / "dir").mkdir(parents=True)
    (victim / "dir/inner").write_bytes(b"inner")
    (victim / "hello").write_bytes(HELLO)
    os.setxattr(victim / "hello", "user.sentinel", b"1")
    os.chmod(victim / "hello", 0o400)
    os.chmod(victim / "dir", 0o750)
    os.symlink("hello", victim / "link")
    evil = base / "dest-evil"
    evil.mkdir()
    (evil / "secret").write_bytes(SECRET)
    for p in (victim / "hello", victim / "dir", victim, evil / "secret"):
        os.utime(p, ns=(T, T))
    return base, dest


@contextlib.contextmanager
def resolver(kind: str) -> Iterator[None]:
    if kind == "openat2":
        if not openat2_available():
            pytest.skip("openat2(2) is not available here")
        yield
    else:
        with force_fallback():
            yield


@pytest.mark.parametrize("kind", ["openat2", "fallback"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile(name: str, kind: str, layout: tuple[Path, Path]) -> None:
    with resolver(kind):
        check_case(name, layout)


def check_case(name: str, layout: tuple[Path, Path]) -> None:
    base, dest = layout
    case = CASES[name]
    if case.setup is not None:
        case.setup(dest, base)
    before = snapshot(base)
    layers = case.layers(base)

    def run(tar: bytes) -> None:
        apply_layer(dest, io.BytesIO(tar), whiteout_format=case.fmt, limits=case.limits)

    for tar in layers[:-1]:
        run(tar)
    if case.error is not None:
        with pytest.raises(case.error, match=case.match):
            run(layers[-1])
    else:
        run(layers[-1])
        if case.expect is not None:
            expect = case.expect(base) if callable(case.expect) else case.expect
            assert describe_tree(dest, mtime=False) == expect
    if case.extra_check is not None:
        case.extra_check(dest, base)

    # the oracle: the sentinel tree is untouched, and nothing in dest holds its bytes
    assert snapshot(base) == before
    assert sorted(os.listdir(base)) == ["dest", "dest-evil", "victim"]
    for dirpath, _, filenames in os.walk(dest):
        for fname in filenames:
            full = os.path.join(dirpath, fname)
            if os.path.isfile(full) and not os.path.islink(full):
                with open(full, "rb") as f:
                    data = f.read()
                assert data not in (HELLO, SECRET), f"{full} holds the sentinel's bytes"
    assert not os.path.lexists(f"/tmp/{HOST_TMP_NAME}")


def test_case_count() -> None:
    assert len(CASES) >= 30


# ---------------------------------------------------------------------------------------------
# in-root resolution itself, both implementations


@pytest.fixture
def jail(tmp_path: Path) -> Iterator[int]:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_bytes(b"inside")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_bytes(b"OUTSIDE")
    os.symlink("/etc", root / "abs")
    os.symlink("../../../../etc", root / "rel")
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    os.symlink("/nowhere/file", root / "dangling")
    for i in range(45):
        os.symlink(f"c{i + 1}", root / f"c{i}")
    (root / "c45").write_bytes(b"end of chain")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def read_in_root(root_fd: int, path: str, flags: int = os.O_RDONLY) -> bytes | int:
    try:
        fd = open_in_root(root_fd, path, flags)
    except OSError as exc:
        return exc.errno or 0
    try:
        return os.read(fd, 100)
    finally:
        os.close(fd)


RESOLUTIONS = [
    ("etc/passwd", b"inside"),
    ("/etc/passwd", b"inside"),
    ("../../../etc/passwd", b"inside"),
    ("abs/passwd", b"inside"),
    ("rel/passwd", b"inside"),
    ("etc/../../etc/passwd", b"inside"),
    ("loop1", errno.ELOOP),
    ("loop1/x", errno.ELOOP),
    ("dangling", errno.ENOENT),
    ("etc/passwd/x", errno.ENOTDIR),
    ("c5", b"end of chain"),  # 40 symlinks: the kernel's limit
    ("c4", errno.ELOOP),  # 41
]


@pytest.mark.parametrize("kind", ["openat2", "fallback"])
@pytest.mark.parametrize(("path", "result"), RESOLUTIONS)
def test_open_in_root(kind: str, path: str, result: bytes | int, jail: int) -> None:
    with resolver(kind):
        assert read_in_root(jail, path) == result


@pytest.mark.parametrize("kind", ["openat2", "fallback"])
def test_open_in_root_last_component_and_creation(kind: str, jail: int, tmp_path: Path) -> None:
    with resolver(kind):
        fd = open_in_root(jail, "abs", os.O_PATH | os.O_NOFOLLOW)  # the link itself
        assert stat.S_ISLNK(os.fstat(fd).st_mode)
        os.close(fd)
        assert read_in_root(jail, "abs", os.O_RDONLY | os.O_NOFOLLOW) == errno.ELOOP
        fd = open_in_root(jail, "rel/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        assert (tmp_path / "root/etc/new").exists()
        assert not (tmp_path / "etc/new").exists()
        assert read_in_root(jail, "abs", os.O_WRONLY | os.O_CREAT | os.O_EXCL) == errno.EEXIST
        fd = open_in_root(jail, "", os.O_PATH | os.O_DIRECTORY)
        try:
            assert os.path.samestat(os.fstat(fd), os.fstat(jail))
            assert os.get_inheritable(fd) is False
        finally:
            os.close(fd)
