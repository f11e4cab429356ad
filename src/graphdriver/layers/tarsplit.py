"""Tar-split: what it takes to give back a layer's original tar, byte for byte.

A layer's diff ID is the digest of the tar it was imported from, and that tar is not the one an
export of the stored files would write (GNU tar, BuildKit, docker each order and pad headers their
own way). As containers/storage does (``<id>.tar-split.gz``), the store keeps every byte of the
original tar *except the content of regular files*, which is already stored in the layer: headers,
extended headers, padding, the end-of-archive blocks and anything after them. Putting the two back
together gives the original tar, so:

- ``check(verify_content=True)`` recomputes each layer's diff ID from what is stored now, exactly;
- an export of the image hands out layers with the digests it was imported with.

While a layer is imported, :class:`TeeReader` shows every uncompressed byte to a
:class:`Recorder`, which follows the tar structure (ustar, GNU long names, PAX ``path``/``size``)
and writes, zstd-compressed, to ``<root>/tarsplit/<id>.tsplit.zst``::

    "GDTS1\\n"                                   magic
    "R" <varint n> <n bytes>                     bytes of the tar, verbatim
    "F" <varint size> <varint len> <path bytes>  the content of the regular file at path (size bytes)
    "E"                                          end (a file without it is truncated)

Anything the recorder does not understand is kept verbatim from there on, which is always correct
(only larger). :func:`reassemble` reads the file contents back through the layer's mounted view,
each path resolved inside that root (:func:`graphdriver.fs.inroot.open_in_root`), so a symlink
in the layer never leads outside it.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from graphdriver.errors import StoreCorrupt
from graphdriver.fs.inroot import open_in_root

__all__ = ["MAGIC", "Recorder", "TeeReader", "reassemble"]

MAGIC = b"GDTS1\n"
BLOCK = 512
_ZERO = bytes(BLOCK)
_REG = (b"0", b"\0", b"7")
_META = (b"x", b"g", b"L", b"K")
_MAX_META = 1 << 20
_FLUSH_RAW = 1 << 16


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _number(field: bytes) -> int | None:
    if field[0] & 0x80:  # base-256
        if field[0] & 0x40:
            return None  # negative: the applier refuses it anyway
        value = field[0] & 0x3F
        for b in field[1:]:
            value = (value << 8) | b
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if not text.isdigit():  # int(..., 8) would accept "-1", "+1", "0o1", "1_0": not tar numbers
        return None
    try:
        return int(text, 8)
    except ValueError:
        return None


def _pax(data: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        try:
            length = int(data[pos:sp])
        except ValueError:
            break
        record = data[sp + 1 : pos + length]
        if length <= 0 or not record.endswith(b"\n"):
            break
        key, _, value = record[:-1].partition(b"=")
        out[key] = value
        pos += length
    return out


_HEADER, _META_DATA, _FILE_DATA, _PAD, _RAW = range(5)
_OUT_FLUSH = 1 << 20


class Recorder:
    """Follows a tar byte stream fed to it in order and writes its tar-split to ``out``.

    It sees every byte of every layer imported, so it works on memoryviews and touches file
    content only to count it; output is buffered and written in large pieces.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._buf = bytearray(MAGIC)  # encoded records not yet written to out
        self._raw = bytearray()  # verbatim tar bytes not yet encoded
        self._hdr = bytearray()  # a header block split across two feeds
        self._state = _HEADER
        self._left = 0
        self._pad = 0
        self._meta = bytearray()
        self._meta_type = b""
        self._pax_path: bytes | None = None
        self._pax_size: int | None = None
        self._long_name: bytes | None = None

    def _flush_raw(self) -> None:
        if self._raw:
            self._buf += b"R" + _varint(len(self._raw))
            self._buf += self._raw
            self._raw.clear()
        if len(self._buf) >= _OUT_FLUSH:
            self._out.write(bytes(self._buf))
            self._buf.clear()

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        i, n = 0, len(view)
        raw = self._raw
        while i < n:
            state = self._state
            if state == _FILE_DATA:
                k = min(self._left, n - i)
                self._left -= k
                i += k
                if self._left == 0:
                    self._to_pad()
            elif state == _HEADER:
                if not self._hdr and n - i >= BLOCK:
                    header = bytes(view[i : i + BLOCK])
                    i += BLOCK
                    self._header(header)
                else:
                    k = min(BLOCK - len(self._hdr), n - i)
                    self._hdr += view[i : i + k]
                    i += k
                    if len(self._hdr) == BLOCK:
                        header = bytes(self._hdr)
                        self._hdr.clear()
                        self._header(header)
            elif state == _PAD:
                k = min(self._left, n - i)
                raw += view[i : i + k]
                self._left -= k
                i += k
                if self._left == 0:
                    self._state = _HEADER
            elif state == _META_DATA:
                k = min(self._left, n - i)
                chunk = view[i : i + k]
                raw += chunk
                self._meta += chunk
                self._left -= k
                i += k
                if self._left == 0:
                    self._end_meta()
            else:  # _RAW
                raw += view[i:]
                i = n
            if len(raw) >= _FLUSH_RAW:
                self._flush_raw()

    def _to_pad(self) -> None:
        self._left = self._pad
        self._state = _PAD if self._pad else _HEADER

    def _header(self, header: bytes) -> None:
        self._raw += header
        if header == _ZERO:
            self._state = _RAW  # the end of the archive: the rest is kept verbatim
            return
        typeflag = header[156:157]
        size = _number(header[124:136])
        if size is None:
            self._state = _RAW
            return
        if typeflag in _META:
            if size > _MAX_META:
                self._state = _RAW
                return
            self._meta_type = typeflag
            self._meta.clear()
            self._left = size
            self._pad = -size % BLOCK
            self._state = _META_DATA
            if size == 0:
                self._end_meta()
            return
        if self._pax_path:
            name = self._pax_path
        elif self._long_name is not None:
            name = self._long_name
        else:
            name = header[0:100].split(b"\0", 1)[0]
            if header[257:263] == b"ustar\0" and header[345] != 0:
                name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        if self._pax_size is not None:
            size = self._pax_size
        self._pax_path = self._pax_size = self._long_name = None
        if typeflag not in _REG or size == 0 or (typeflag == b"\0" and name.endswith(b"/")):
            return  # no data follows (header-only types carry none whatever their size says)
        self._flush_raw()
        self._buf += b"F" + _varint(size) + _varint(len(name)) + name
        self._left = size
        self._pad = -size % BLOCK
        self._state = _FILE_DATA

    def _end_meta(self) -> None:
        data = bytes(self._meta)
        if self._meta_type == b"x":
            if b"path=" in data or b"size=" in data:
                records = _pax(data)
                if b"path" in records:
                    self._pax_path = records[b"path"]
                if b"size" in records:
                    value = records[b"size"]
                    if not value.isdigit():  # negative or malformed: keep the rest verbatim
                        self._state = _RAW
                        return
                    self._pax_size = int(value)
        elif self._meta_type == b"L":
            self._long_name = data.rstrip(b"\0")
        self._to_pad()

    def finish(self) -> None:
        """Write what is pending and the end marker (call after the stream was drained)."""
        if self._hdr:
            self._raw += self._hdr
            self._hdr.clear()
        self._flush_raw()
        self._buf += b"E"
        self._out.write(bytes(self._buf))
        self._buf.clear()


class TeeReader(io.RawIOBase):
    """Reads through ``stream`` and shows every byte to ``recorder``."""

    def __init__(self, stream: BinaryIO, recorder: Recorder) -> None:
        super().__init__()
        self._stream = stream
        self._recorder = recorder

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = int(self._stream.readinto(view) or 0)  # type: ignore[attr-defined]
        if n:
            self._recorder.feed(view[:n])
        return n


# -- reading it back -------------------------------------------------------------------------------


def _rel(name: bytes) -> bytes:
    parts = [p for p in name.split(b"/") if p not in (b"", b".")]
    return b"/".join(parts) or b"."


def _read_varint(src: BinaryIO) -> int:
    value = shift = 0
    while True:
        b = src.read(1)
        if not b:
            raise StoreCorrupt("tar-split is truncated")
        value |= (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            return value


def _read_exact(src: BinaryIO, n: int) -> bytes:
    data = src.read(n)
    if len(data) != n:
        raise StoreCorrupt("tar-split is truncated")
    return data


def reassemble(split: Path, root: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Yield the original tar: the tar-split ``split`` with file contents read below ``root``.

    A file that is missing or shorter than recorded yields what there is (the digest of the
    result then differs from the diff ID, which is what a content check reports).
    """
    import zstandard

    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with open(split, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as src:
            src_io: BinaryIO = src
            if _read_exact(src_io, len(MAGIC)) != MAGIC:
                raise StoreCorrupt(f"{split}: not a tar-split file")
            while True:
                tag = src_io.read(1)
                if tag == b"E":
                    return
                if tag == b"R":
                    n = _read_varint(src_io)
                    while n:
                        data = _read_exact(src_io, min(n, chunk))
                        n -= len(data)
                        yield data
                elif tag == b"F":
                    size = _read_varint(src_io)
                    name = _read_exact(src_io, _read_varint(src_io))
                    yield from _file_content(root_fd, name, size, chunk)
                else:
                    raise StoreCorrupt(f"{split}: truncated or corrupt tar-split")
    finally:
        os.close(root_fd)


def _file_content(root_fd: int, name: bytes, size: int, chunk: int) -> Iterator[bytes]:
    try:
        fd = open_in_root(root_fd, _rel(name), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EXDEV, errno.EACCES):
            return
        raise
    try:
        left = size
        while left:
            data = os.read(fd, min(left, chunk))
            if not data:
                return
            left -= len(data)
            yield data
    finally:
        os.close(fd)
