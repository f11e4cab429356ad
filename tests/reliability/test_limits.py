"""Extraction limits (graphdriver.archive.types.Limits), exceeded through the layer store.

Each limit is passed once with its default value and once with a setting given to
:meth:`LayerStore.import_layer` (``limits=``). Every time: :class:`LimitExceeded` (sparse members:
:class:`InvalidArchive`, they are refused outright, so their apparent size never counts), and a
full rollback: the store exactly as before (records, files, mounts, ``check()`` clean, nothing in
``staging/``) and the sentinel next to the store untouched.

Defaults that cost too much to reach in a test are only asserted as values: 64 GiB decompressed
(a 64 GiB stream takes minutes to inflate) and 4 million entries (minutes to apply).
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from graphdriver.archive.apply import apply_layer
from graphdriver.archive.types import Limits
from graphdriver.errors import GraphDriverError, InvalidArchive, LimitExceeded
from graphdriver.layers.store import LayerStore
from graphdriver.testing.tarbuild import Header, TarBuilder, compress, encode_header

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the store tests run as root")

def deep_path(depth: int) -> str:
    return "/".join(["d"] * depth) + "/f"


def entries(n: int) -> bytes:
    b = TarBuilder()
    for i in range(n):
        b.file(f"f{i}", b"")
    return b.build()


def claimed_size(size: int) -> bytes:
    """A header claiming ``size`` bytes of data, followed by a little data and no end: the limit
    must be checked from the size field, before anything is read."""
    return encode_header(Header(name=b"big", size=size)) + bytes(1024)


@dataclass(frozen=True)
class LimitCase:
    tar: Callable[[], bytes]
    limits: Limits | None
    match: str
    compression: str = "none"


CASES: dict[str, LimitCase] = {
    # decompressed bytes: the store's own decompressor counts them, with the setting
    "decompressed-bytes-gzip": LimitCase(
        lambda: TarBuilder().file("z", bytes(3 << 20)).build(),
        Limits(max_decompressed_bytes=1 << 20),
        "limit of 1048576 uncompressed bytes",
        compression="gzip",
    ),
    "decompressed-bytes-zstd": LimitCase(
        lambda: TarBuilder().file("z", bytes(3 << 20)).build(),
        Limits(max_decompressed_bytes=1 << 20),
        "limit of 1048576 uncompressed bytes",
        compression="zstd",
    ),
    "decompressed-bytes-plain": LimitCase(
        lambda: TarBuilder().file("z", bytes(3 << 20)).build(),
        Limits(max_decompressed_bytes=1 << 20),
        "limit of 1048576 uncompressed bytes",
    ),
    # per-entry size
    "entry-size-default": LimitCase(lambda: claimed_size((16 << 30) + 1), None, "larger than the limit"),
    "entry-size-setting": LimitCase(
        lambda: TarBuilder().file("f", bytes(4097)).build(),
        Limits(max_entry_size=4096),
        "entry of 4097 bytes is larger than the limit of 4096",
    ),
    # extended headers (PAX / GNU long names)
    "header-size-default": LimitCase(
        lambda: TarBuilder().file("f", pax={"comment": "c" * ((1 << 20) + 1)}).build(),
        None,
        "larger than the limit of 1048576",
    ),
    "header-size-setting": LimitCase(
        lambda: TarBuilder().file("f", pax={"comment": "c" * 8192}).build(),
        Limits(max_header_size=4096),
        "larger than the limit of 4096",
    ),
    # entries
    "entries-setting": LimitCase(
        lambda: entries(101), Limits(max_entries=100), "more than 100 entries"
    ),
    # path depth
    "path-depth-default": LimitCase(
        lambda: TarBuilder().file(deep_path(512), b"x").build(), None, "deeper than 512 components"
    ),
    "path-depth-setting": LimitCase(
        lambda: TarBuilder().file(deep_path(16), b"x").build(),
        Limits(max_path_depth=16),
        "deeper than 16 components",
    ),
    # path length
    "path-length-default": LimitCase(
        lambda: TarBuilder().file("p/" * 8193, b"x").build(), None, "longer than the limit of 16384"
    ),
    "path-length-setting": LimitCase(
        lambda: TarBuilder().file("p/" * 100, b"x").build(),
        Limits(max_path_length=128),
        "longer than the limit of 128",
    ),
}


def l0() -> bytes:
    return TarBuilder().dir("etc").file("etc/passwd", b"inside\n").build()


def params() -> list[Any]:
    return [pytest.param(name, id=name) for name in sorted(CASES)]


def refused_cleanly(
    store: LayerStore,
    arena: Any,
    rk: Any,
    blob: bytes,
    *,
    error: type[GraphDriverError],
    match: str,
    limits: Limits | None = None,
) -> None:
    """Import ``blob`` as a base layer and on top of L0: ``error`` both times, full rollback."""
    top = store.import_layer(io.BytesIO(l0())).id
    arena.sentinel.arm()
    before = rk.capture(store)
    for parent in (None, top):
        with pytest.raises(error, match=match):
            store.import_layer(io.BytesIO(blob), parent, limits=limits)
        rk.assert_unchanged(store, before)
        arena.sentinel.assert_intact(scan=[arena.root])


@pytest.mark.parametrize("name", params())
def test_limit_through_the_store(name: str, driver_name: str, arena: Any, rk: Any) -> None:
    case = CASES[name]
    blob = compress(case.tar(), case.compression)  # type: ignore[arg-type]
    with LayerStore.open(arena.root, driver_name) as store:
        refused_cleanly(store, arena, rk, blob, error=LimitExceeded, match=case.match, limits=case.limits)


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.limits is not None))
def test_setting_is_honoured_by_apply_layer(name: str, tmp_path: Path) -> None:
    """The same settings given to apply_layer directly: the reader honours every one of them."""
    case = CASES[name]
    blob = compress(case.tar(), case.compression)  # type: ignore[arg-type]
    with pytest.raises(LimitExceeded, match=case.match):
        apply_layer(tmp_path, io.BytesIO(blob), limits=case.limits)


def test_at_the_limit_is_accepted(driver_name: str, arena: Any) -> None:
    """At the default depth (512 components) a layer imports, with the decompressed-bytes setting
    at exactly its size. (A name at the 16 KiB length limit cannot be applied at all: paths are
    resolved with openat2, bound by PATH_MAX, 4096: InvalidArchive, see test_hostile.py.)"""
    tar = TarBuilder().file(deep_path(511), b"deep").build()
    with LayerStore.open(arena.root, driver_name) as store:
        layer = store.import_layer(
            io.BytesIO(gzip.compress(tar, mtime=0)), limits=Limits(max_decompressed_bytes=len(tar))
        )
        assert layer.uncompressed_size == len(tar)
        with store.mounted(layer.id) as view:
            fd = os.open(view, os.O_RDONLY | os.O_DIRECTORY)
            try:
                deep = os.open(deep_path(511), os.O_RDONLY, dir_fd=fd)
                assert os.read(deep, 10) == b"deep"
                os.close(deep)
            finally:
                os.close(fd)


def test_defaults() -> None:
    assert Limits() == Limits(
        max_decompressed_bytes=64 << 30,
        max_entries=4_000_000,
        max_entry_size=16 << 30,
        max_header_size=1 << 20,
        max_path_depth=512,
        max_path_length=16 << 10,
    )


# -- sparse files: refused, whatever their apparent size --------------------------------------


def gnu_sparse_header(name: bytes, realsize: int, data: bytes) -> bytes:
    """A hand-made GNU ``S`` member: one data region at offset 0, apparent size ``realsize``."""
    h = bytearray(
        encode_header(
            Header(name=name, typeflag=b"S", size=len(data), magic=b"ustar ", version=b" \0", chksum=b" " * 8)
        )
    )
    h[386:398] = f"{0:011o}\0".encode()  # sparse[0].offset
    h[398:410] = f"{len(data):011o}\0".encode()  # sparse[0].numbytes
    h[483:495] = f"{realsize:011o}\0".encode()  # realsize
    h[148:156] = b" " * 8
    h[148:156] = f"{sum(h):06o}\0 ".encode()
    pad = -len(data) % 512
    return bytes(h) + data + bytes(pad) + bytes(1024)


def tar_sparse(tmp_path: Path, fmt: str) -> bytes:
    """GNU tar's own sparse archive of a 16 GiB file holding 20 bytes."""
    src = tmp_path / f"src-{fmt}"
    src.mkdir()
    with open(src / "huge", "wb") as f:
        f.write(b"twenty bytes of data")
        f.truncate(16 << 30)
    proc = subprocess.run(
        ["tar", f"--format={fmt}", "--sparse", "--numeric-owner", "-C", str(src), "-cf", "-", "huge"],
        capture_output=True,
        check=True,
    )
    assert len(proc.stdout) < 64 << 10
    return proc.stdout


SPARSE = {
    "gnu-S-member-16GiB": lambda tmp: gnu_sparse_header(b"huge", 16 << 30, b"twenty bytes of data"),
    "gnu-tar-format-gnu": lambda tmp: tar_sparse(tmp, "gnu"),
    "gnu-tar-format-pax": lambda tmp: tar_sparse(tmp, "pax"),
}


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_sparse_members_are_refused(name: str, driver_name: str, arena: Any, rk: Any, tmp_path: Path) -> None:
    blob = SPARSE[name](tmp_path)
    with LayerStore.open(arena.root, driver_name) as store:
        blob = gzip.compress(blob, mtime=0)
        refused_cleanly(store, arena, rk, blob, error=InvalidArchive, match="sparse files")
