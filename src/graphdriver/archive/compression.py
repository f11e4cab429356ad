"""Layer stream compression: detection, strict in-process decompression, deterministic compression.

- :func:`open_decompressed` detects gzip, zstd, bzip2 and xz by their magic bytes (anything else is
  read as a plain tar) and decompresses in-process; no decompressor is ever executed (CVE-2014-9357,
  CVE-2026-41567). Every format is read strictly: a truncated stream, a bad CRC/ISIZE/content
  checksum or trailing garbage raises :class:`CorruptStream` when it is reached. Multi-member gzip
  (eStargz), concatenated bzip2/xz streams and multiple zstd frames (and skippable frames) are read
  through; zero padding after gzip and xz streams is tolerated (as gzip(1) and xz(1) do). The
  decompressed bytes are counted against ``Limits.max_decompressed_bytes`` (:class:`LimitExceeded`),
  and each read returns a bounded amount, so a bomb never inflates in memory.
- :func:`drain` reads a stream to its end, so the trailers after the tar's end marker are verified.
- :func:`open_compressed` writes ``none``, ``gzip`` (mtime 0, no name: the same input always gives
  the same bytes), ``zstd``, ``bzip2`` or ``xz``.
- :class:`DigestReader` hashes and counts what is read through it (diff IDs, blob digests).

gzip member headers and the CRC32/ISIZE trailers are parsed and checked here; the deflate data is
inflated by ``isal`` (python-isal, about 2-3x faster) when it is importable, else by zlib. The
readers run on the caller's thread (isal holds the GIL while inflating, so a prefetch thread would
only add hand-offs; measured).
"""

from __future__ import annotations

import bz2
import enum
import hashlib
import io
import lzma
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any, BinaryIO, Protocol, cast

from graphdriver.archive.types import Limits
from graphdriver.errors import CorruptStream, InvalidArgument, LimitExceeded

_gzip_zlib: ModuleType
try:  # pragma: no branch
    from isal import isal_zlib as _gzip_zlib
except ImportError:  # pragma: no cover - isal is in the "fast" extra
    _gzip_zlib = zlib

__all__ = [
    "Compression",
    "DigestReader",
    "detect_compression",
    "drain",
    "open_compressed",
    "open_decompressed",
]

_IN_CHUNK = 256 << 10
_OUT_CHUNK = 1 << 20


class Compression(enum.Enum):
    """A layer compression format; the value is its name in options and on the command line."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"
    BZIP2 = "bzip2"
    XZ = "xz"


_GZIP_MAGIC = b"\x1f\x8b\x08"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BZIP2_MAGIC = b"BZh"
_XZ_MAGIC = b"\xfd7zXZ\x00"


def detect_compression(head: bytes) -> Compression:
    """The format whose magic ``head`` starts with (``NONE`` when none matches)."""
    if head.startswith(_GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(_ZSTD_MAGIC):
        return Compression.ZSTD
    if head.startswith(_BZIP2_MAGIC):
        return Compression.BZIP2
    if head.startswith(_XZ_MAGIC):
        return Compression.XZ
    return Compression.NONE


def _read_some(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    return bytes(data) if data else b""


class _Counted(io.RawIOBase):
    """Base of the readers: counts the bytes produced and enforces the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.bytes_read = 0
        self._limit = limit

    def readable(self) -> bool:
        return True

    def _produce(self, b: memoryview) -> int:
        """Fill the start of ``b``; return how much (0 at the end)."""
        data = self._chunk(len(b))
        b[: len(data)] = data
        return len(data)

    def _chunk(self, n: int) -> bytes:
        """Up to ``n`` bytes (b"" at the end); subclasses implement this or :meth:`_produce`."""
        buf = bytearray(n)
        k = self._produce(memoryview(buf))
        return bytes(buf[:k])

    def _count(self, n: int) -> None:
        self.bytes_read += n
        if self.bytes_read > self._limit:
            raise LimitExceeded(f"layer is larger than the limit of {self._limit} uncompressed bytes")

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if not len(view):
            return 0
        n = self._produce(view)
        self._count(n)
        return n


class _Plain(_Counted):
    def __init__(self, raw: BinaryIO, head: bytes, limit: int) -> None:
        super().__init__(limit)
        self._raw = raw
        self._head = head
        self._readinto = getattr(raw, "readinto", None)

    def _produce(self, b: memoryview) -> int:
        if self._head:
            k = min(len(self._head), len(b))
            b[:k] = self._head[:k]
            self._head = self._head[k:]
            return k
        if self._readinto is not None:
            return int(self._readinto(b) or 0)
        data = _read_some(self._raw, len(b))
        b[: len(data)] = data
        return len(data)


class _Member(Protocol):
    """One compressed stream/member, with the bz2/lzma decompressor interface."""

    @property
    def eof(self) -> bool: ...

    @property
    def needs_input(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int) -> bytes: ...


class _GzipMember:
    """One gzip member as a :class:`_Member`: the header and the CRC32/ISIZE trailer are parsed and
    checked here, the raw deflate body goes to isal (or zlib).

    (isal's own gzip-wrapper mode mis-parses FEXTRA/FNAME/FHCRC headers split across two inputs,
    which happens at any chunk boundary of a multi-member stream.)
    """

    def __init__(self) -> None:
        self._state = "header"
        self._pending = b""
        self._d: Any = None
        self._crc = 0
        self._size = 0
        self.eof = False
        self.unused_data = b""

    @property
    def needs_input(self) -> bool:
        return self._state != "body" or not self._d.unconsumed_tail

    def _parse_header(self) -> int:
        """Length of the complete header at the start of ``_pending``, or 0 if more is needed."""
        h = self._pending
        if len(h) < 10:
            return 0
        if h[2] != 8 or h[3] & 0xE0:
            raise CorruptStream("corrupt gzip stream: bad member header")
        flags = h[3]
        pos = 10
        if flags & 0x04:  # FEXTRA
            if len(h) < pos + 2:
                return 0
            pos += 2 + int.from_bytes(h[pos : pos + 2], "little")
        for flag in (0x08, 0x10):  # FNAME, FCOMMENT: NUL-terminated
            if flags & flag:
                end = h.find(b"\0", pos)
                if end < 0:
                    return 0
                pos = end + 1
        if flags & 0x02:  # FHCRC
            if len(h) < pos + 2:
                return 0
            if zlib.crc32(h[:pos]) & 0xFFFF != int.from_bytes(h[pos : pos + 2], "little"):
                raise CorruptStream("corrupt gzip stream: header checksum mismatch")
            pos += 2
        return pos if len(h) >= pos else 0

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if self._state == "header":
            self._pending += data
            length = self._parse_header()
            if not length:
                return b""
            data, self._pending = self._pending[length:], b""
            self._d = _gzip_zlib.decompressobj(-15)
            self._state = "body"
        if self._state == "body":
            out = bytes(self._d.decompress(data or self._d.unconsumed_tail, max_length))
            if out:
                self._crc = _gzip_zlib.crc32(out, self._crc)
                self._size += len(out)
            if not self._d.eof:
                return out
            data = bytes(self._d.unused_data)
            self._state = "trailer"
        else:
            out = b""
        self._pending += data
        if len(self._pending) >= 8:
            trailer = self._pending
            if int.from_bytes(trailer[:4], "little") != self._crc:
                raise CorruptStream("corrupt gzip stream: CRC32 mismatch")
            if int.from_bytes(trailer[4:8], "little") != self._size & 0xFFFFFFFF:
                raise CorruptStream("corrupt gzip stream: ISIZE mismatch")
            self.unused_data = trailer[8:]
            self._pending = b""
            self.eof = True
        return out


class _MultiStream(_Counted):
    """Concatenated members of one format, read strictly (see the module doc)."""

    def __init__(
        self,
        raw: BinaryIO,
        head: bytes,
        limit: int,
        *,
        kind: Compression,
        magic: bytes,
        factory: Callable[[], _Member],
        errors: tuple[type[BaseException], ...],
        zero_padding: bool,
    ) -> None:
        super().__init__(limit)
        self._raw = raw
        self._leftover = head
        self._kind = kind.value
        self._magic = magic
        self._factory = factory
        self._errors = errors
        self._zero_padding = zero_padding
        self._member: _Member | None = None
        self._done = False

    def _input(self) -> bytes:
        return _read_some(self._raw, _IN_CHUNK)

    def _start_member(self) -> bool:
        head = self._leftover
        while len(head) < len(self._magic):
            more = self._input()
            if not more:
                break
            head += more
        self._leftover = head
        if not head:
            return False
        if head.startswith(self._magic):
            self._member = self._factory()
            return True
        if self._zero_padding and not head.strip(b"\0"):
            while True:
                more = self._input()
                if not more:
                    self._leftover = b""
                    return False
                if more.strip(b"\0"):
                    break
        raise CorruptStream(f"trailing garbage after the {self._kind} stream")

    def _chunk(self, n: int) -> bytes:
        while not self._done:
            member = self._member
            if member is None:
                if not self._start_member():
                    self._done = True
                    return b""
                continue
            if member.eof:
                self._leftover = member.unused_data
                self._member = None
                continue
            data = b""
            if member.needs_input:
                data = self._leftover or self._input()
                self._leftover = b""
                if not data:
                    raise CorruptStream(f"truncated {self._kind} stream")
            try:
                out = member.decompress(data, n)
            except self._errors as exc:
                raise CorruptStream(f"corrupt {self._kind} stream: {exc}") from exc
            if out:
                return out
        return b""


class _ZstdWalker:
    """Follows zstd frame and block boundaries in the compressed bytes, to detect truncation.

    The ``zstandard`` stream reader reports a frame cut short as a clean end of stream; this walker
    sees the same bytes and knows whether the input ended between frames.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._need = 4
        self._skip = 0
        self._state = "magic"
        self._checksum = False
        self.bad = False

    @property
    def at_boundary(self) -> bool:
        return not self.bad and self._state == "magic" and not self._pending and not self._skip

    def feed(self, data: bytes) -> None:
        pos = 0
        end = len(data)
        while pos < end and not self.bad:
            if self._skip:
                k = min(self._skip, end - pos)
                self._skip -= k
                pos += k
                continue
            take = min(self._need - len(self._pending), end - pos)
            self._pending += data[pos : pos + take]
            pos += take
            if len(self._pending) < self._need:
                return
            chunk, self._pending = self._pending, b""
            self._step(chunk)

    def _step(self, chunk: bytes) -> None:
        state = self._state
        if state == "magic":
            magic = int.from_bytes(chunk, "little")
            if magic == 0xFD2FB528:
                self._state, self._need = "fhd", 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._need = "skippable", 4
            else:
                self.bad = True
        elif state == "skippable":
            self._skip = int.from_bytes(chunk, "little")
            self._state, self._need = "magic", 4
        elif state == "fhd":
            fhd = chunk[0]
            fcs_flag, single, did_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
            self._checksum = bool((fhd >> 2) & 1)
            size = (0 if single else 1) + (0, 1, 2, 4)[did_flag] + ((1 if single else 0), 2, 4, 8)[fcs_flag]
            if size:
                self._state, self._need = "fh", size
            else:
                self._state, self._need = "block", 3
        elif state == "fh":
            self._state, self._need = "block", 3
        elif state == "block":
            header = int.from_bytes(chunk, "little")
            last, btype, bsize = header & 1, (header >> 1) & 3, header >> 3
            if btype == 3:
                self.bad = True
                return
            self._skip = 1 if btype == 1 else bsize
            if last:
                if self._checksum:
                    self._state, self._need = "checksum", 4
                else:
                    self._state, self._need = "magic", 4
        elif state == "checksum":
            self._state, self._need = "magic", 4


class _WalkedSource:
    """The compressed input of the zstd reader, fed through a :class:`_ZstdWalker`."""

    def __init__(self, raw: BinaryIO, head: bytes, walker: _ZstdWalker) -> None:
        self._raw = raw
        self._head = head
        self._walker = walker
        self.eof = False

    def read(self, n: int = -1) -> bytes:
        if self._head:
            data, self._head = self._head, b""
        else:
            data = _read_some(self._raw, n if n > 0 else _IN_CHUNK)
        if not data:
            self.eof = True
        self._walker.feed(data)
        return data


class _Zstd(_Counted):
    def __init__(self, raw: BinaryIO, head: bytes, limit: int) -> None:
        import zstandard

        super().__init__(limit)
        self._zstd_error = zstandard.ZstdError
        self._walker = _ZstdWalker()
        self._source = _WalkedSource(raw, head, self._walker)
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            cast(BinaryIO, self._source), read_size=_IN_CHUNK, read_across_frames=True, closefd=False
        )
        self._done = False

    def _chunk(self, n: int) -> bytes:
        if self._done:
            return b""
        try:
            data = bytes(self._reader.read(n))
        except self._zstd_error as exc:
            raise CorruptStream(f"corrupt zstd stream: {exc}") from exc
        if data:
            return data
        self._done = True
        if not self._source.eof and self._source.read(1):
            raise CorruptStream("trailing garbage after the zstd stream")
        if not self._walker.at_boundary:
            raise CorruptStream("truncated or malformed zstd stream")
        return b""

    def close(self) -> None:
        self._reader.close()  # type: ignore[no-untyped-call]
        super().close()


def _peek(stream: BinaryIO, n: int) -> bytes:
    head = b""
    while len(head) < n:
        more = _read_some(stream, n - len(head))
        if not more:
            break
        head += more
    return head


@contextmanager
def open_decompressed(stream: BinaryIO, limits: Limits | None = None) -> Iterator[BinaryIO]:
    """Yield a reader of the decompressed ``stream`` (format detected by magic bytes).

    The reader counts what it produces in ``.bytes_read`` and raises :class:`LimitExceeded` past
    ``limits.max_decompressed_bytes``; corruption raises :class:`CorruptStream` when reached, so call
    :func:`drain` after the tar's end to verify the trailers. ``stream`` is not closed.
    """
    limit = (limits or Limits()).max_decompressed_bytes
    head = _peek(stream, 6)
    kind = detect_compression(head)
    reader: _Counted
    if kind is Compression.NONE:
        reader = _Plain(stream, head, limit)
    elif kind is Compression.GZIP:
        gzip_errors: tuple[type[BaseException], ...] = (zlib.error, _gzip_zlib.error)
        reader = _MultiStream(
            stream,
            head,
            limit,
            kind=kind,
            magic=b"\x1f\x8b",
            factory=_GzipMember,
            errors=gzip_errors,
            zero_padding=True,
        )
    elif kind is Compression.ZSTD:
        reader = _Zstd(stream, head, limit)
    elif kind is Compression.BZIP2:
        reader = _MultiStream(
            stream,
            head,
            limit,
            kind=kind,
            magic=_BZIP2_MAGIC,
            factory=bz2.BZ2Decompressor,
            errors=(OSError,),
            zero_padding=False,
        )
    else:
        reader = _MultiStream(
            stream,
            head,
            limit,
            kind=kind,
            magic=_XZ_MAGIC,
            factory=lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ),
            errors=(lzma.LZMAError,),
            zero_padding=True,
        )
    try:
        yield cast(BinaryIO, reader)
    finally:
        reader.close()


def drain(reader: BinaryIO) -> int:
    """Read ``reader`` to its end, discarding the bytes; return how many there were.

    On a reader from :func:`open_decompressed` this verifies the compression trailers (CRC, ISIZE,
    content checksums) and rejects trailing garbage.
    """
    buf = bytearray(_OUT_CHUNK)
    total = 0
    readinto = getattr(reader, "readinto", None)
    if readinto is None:  # pragma: no cover - every reader we make has readinto
        while chunk := reader.read(_OUT_CHUNK):
            total += len(chunk)
        return total
    while True:
        n = readinto(buf)
        if not n:
            return total
        total += n


class _NonClosing(io.RawIOBase):
    def __init__(self, out: BinaryIO) -> None:
        super().__init__()
        self._out = out

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b)
        n = len(view)
        written = 0
        while written < n:
            k = self._out.write(view[written:])
            written += n - written if k is None else k
        return n

    def flush(self) -> None:
        self._out.flush()


@contextmanager
def open_compressed(
    out: BinaryIO, compression: str | Compression, *, level: int | None = None
) -> Iterator[BinaryIO]:
    """Yield a writer that compresses into ``out``; leaving the context ends the stream.

    ``compression``: ``none``, ``gzip`` (level 6 by default, mtime 0 and no file name, so the
    output is reproducible), ``zstd`` (level 3, with a content checksum), ``bzip2`` or ``xz``.
    ``out`` is flushed, never closed.
    """
    try:
        kind = Compression(compression)
    except ValueError:
        raise InvalidArgument(f"unknown compression {compression!r} (none, gzip, zstd, bzip2, xz)") from None
    sink = _NonClosing(out)
    writer: Any
    if kind is Compression.NONE:
        writer = sink
    elif kind is Compression.GZIP:
        import gzip

        writer = gzip.GzipFile(filename="", mode="wb", fileobj=sink, mtime=0, compresslevel=level or 6)
    elif kind is Compression.ZSTD:
        import zstandard

        writer = zstandard.ZstdCompressor(level=level or 3, write_checksum=True).stream_writer(
            cast(BinaryIO, sink), closefd=False
        )
    elif kind is Compression.BZIP2:
        writer = bz2.BZ2File(sink, "wb", compresslevel=level or 9)
    else:
        writer = lzma.LZMAFile(cast(BinaryIO, sink), "wb", format=lzma.FORMAT_XZ, preset=level)  # noqa: SIM115
    ok = False
    try:
        yield cast(BinaryIO, writer)
        ok = True
    finally:
        if writer is not sink and (ok or not writer.closed):
            writer.close()
        if ok:
            out.flush()


class DigestReader(io.RawIOBase):
    """A reader that hashes and counts the bytes read through it.

    ``digest`` is ``"<algorithm>:<hex>"`` over everything read so far; ``size`` the byte count.
    """

    def __init__(self, stream: BinaryIO, algorithm: str = "sha256") -> None:
        super().__init__()
        self._stream = stream
        self.algorithm = algorithm
        self._hash = hashlib.new(algorithm)
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        readinto = getattr(self._stream, "readinto", None)
        if readinto is not None:
            n = int(readinto(view) or 0)
        else:
            data = _read_some(self._stream, len(view))
            n = len(data)
            view[:n] = data
        if n:
            self._hash.update(view[:n])
            self.size += n
        return n

    @property
    def digest(self) -> str:
        return f"{self.algorithm}:{self._hash.hexdigest()}"

    @property
    def hexdigest(self) -> str:
        return self._hash.hexdigest()
