"""Hostile layers imported through the layer store, on every driver, with the store oracle.

tests/archive/test_hostile.py applies each hostile archive to a plain directory. Here the same
shapes (grouped by source: moby breakouts, containerd TestBreakouts, umoci, CPython tarfile CVEs,
whiteout edge cases, malformed headers, compression bombs and corrupt trailers, digest and size
mismatches, overlay xattrs) go through :meth:`LayerStore.import_layer`, where the archive lands in
a driver's layer directory three or four levels below the store root, next to a sentinel tree::

    base/
        victim/ victim-evil/        the sentinel (graphdriver.testing.sentinel)
        store/                      the store root: vfs/dir/<id>/ or overlay2/<id>/diff/

Links in the archives aim at the sentinel either by its absolute path or by a relative path that
climbs to ``/`` and back down (``../`` * 40 + the sentinel's path), so an unclamped resolution would
reach it from any depth. Every case starts from a clean base layer L0 (``etc/passwd``, an empty
``victim/``) and, for whiteout cases, a setup layer with the links to aim through.

A *refused* case is imported twice, as a base layer and on top of L0 (on overlay2 the second is
applied natively into ``diff/`` with overlay whiteouts), and each time must raise its typed error
and leave: the sentinel unchanged byte for byte and stat for stat, no copy of its bytes in the
store, and the store exactly as it was (records, files, mounts; ``staging/`` empty, no lock left,
``check()`` clean). A *contained* case is imported on top and must produce the exact merged view
expected, add nothing to the store but the new layer's own files, and, once removed again, leave
the store exactly as before, the sentinel untouched by the removal too.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from graphdriver.archive.types import Limits
from graphdriver.errors import (
    BreakoutError,
    CorruptStream,
    DigestMismatch,
    GraphDriverError,
    InvalidArchive,
    LimitExceeded,
)
from graphdriver.layers.store import LayerStore
from graphdriver.testing import tarbuild
from graphdriver.testing.tarbuild import TarBuilder, compress, describe_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="hostile-layer store tests run as root")

BASE_VIEW = {"etc": "dir 0755 0:0", "etc/passwd": "file 0644 0:0 b'inside\\n'", "victim": "dir 0755 0:0"}
T = 1_234_567_890_123_456_789


def tree(paths: dict[str, str | None] | None = None, **extra: str | None) -> dict[str, str]:
    """BASE_VIEW with entries added, changed or (None) removed; keyword names spell "/" as "__"."""
    out = dict(BASE_VIEW)
    for key, value in [*(paths or {}).items(), *((k.replace("__", "/"), v) for k, v in extra.items())]:
        if value is None:
            out.pop(key)
        else:
            out[key] = value
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Ctx:
    """What a case's archive may aim at."""

    base: Path
    layer_root_len: int
    """the length of the longest layer root path of this store (for the PATH_MAX attack)"""

    @property
    def esc(self) -> str:
        """A relative path that, followed without clamping, reaches ``base`` from any depth."""
        return "../" * 40 + str(self.base).lstrip("/")

    @property
    def victim(self) -> str:
        return str(self.base / "victim")


@dataclass(frozen=True)
class Case:
    """``blob(ctx)``: the hostile blob (tar, possibly compressed or mangled). Then ``error``
    (with ``match``), or ``expect``: the exact merged view of the new layer on L0 (+ setup)."""

    group: str
    blob: Callable[[Ctx], bytes]
    error: type[GraphDriverError] | None = None
    match: str | None = None
    expect: dict[str, str] | Callable[[Ctx], dict[str, str]] | None = None
    setup: Callable[[Ctx], bytes] | None = None
    """a layer between L0 and the hostile one (only run on top then)"""
    limits: Limits | None = None
    descriptor: Callable[[bytes], dict[str, Any]] | None = None
    """expected_diff_id / expected_digest / expected_size to pass, from the blob"""
    extra_check: Callable[[LayerStore, str], None] | None = field(default=None)
    """(contained cases) more checks on the committed layer (store, layer id)"""


def tar(b: TarBuilder) -> Callable[[Ctx], bytes]:
    data = b.build()
    return lambda ctx: data


def realpath_limit_attack(ctx: Ctx) -> bytes:
    """CPython test_realpath_limit_attack (CVE-2025-4517) sized for this store's layer paths."""
    return tarbuild.realpath_limit_attack(os.pathconf(ctx.base, "PC_PATH_MAX"), ctx.layer_root_len)


def mangled(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def digest_of(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


SMALL = TarBuilder().file("f", b"x" * 3000).build()
WRONG = "sha256:" + "0" * 64


def no_overlay_xattrs_on(*paths: str) -> Callable[[LayerStore, str], None]:
    """The layer's own stored copy of ``paths`` carries none of the overlay xattrs the archives
    try to plant (the kernel's own bookkeeping, such as ``origin`` and ``impure``, set when the
    layer is mounted, is not asked about)."""
    planted = {f"{p}.{n}" for p in ("trusted.overlay", "user.overlay") for n in OVERLAY_SEMANTIC}

    def check(store: LayerStore, layer_id: str) -> None:
        with store.driver.mounted(layer_id) as view:
            own = store.driver.home / layer_id / "diff" if store.driver.name == "overlay2" else view
            for path in paths:
                found = sorted(set(os.listxattr(own / path, follow_symlinks=False)) & planted)
                assert found == [], f"{path}: {found}"

    return check


OVERLAY_SEMANTIC = ("opaque", "redirect", "metacopy", "whiteout", "whiteouts")


LOWER_PATH_CASES = (
    "containerd-symlink-absolute",
    "moby-implied-dirs-through-lower-symlink",
    "moby-symlink-breakout-two-hops",
    "opaque-through-link-to-sentinel",
    "whiteout-inside-symlinked-dir",
    "whiteout-through-link-to-sentinel",
)
"""Contained cases whose paths resolve through a symlink or directory that only a lower layer
holds: overlay2 applies them natively into the new layer's own diff/, resolving such paths in the
merged view of the lower layers (issue 8; see test_overlay2_matches_vfs)."""


CASES: dict[str, Case] = {
    # --- moby go-archive breakouts: names and hard links that climb out are refused ---------
    "moby-dotdot-file": Case(
        "moby", tar(TarBuilder().file("../victim/dotdot", b"x")), BreakoutError, "climbs"
    ),
    "moby-escape-to-sentinel-file": Case(
        "moby", lambda c: TarBuilder().file(c.esc + "/victim/pwned", b"x").build(), BreakoutError, "climbs"
    ),
    "moby-hardlink-to-sentinel": Case(
        "moby",
        lambda c: TarBuilder().hardlink("grab", c.esc + "/victim/hello").build(),
        BreakoutError,
        "'grab'",
    ),
    "moby-sibling-prefix-hardlink": Case(
        "moby",
        lambda c: TarBuilder().hardlink("grab", c.esc + "/victim-evil/secret").build(),
        BreakoutError,
        "'grab'",
    ),
    "moby-symlink-loophole-to-sentinel": Case(
        "moby",
        lambda c: TarBuilder().symlink("loophole", c.esc + "/victim").file("loophole/pwned", b"p").build(),
        InvalidArchive,
        "dangling symlink: 'loophole/pwned'",
    ),
    "moby-symlink-breakout-two-hops": Case(
        "moby",
        tar(
            TarBuilder()
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
    # --- containerd TestBreakouts: clamped inside the root ----------------------------------
    "containerd-symlink-absolute": Case(
        "containerd",
        tar(TarBuilder().symlink("localetc", "/etc").file("/localetc/unbroken", b"unbroken")),
        expect=tree(localetc="symlink 0:0 -> /etc", etc__unbroken="file 0644 0:0 b'unbroken'"),
    ),
    "moby-implied-dirs-through-lower-symlink": Case(
        "moby",
        tar(TarBuilder().file("lib/systemd/system/unit", b"x")),
        setup=lambda c: TarBuilder().dir("usr").dir("usr/lib").symlink("lib", "usr/lib").build(),
        expect=tree(
            usr="dir 0755 0:0",
            usr__lib="dir 0755 0:0",
            lib="symlink 0:0 -> usr/lib",
            usr__lib__systemd="dir 0755 0:0",
            usr__lib__systemd__system="dir 0755 0:0",
            usr__lib__systemd__system__unit="file 0644 0:0 b'x'",
        ),
    ),
    "containerd-hardlink-relative-escape": Case(
        "containerd",
        tar(TarBuilder().hardlink("localpasswd", "../../../../../etc/passwd")),
        BreakoutError,
        "'localpasswd'",
    ),
    "containerd-hardlink-absolute-target": Case(
        "containerd",
        tar(TarBuilder().file("etc/shadow", b"s").hardlink("localshadow", "/etc/shadow")),
        expect=tree(
            etc__shadow="file 0644 0:0 b's' links=2", localshadow="file 0644 0:0 b's' links=2"
        ),
    ),
    "containerd-symlink-override-path-CVE-2025-47290": Case(
        "containerd",
        lambda c: TarBuilder()
        .dir("foo")
        .file("foo/hello", b"1")
        .symlink("foo", c.victim)
        .file("foo/hello", b"pwned")
        .build(),
        InvalidArchive,
        "dangling symlink: 'foo/hello'",
    ),
    "containerd-hardlink-symlink-chmod-CVE-2021-32760": Case(
        "containerd",
        lambda c: TarBuilder()
        .symlink("X", c.victim + "/hello")
        .hardlink("sketchylink", "X", mode=0o777, uid=1, gid=1, mtime_ns=T)
        .build(),
        expect=lambda c: tree(
            X=f"symlink 0:0 -> {c.victim}/hello links=2",
            sketchylink=f"symlink 0:0 -> {c.victim}/hello links=2",
        ),
    ),
    # --- umoci: the root's type never changes (CVE-2021-29136) -------------------------------
    "umoci-root-symlink-dot-CVE-2021-29136": Case(
        "umoci",
        lambda c: TarBuilder().symlink(".", c.victim).file("hello", b"pwned").build(),
        BreakoutError,
        "would replace the layer root",
    ),
    "umoci-root-file-dotslash": Case(
        "umoci", tar(TarBuilder().file("./", b"x")), BreakoutError, "regular file entry would replace"
    ),
    "umoci-symlink-scoping": Case(
        "umoci",
        tar(TarBuilder().symlink("link", "/../../../").file("link/file", b"f")),
        expect=tree(link="symlink 0:0 -> /../../../", file="file 0644 0:0 b'f'"),
    ),
    # --- CPython tarfile CVE shapes ------------------------------------------------------------
    "cpython-absolute-name-CVE-2007-4559": Case(
        "cpython",
        lambda c: TarBuilder().file(c.victim + "/planted", b"p").build(),
        expect=lambda c: tree(
            {
                **{
                    str(Path(*Path(c.victim).parts[1 : i + 1])): "dir 0755 0:0"
                    for i in range(1, len(Path(c.victim).parts))
                },
                c.victim.lstrip("/") + "/planted": "file 0644 0:0 b'p'",
            }
        ),
    ),
    "cpython-realpath-limit-CVE-2025-4517": Case(
        "cpython", realpath_limit_attack, InvalidArchive, "hard link target 'escape/victim/hello' not found"
    ),
    "cpython-hardlink-to-escaping-symlink-CVE-2026-11940": Case(
        "cpython",
        lambda c: TarBuilder()
        .dir("a")
        .dir("a/b")
        .symlink("a/b/s", c.esc + "/victim/hello")
        .hardlink("h", "a/b/s")
        .file("h", b"overwrite")
        .build(),
        expect=lambda c: tree(
            a="dir 0755 0:0",
            a__b="dir 0755 0:0",
            a__b__s=f"symlink 0:0 -> {c.esc}/victim/hello",
            h="file 0644 0:0 b'overwrite'",
        ),
    ),
    "cpython-write-through-hardlinked-symlink": Case(
        "cpython",
        lambda c: TarBuilder()
        .dir("a")
        .symlink("a/s", c.esc + "/victim")
        .hardlink("h", "a/s")
        .file("h/hello", b"pwned")
        .build(),
        InvalidArchive,
        "dangling symlink: 'h/hello'",
    ),
    "cpython-deferred-dir-attrs-on-replaced-dir-CVE-2024-12718": Case(
        "cpython",
        lambda c: TarBuilder().dir("d", mode=0o777, mtime_ns=T).symlink("d", c.victim).build(),
        expect=lambda c: tree(d=f"symlink 0:0 -> {c.victim}"),
    ),
    # --- whiteout edge cases ------------------------------------------------------------------
    "whiteout-dot": Case("whiteout", tar(TarBuilder().file(".wh..")), InvalidArchive, "invalid whiteout"),
    "whiteout-subdir-dotdot": Case(
        "whiteout", tar(TarBuilder().file("etc/.wh...")), InvalidArchive, "invalid whiteout"
    ),
    "whiteout-empty-name": Case("whiteout", tar(TarBuilder().file("etc/.wh.")), InvalidArchive, "invalid"),
    "whiteout-climbing-out": Case(
        "whiteout", lambda c: TarBuilder().file(c.esc + "/.wh.victim").build(), BreakoutError, "climbs"
    ),
    "whiteout-of-links-to-sentinel": Case(
        "whiteout",
        lambda c: TarBuilder().whiteout("abs").whiteout("rel").build(),
        setup=lambda c: TarBuilder().symlink("abs", c.victim).symlink("rel", c.esc + "/victim").build(),
        expect=tree(),
    ),
    "whiteout-through-link-to-sentinel": Case(
        "whiteout",
        lambda c: TarBuilder().whiteout("abs/hello").whiteout("rel/dir").build(),
        setup=lambda c: TarBuilder().symlink("abs", c.victim).symlink("rel", c.esc + "/victim").build(),
        expect=lambda c: tree(abs=f"symlink 0:0 -> {c.victim}", rel=f"symlink 0:0 -> {c.esc}/victim"),
    ),
    "whiteout-inside-symlinked-dir": Case(
        "whiteout",
        tar(TarBuilder().whiteout("lv/hello")),
        setup=lambda c: TarBuilder().file("victim/hello", b"inner copy").symlink("lv", "../victim").build(),
        expect=tree(lv="symlink 0:0 -> ../victim"),
    ),
    "opaque-through-link-to-sentinel": Case(
        "whiteout",
        tar(TarBuilder().opaque("abs")),
        setup=lambda c: TarBuilder().symlink("abs", c.victim).build(),
        expect=lambda c: tree(abs=f"symlink 0:0 -> {c.victim}"),
    ),
    # --- malformed headers ----------------------------------------------------------------------
    "nul-in-pax-path": Case(
        "malformed", tar(TarBuilder().file("good", pax={"path": b"evil\0/../../x"})), InvalidArchive, "NUL"
    ),
    "nul-in-pax-linkpath": Case(
        "malformed",
        tar(TarBuilder().symlink("l", "t", pax={"linkpath": b"../\0/victim"})),
        InvalidArchive,
        "NUL",
    ),
    "huge-pax-header-over-1MiB": Case(
        "malformed", tar(TarBuilder().file("f", pax={"comment": "c" * (2 << 20)})), LimitExceeded, "1048576"
    ),
    "huge-gnu-longname-over-1MiB": Case(
        "malformed",
        tar(TarBuilder(longnames="gnu").file("n" * (1 << 20) + "x", b"")),
        LimitExceeded,
        "1048576",
    ),
    "negative-size": Case(
        "malformed", tar(TarBuilder().file("f", raw={"size": -1})), InvalidArchive, "negative"
    ),
    "uid-above-uint32": Case(
        "malformed", tar(TarBuilder().file("f", raw={"uid": 2**32})), InvalidArchive, "uid"
    ),
    "device-major-outside-uint32": Case(
        "malformed",
        tar(TarBuilder().char("dev/x", 0, 0, raw={"devmajor": 2**32})),
        InvalidArchive,
        "outside uint32",
    ),
    "device-minor-negative": Case(
        "malformed",
        tar(TarBuilder().char("dev/x", 0, 0, raw={"devminor": -1})),
        InvalidArchive,
        "negative number in the devminor field",
    ),
    "device-outside-linux-dev-t": Case(
        "malformed", tar(TarBuilder().block("dev/x", 4096, 1)), InvalidArchive, "out of range"
    ),
    "unknown-typeflag": Case(
        "malformed", tar(TarBuilder().entry("x", b"Z")), InvalidArchive, "unhandled tar header type"
    ),
    "truncated-data": Case(
        "malformed",
        lambda c: TarBuilder().file("f", b"x" * 5000).build()[:3000],
        CorruptStream,
        "inside the data of: 'f'",
    ),
    "corrupt-second-header-checksum": Case(
        "malformed",
        tar(TarBuilder().file("a", b"1").file("b", b"2", raw={"chksum": 7})),
        CorruptStream,
        "checksum mismatch",
    ),
    # --- compression: bombs and corrupt trailers -------------------------------------------------
    "gzip-bomb": Case(
        "compression",
        lambda c: gzip.compress(TarBuilder().file("zeros", bytes(16 << 20)).build(), mtime=0),
        LimitExceeded,
        "limit of 4194304 uncompressed bytes",
        limits=Limits(max_decompressed_bytes=4 << 20),
    ),
    "zstd-bomb": Case(
        "compression",
        lambda c: compress(TarBuilder().file("zeros", bytes(64 << 20)).build(), "zstd"),
        LimitExceeded,
        "limit of 8388608 uncompressed bytes",
        limits=Limits(max_decompressed_bytes=8 << 20),
    ),
    "gzip-bad-crc": Case(
        "compression", lambda c: mangled(gzip.compress(SMALL, mtime=0), -8), CorruptStream, "CRC32"
    ),
    "gzip-bad-isize": Case(
        "compression", lambda c: mangled(gzip.compress(SMALL, mtime=0), -2), CorruptStream, "gzip"
    ),
    "gzip-truncated-trailer": Case(
        "compression", lambda c: gzip.compress(SMALL, mtime=0)[:-4], CorruptStream, "truncated"
    ),
    "gzip-trailing-garbage": Case(
        "compression", lambda c: gzip.compress(SMALL, mtime=0) + b"garbage", CorruptStream, "trailing garbage"
    ),
    "zstd-truncated": Case(
        "compression",
        lambda c: compress(TarBuilder().file("f", os.urandom(5000)).build(), "zstd")[:-6],
        CorruptStream,
        "zstd",
    ),
    "zstd-bad-checksum": Case(
        "compression", lambda c: mangled(compress(SMALL, "zstd"), -1), CorruptStream, "zstd"
    ),
    # --- digests and sizes --------------------------------------------------------------------
    "diff-id-mismatch": Case(
        "digest", lambda c: gzip.compress(SMALL, mtime=0), DigestMismatch, "diff ID",
        descriptor=lambda blob: {"expected_diff_id": WRONG},
    ),
    "blob-digest-mismatch": Case(
        "digest", lambda c: gzip.compress(SMALL, mtime=0), DigestMismatch, "blob digest",
        descriptor=lambda blob: {"expected_digest": WRONG},
    ),
    "blob-size-short": Case(
        "digest", lambda c: gzip.compress(SMALL, mtime=0), DigestMismatch, "size",
        descriptor=lambda blob: {"expected_digest": digest_of(blob), "expected_size": len(blob) + 1},
    ),
    "blob-size-long": Case(
        "digest", lambda c: gzip.compress(SMALL, mtime=0), DigestMismatch, "size",
        descriptor=lambda blob: {"expected_size": len(blob) - 1},
    ),
    "trailing-bytes-count-in-diff-id": Case(
        "digest", lambda c: SMALL + bytes(1024), DigestMismatch, "diff ID",
        descriptor=lambda blob: {"expected_diff_id": digest_of(SMALL)},
    ),
    # --- overlay xattrs in a layer are never applied ----------------------------------------
    "trusted-overlay-opaque-on-dir": Case(
        "overlay-xattr",
        tar(TarBuilder().dir("victim", xattrs={"trusted.overlay.opaque": b"y"})),
        setup=lambda c: TarBuilder().file("victim/hello", b"lower").build(),
        expect=tree(victim__hello="file 0644 0:0 b'lower'"),
        extra_check=no_overlay_xattrs_on("victim"),
    ),
    "overlay-redirect-metacopy-whiteout-xattrs": Case(
        "overlay-xattr",
        tar(
            TarBuilder()
            .file(
                "f",
                b"data",
                xattrs={
                    "trusted.overlay.redirect": b"/etc",
                    "trusted.overlay.metacopy": b"",
                    "trusted.overlay.whiteout": b"y",
                    "user.overlay.opaque": b"y",
                    "user.kept": b"1",
                },
            )
            .dir("d", xattrs={"user.overlay.opaque": b"y", "trusted.overlay.opaque": b"x"})
        ),
        expect=tree(f="file 0644 0:0 b'data' xattrs[user.kept=b'1']", d="dir 0755 0:0"),
        extra_check=no_overlay_xattrs_on("f", "d"),
    ),
}


def l0_tar() -> bytes:
    return (
        TarBuilder()
        .dir("etc")
        .file("etc/passwd", b"inside\n")
        .dir("victim")
        .build()
    )


def layer_root_len(store: LayerStore) -> int:
    fake = "0" * 64
    if store.driver.name == "overlay2":
        return len(str(store.driver.home / fake / "diff"))
    return len(str(store.driver.home / "dir" / fake))


def view_of(store: LayerStore, layer_id: str) -> dict[str, str]:
    with store.mounted(layer_id) as view:
        return describe_tree(view, mtime=False)


def prepare(store: LayerStore, case: Case, base: Path) -> tuple[Ctx, str, bytes, dict[str, Any]]:
    """L0 (and the case's setup layer) imported; returns the context, the top layer, the hostile
    blob and the descriptor to import it with."""
    ctx = Ctx(base, layer_root_len(store))
    top = store.import_layer(io.BytesIO(l0_tar()), names=["L0"]).id
    if case.setup is not None:
        top = store.import_layer(io.BytesIO(case.setup(ctx)), top, names=["setup"]).id
    blob = case.blob(ctx)
    return ctx, top, blob, case.descriptor(blob) if case.descriptor is not None else {}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_import(name: str, driver_name: str, arena: Any, rk: Any) -> None:
    case = CASES[name]
    with LayerStore.open(arena.root, driver_name) as store:
        ctx, top, blob, kw = prepare(store, case, arena.base)
        arena.sentinel.arm()
        before = rk.capture(store)

        def attempt(parent: str | None) -> Any:
            return store.import_layer(io.BytesIO(blob), parent, limits=case.limits, **kw)

        if case.error is not None:
            parents = [top] if case.setup is not None else [None, top]
            for parent in parents:
                with pytest.raises(case.error, match=case.match):
                    attempt(parent)
                rk.assert_unchanged(store, before)
                arena.sentinel.assert_intact(scan=[arena.root])
            return

        layer = attempt(top)
        arena.sentinel.assert_intact(scan=[arena.root])
        rk.assert_only_layer_added(store, before, layer.id)
        expect = case.expect(ctx) if callable(case.expect) else case.expect
        assert view_of(store, layer.id) == expect
        if case.extra_check is not None:
            case.extra_check(store, layer.id)
        store.remove(layer.id)
        rk.assert_unchanged(store, before)
        arena.sentinel.assert_intact(scan=[arena.root])


@pytest.mark.parametrize("name", LOWER_PATH_CASES)
def test_overlay2_matches_vfs(name: str, mounting_driver: str, arena: Any, tmp_path: Path) -> None:
    """The merged view on overlay2 is the view vfs gives for the same layers."""
    case = CASES[name]
    with LayerStore.open(arena.root, mounting_driver) as store:
        ctx, top, blob, kw = prepare(store, case, arena.base)
        layer = store.import_layer(io.BytesIO(blob), top, limits=case.limits, **kw)
        expect = case.expect(ctx) if callable(case.expect) else case.expect
        assert view_of(store, layer.id) == expect
        with LayerStore.open(tmp_path / "vfs-store", "vfs") as vfs:
            _, vtop, vblob, vkw = prepare(vfs, case, arena.base)
            vlayer = vfs.import_layer(io.BytesIO(vblob), vtop, limits=case.limits, **vkw)
            assert view_of(vfs, vlayer.id) == view_of(store, layer.id)


def test_every_group_is_covered() -> None:
    groups = {c.group for c in CASES.values()}
    assert groups == {
        "moby",
        "containerd",
        "umoci",
        "cpython",
        "whiteout",
        "malformed",
        "compression",
        "digest",
        "overlay-xattr",
    }
    assert len(CASES) >= 15
