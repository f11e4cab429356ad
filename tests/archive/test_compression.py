"""Compression: detection, strict decompression of every format, limits, deterministic output."""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import io
import lzma
import os
import zlib

import pytest
import zstandard

from graphdriver.archive import compression
from graphdriver.archive.compression import (
    Compression,
    DigestReader,
    detect_compression,
    drain,
    open_compressed,
    open_decompressed,
)
from graphdriver.archive.types import Limits
from graphdriver.errors import CorruptStream, InvalidArgument, LimitExceeded
from graphdriver.testing.tarbuild import compress

DATA = os.urandom(200_000) * 3 + b"end"
FORMATS = ["none", "gzip", "zstd", "bzip2", "xz"]


@functools.cache
def packed(kind: str) -> bytes:
    """DATA compressed as ``kind`` (computed once: bzip2 and xz are slow)."""
    return compress(DATA, kind)  # type: ignore[arg-type]


def decompress(blob: bytes, limits: Limits | None = None) -> bytes:
    with open_decompressed(io.BytesIO(blob), limits) as r:
        out = bytearray()
        buf = bytearray(70_000)
        while n := r.readinto(buf):
            out += buf[:n]
        assert r.bytes_read == len(out)
        return bytes(out)


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"\x1f\x8b\x08\x00", Compression.GZIP),
        (b"\x28\xb5\x2f\xfd\x00", Compression.ZSTD),
        (b"BZh91AY", Compression.BZIP2),
        (b"\xfd7zXZ\x00\x00", Compression.XZ),
        (b"\x1f\x8b\x07", Compression.NONE),  # gzip magic with another method: not gzip
        (b"ustar", Compression.NONE),
        (b"", Compression.NONE),
    ],
)
def test_detect(head: bytes, kind: Compression) -> None:
    assert detect_compression(head) is kind


@pytest.mark.parametrize("kind", FORMATS)
def test_roundtrip(kind: str) -> None:
    out = io.BytesIO()
    with open_compressed(out, kind) as w:
        w.write(DATA[:1000])
        w.write(DATA[1000:])
    assert not out.closed
    blob = out.getvalue()
    assert detect_compression(blob[:6]).value == kind
    assert decompress(blob) == DATA


@pytest.mark.parametrize("kind", ["gzip", "zstd", "bzip2", "xz"])
def test_concatenated_streams_are_read_through(kind: str) -> None:
    blob = packed(kind) + compress(b"second", kind)  # type: ignore[arg-type]
    assert decompress(blob) == DATA + b"second"


@pytest.mark.parametrize("kind", ["gzip", "zstd", "bzip2", "xz"])
@pytest.mark.parametrize("cut", [1, 4, 9, 300, -1])
def test_truncation_anywhere_is_corrupt(kind: str, cut: int) -> None:
    blob = packed(kind)
    end = len(blob) // 2 if cut == -1 else len(blob) - cut
    with pytest.raises(CorruptStream):
        decompress(blob[:end])


@pytest.mark.parametrize("kind", ["gzip", "zstd", "bzip2", "xz"])
def test_trailing_garbage_is_corrupt(kind: str) -> None:
    with pytest.raises(CorruptStream, match=r"trailing garbage|corrupt zstd"):
        decompress(packed(kind) + b"garbage!")


@pytest.mark.parametrize(
    ("kind", "tolerated"), [("gzip", True), ("xz", True), ("bzip2", False), ("zstd", False)]
)
def test_trailing_zero_padding(kind: str, tolerated: bool) -> None:
    blob = packed(kind) + bytes(1024)
    if tolerated:
        assert decompress(blob) == DATA
        with pytest.raises(CorruptStream):
            decompress(blob + b"x")
    else:
        with pytest.raises(CorruptStream):
            decompress(blob)


def test_gzip_bad_crc_and_bad_isize() -> None:
    blob = gzip.compress(DATA, mtime=0)
    for offset in (-8, -3):  # CRC32, then ISIZE
        damaged = bytearray(blob)
        damaged[offset] ^= 0x01
        with pytest.raises(CorruptStream, match="corrupt gzip stream"):
            decompress(bytes(damaged))


def test_gzip_checks_without_isal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compression, "_gzip_zlib", zlib)
    blob = gzip.compress(DATA, mtime=0)
    assert decompress(blob + gzip.compress(b"2")) == DATA + b"2"
    damaged = bytearray(blob)
    damaged[-6] ^= 0x10
    with pytest.raises(CorruptStream, match="CRC32 mismatch"):
        decompress(bytes(damaged))
    with pytest.raises(CorruptStream, match="truncated"):
        decompress(blob[:-2])


class Trickle(io.RawIOBase):
    """Returns at most ``n`` bytes per read, so headers and trailers straddle reads."""

    def __init__(self, data: bytes, n: int) -> None:
        self._data = io.BytesIO(data)
        self._n = n

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        chunk = self._data.read(min(self._n, len(b)))
        b[: len(chunk)] = chunk
        return len(chunk)


def gzip_member(
    payload: bytes, *, extra: bytes = b"XTRA", name: bytes = b"name.tar", hcrc: bool = True
) -> bytes:
    flags = 0x04 | 0x08 | (0x02 if hcrc else 0)
    header = bytes([0x1F, 0x8B, 8, flags]) + bytes(6)
    header += len(extra).to_bytes(2, "little") + extra + name + b"\0"
    if hcrc:
        header += (zlib.crc32(header) & 0xFFFF).to_bytes(2, "little")
    body = zlib.compress(payload)[2:-4]  # raw deflate
    trailer = zlib.crc32(payload).to_bytes(4, "little") + len(payload).to_bytes(4, "little")
    return header + body + trailer


@pytest.mark.parametrize("use_isal", [True, False])
@pytest.mark.parametrize("trickle", [1, 3, 7, 1 << 20])
def test_gzip_header_fields_split_across_reads(
    use_isal: bool, trickle: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not use_isal:
        monkeypatch.setattr(compression, "_gzip_zlib", zlib)
    blob = gzip_member(b"payload") + gzip_member(b"two", extra=b"", name=b"") + gzip_member(b"3", hcrc=False)
    with open_decompressed(Trickle(blob, trickle)) as r:  # type: ignore[arg-type]
        assert r.read() == b"payloadtwo3"


def test_gzip_bad_header_checksum_and_flags() -> None:
    blob = bytearray(gzip_member(b"payload"))
    blob[25] ^= 1  # inside the name: the header CRC no longer matches
    with pytest.raises(CorruptStream, match="header checksum"):
        decompress(bytes(blob))
    blob = bytearray(gzip_member(b"payload", hcrc=False))
    blob[3] |= 0x80  # a reserved flag bit
    with pytest.raises(CorruptStream, match="bad member header"):
        decompress(bytes(blob))


def test_zstd_bad_checksum_and_skippable_frames() -> None:
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(DATA)
    damaged = bytearray(frame)
    damaged[-1] ^= 0xFF
    with pytest.raises(CorruptStream, match="checksum"):
        decompress(bytes(damaged))
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    assert decompress(frame + skippable + frame) == DATA + DATA
    # a frame without a checksum, with the content size unknown (streamed)
    streamed = io.BytesIO()
    with zstandard.ZstdCompressor(write_checksum=False).stream_writer(streamed, closefd=False) as w:
        w.write(b"abc" * 1000)
    assert decompress(streamed.getvalue()) == b"abc" * 1000


def test_zstd_cut_at_every_frame_section() -> None:
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(DATA)
    for end in (5, 6, 12, 40, len(frame) - 4, len(frame) - 1):
        with pytest.raises(CorruptStream):
            decompress(frame[:end])


@pytest.mark.parametrize("kind", ["none", "gzip", "zstd", "bzip2", "xz"])
def test_bomb_stops_at_the_limit(kind: str) -> None:
    zeros = bytes(12 << 20)
    blob = compress(zeros, kind)  # type: ignore[arg-type]
    with pytest.raises(LimitExceeded, match="limit of 8388608 uncompressed bytes"):
        decompress(blob, Limits(max_decompressed_bytes=8 << 20))
    assert decompress(blob, Limits(max_decompressed_bytes=12 << 20)) == zeros


def test_each_read_is_bounded() -> None:
    # 64 MiB of zeros in ~64 KiB of gzip: a read never inflates more than asked for
    blob = gzip.compress(bytes(64 << 20), compresslevel=9, mtime=0)
    with open_decompressed(io.BytesIO(blob)) as r:
        assert len(r.read(4096)) == 4096
        assert r.readinto(bytearray(1 << 20)) <= 1 << 20


def test_drain_verifies_the_trailer() -> None:
    blob = bytearray(gzip.compress(DATA, mtime=0))
    blob[-6] ^= 1
    with open_decompressed(io.BytesIO(bytes(blob))) as r:
        r.read(100)  # the data is fine so far
        with pytest.raises(CorruptStream):
            drain(r)
    with open_decompressed(io.BytesIO(compress(DATA, "zstd"))) as r:
        r.read(10)
        assert drain(r) == len(DATA) - 10


def test_input_stream_is_not_closed() -> None:
    src = io.BytesIO(gzip.compress(b"x"))
    with open_decompressed(src) as r:
        r.read()
    assert not src.closed


def test_gzip_output_is_deterministic() -> None:
    outs = []
    for _ in range(2):
        out = io.BytesIO()
        with open_compressed(out, Compression.GZIP) as w:
            w.write(DATA)
        outs.append(out.getvalue())
    assert outs[0] == outs[1]
    assert outs[0][4:8] == b"\0\0\0\0"  # mtime 0
    assert not outs[0][3] & 0x08  # no FNAME
    assert gzip.decompress(outs[0]) == DATA


def test_bzip2_and_xz_compressed_output_decompresses_with_stdlib() -> None:
    for kind, dec in (("bzip2", bz2.decompress), ("xz", lzma.decompress)):
        out = io.BytesIO()
        with open_compressed(out, kind) as w:
            w.write(b"abc")
        assert dec(out.getvalue()) == b"abc"


def test_unknown_compression_is_invalid_argument() -> None:
    with (
        pytest.raises(InvalidArgument, match="unknown compression 'lz4'"),
        open_compressed(io.BytesIO(), "lz4"),
    ):
        pass


def test_digest_reader() -> None:
    blob = gzip.compress(DATA, mtime=0)
    reader = DigestReader(io.BytesIO(blob))
    with open_decompressed(reader) as r:
        assert drain(r) == len(DATA)
    assert reader.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert reader.size == len(blob)
    r512 = DigestReader(io.BytesIO(b"abc"), "sha512")
    assert r512.read() == b"abc"
    assert r512.digest == "sha512:" + hashlib.sha512(b"abc").hexdigest()
