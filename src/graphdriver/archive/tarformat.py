"""A strict, streaming tar reader for layer archives.

Python's :mod:`tarfile` is not used to parse layers: 3.11's reads PAX headers without a size cap,
accepts negative base-256 sizes, stops silently at a corrupt second header and has known extraction
bypasses (reference/security.md §1, §4). This module parses the bytes itself and validates every
header before the caller sees it, so the same objects that are checked are the ones applied.

:func:`iter_entries` yields one :class:`TarEntry` per archive member, in stream order. The data of
an entry can be read once, while it is the current entry (:meth:`TarEntry.readinto`,
:meth:`TarEntry.read`, :meth:`TarEntry.copy_to_fd`); whatever is not read is skipped when the
iterator advances.

Formats: ustar (with the name prefix), GNU (``L``/``K`` long names and link names, base-256 numbers),
PAX (``x`` records: path, linkpath, size, uid, gid, mtime/atime with nanoseconds, ``SCHILY.xattr.*``
and libarchive's ``LIBARCHIVE.xattr.*``). ``g`` global headers are read and ignored (they create
nothing, as in Go's archive/tar). Type flags ``0``, NUL and ``7`` are regular files; an old-style NUL
entry whose name ends in ``/`` is a directory. Header-only types (links, directories, devices, fifos)
carry no data whatever their size field says (as Go and tarfile read them).

Sparse files (GNU ``S`` members, PAX ``GNU.sparse.*``) are refused with :class:`InvalidArchive`:
layer.md says they SHOULD NOT be used, no layer writer produces them, and refusing avoids the 16 GiB
apparent-size trick (security.md §4).

Errors (a bad header is reported before its entry reaches the caller; data cut short when it is
read or skipped):

- :class:`CorruptStream`: a header checksum that does not match (any header, not only the first), data
  or a header cut short, a lone zero block followed by a header, an archive ending after a meta header.
- :class:`InvalidArchive`: malformed or negative numbers, uid/gid above 2**32-1, device numbers outside
  uint32, NUL bytes inside a PAX path, linkpath or xattr name (or inside a GNU long name), malformed
  PAX records, unknown type flags ("unhandled tar header type"), sparse members.
- :class:`LimitExceeded`: a PAX/GNU/global header above ``Limits.max_header_size`` (checked from the
  size field, before reading it), an entry above ``max_entry_size``, more than ``max_entries``
  entries, a name above ``max_path_length``, more than ``max_decompressed_bytes`` read.

Times before 1970 (negative base-256 or PAX mtimes) are valid; times beyond +-2**63 ns are not.
The end of the archive is two zero blocks; a stream that ends cleanly at a block boundary without
them is accepted (digests over the whole stream are the caller's check). Bytes after the end marker
are left unread in the stream.
"""

from __future__ import annotations

import base64
import binascii
import enum
import os
import re
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

from graphdriver.archive.types import Limits
from graphdriver.errors import CorruptStream, InvalidArchive, LimitExceeded

__all__ = ["BLOCK_SIZE", "EntryKind", "TarEntry", "iter_entries"]

BLOCK_SIZE = 512
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_CHUNK = 1 << 20
_UINT32_MAX = (1 << 32) - 1
_NS_LIMIT = 1 << 63
_OCTAL_DIGITS = b"01234567"


class EntryKind(enum.Enum):
    """The type of a tar member (sockets never appear in tar archives)."""

    REG = "regular file"
    DIR = "directory"
    SYMLINK = "symlink"
    HARDLINK = "hard link"
    CHAR = "character device"
    BLOCK = "block device"
    FIFO = "fifo"


_KINDS: dict[bytes, EntryKind] = {
    b"0": EntryKind.REG,
    b"\0": EntryKind.REG,
    b"7": EntryKind.REG,
    b"1": EntryKind.HARDLINK,
    b"2": EntryKind.SYMLINK,
    b"3": EntryKind.CHAR,
    b"4": EntryKind.BLOCK,
    b"5": EntryKind.DIR,
    b"6": EntryKind.FIFO,
}
_META = frozenset((b"x", b"g", b"L", b"K"))


class _Source:
    """A large read buffer over the stream, counting what was read."""

    __slots__ = ("_buf", "_eof", "_limit", "_readinto", "consumed", "end", "pos", "view")

    def __init__(self, stream: BinaryIO, limit: int) -> None:
        readinto = getattr(stream, "readinto", None)
        self._readinto: Callable[[memoryview], int | None]
        if readinto is not None:
            self._readinto = readinto
        else:  # pragma: no cover - every BinaryIO we meet has readinto

            def _via_read(view: memoryview) -> int:
                data = stream.read(len(view))
                view[: len(data)] = data
                return len(data)

            self._readinto = _via_read
        self._buf = bytearray(_CHUNK)
        self.view = memoryview(self._buf)
        self.pos = 0
        self.end = 0
        self.consumed = 0
        self._limit = limit
        self._eof = False

    def fill(self, need: int) -> int:
        """Make at least ``need`` bytes available if the stream has them; return how many are."""
        avail = self.end - self.pos
        if avail >= need or self._eof:
            return avail
        if need > len(self._buf):  # a header bigger than the buffer (max_header_size > 1 MiB)
            bigger = bytearray(need)
            bigger[:avail] = self.view[self.pos : self.end]
            self.view.release()
            self._buf = bigger
            self.view = memoryview(bigger)
            self.pos = 0
            self.end = avail
        elif self.pos:
            if avail:
                self._buf[:avail] = self.view[self.pos : self.end]
            self.pos = 0
            self.end = avail
        view = self.view
        while self.end < need:
            n = self._readinto(view[self.end :])
            if not n:
                self._eof = True
                break
            self.end += n
            self.consumed += n
            if self.consumed > self._limit:
                raise LimitExceeded(f"layer is larger than the limit of {self._limit} uncompressed bytes")
        return self.end - self.pos

    def skip(self, n: int) -> bool:
        """Consume ``n`` bytes; False if the stream ended first."""
        while n:
            avail = self.end - self.pos
            if not avail:
                avail = self.fill(1)
                if not avail:
                    return False
            k = avail if avail < n else n
            self.pos += k
            n -= k
        return True


class TarEntry:
    """One archive member, validated. Its data can be read once, while it is current.

    ``name`` and ``linkname`` are the names as stored (decoded UTF-8 with surrogateescape, so any
    byte string round-trips through :func:`os.fsencode`); the caller cleans them. ``mode`` holds the
    permission bits with setuid/setgid/sticky (07777). Times are nanoseconds since the epoch;
    ``atime_ns`` is None unless a PAX record gives it. ``size`` is the data size (0 for header-only
    types). ``xattrs`` maps attribute names to raw values.
    """

    __slots__ = (
        "_remaining",
        "_src",
        "atime_ns",
        "devmajor",
        "devminor",
        "gid",
        "kind",
        "linkname",
        "mode",
        "mtime_ns",
        "name",
        "size",
        "uid",
        "xattrs",
    )

    def __init__(  # noqa: PLR0917 - built once per member on the hot path
        self,
        name: str,
        kind: EntryKind,
        mode: int,
        uid: int,
        gid: int,
        size: int,
        mtime_ns: int,
        atime_ns: int | None,
        linkname: str,
        devmajor: int,
        devminor: int,
        xattrs: dict[str, bytes],
        src: _Source | None = None,
    ) -> None:
        self.name = name
        self.kind = kind
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = size
        self.mtime_ns = mtime_ns
        self.atime_ns = atime_ns
        self.linkname = linkname
        self.devmajor = devmajor
        self.devminor = devminor
        self.xattrs = xattrs
        self._src = src
        self._remaining = size if src is not None else 0

    def __repr__(self) -> str:
        return (
            f"TarEntry({self.name!r}, {self.kind.name}, mode={self.mode:o}, uid={self.uid}, "
            f"gid={self.gid}, size={self.size}, linkname={self.linkname!r})"
        )

    @property
    def remaining(self) -> int:
        """Bytes of data not read yet."""
        return self._remaining

    def _short(self) -> CorruptStream:
        return CorruptStream("unexpected end of stream inside the data of", self.name)

    def readinto(self, buf: memoryview | bytearray) -> int:
        """Read up to ``len(buf)`` bytes of data into ``buf``; 0 once all data was read."""
        src = self._src
        if not self._remaining or src is None:
            return 0
        avail = src.end - src.pos
        if not avail:
            avail = src.fill(1)
            if not avail:
                raise self._short()
        k = min(avail, self._remaining, len(buf))
        buf[:k] = src.view[src.pos : src.pos + k]
        src.pos += k
        self._remaining -= k
        return k

    def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes of data (all the rest when ``n`` < 0)."""
        want = self._remaining if n < 0 else min(n, self._remaining)
        out = bytearray(want)
        view = memoryview(out)
        got = 0
        while got < want:
            got += self.readinto(view[got:])
        return bytes(out)

    def copy_to_fd(self, fd: int) -> int:
        """Write all remaining data to ``fd`` (partial writes retried); return the bytes written."""
        src = self._src
        total = 0
        remaining = self._remaining
        if src is None:
            return 0
        write = os.write
        while remaining:
            avail = src.end - src.pos
            if not avail:
                avail = src.fill(1)
                if not avail:
                    self._remaining = remaining
                    raise self._short()
            k = avail if avail < remaining else remaining
            pos = src.pos
            stop = pos + k
            view = src.view
            while pos < stop:
                pos += write(fd, view[pos:stop])
            src.pos = stop
            remaining -= k
            total += k
        self._remaining = 0
        return total

    def skip(self) -> None:
        """Discard the remaining data."""
        if self._remaining and self._src is not None and not self._src.skip(self._remaining):
            raise self._short()
        self._remaining = 0


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _cstring(field: bytes) -> bytes:
    i = field.find(b"\0")
    return field if i < 0 else field[:i]


def _number(field: bytes, what: str, *, signed: bool = False) -> int:
    """Parse an octal or base-256 header field."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field, "big")
        bits = 8 * len(field)
        if field[0] & 0x40:  # negative, two's complement
            if not signed:
                raise InvalidArchive(f"negative number in the {what} field")
            return value - (1 << bits)
        return value & ~(0x80 << (bits - 8))
    digits = field.strip(b" \0")
    if not digits:
        return 0
    if digits.translate(None, _OCTAL_DIGITS):
        raise InvalidArchive(f"invalid number {digits!r} in the {what} field")
    return int(digits, 8)


_NUMERIC_FIELDS = re.compile(rb"[0-7 \0]{56}").fullmatch
_IDS_CACHE: dict[bytes, tuple[int, int, int]] = {}


def _octal(field: bytes) -> int:
    """An all-octal field (already validated: digits, spaces and NULs); ValueError on a space
    between digits."""
    digits = field.strip(b" \0")
    return int(digits, 8) if digits else 0


def _ids(fields: bytes) -> tuple[int, int, int]:
    """mode (07777 bits), uid and gid from the validated 24 bytes of their three fields,
    memoised: they repeat from member to member."""
    ids = _IDS_CACHE.get(fields)
    if ids is None:
        ids = (_octal(fields[:8]) & 0o7777, _octal(fields[8:16]), _octal(fields[16:24]))
        if len(_IDS_CACHE) < 4096:
            _IDS_CACHE[fields] = ids
    return ids


def _pax_uint(value: bytes, key: bytes) -> int:
    if not value.isdigit():  # bytes.isdigit is ASCII-only; rejects "-1", "+1", " 1", "1_0"
        raise InvalidArchive(f"invalid PAX {key.decode('ascii', 'replace')} value {value[:40]!r}")
    return int(value)


def _pax_time(value: bytes, key: bytes) -> int:
    negative = value.startswith(b"-")
    secs, dot, frac = (value[1:] if negative else value).partition(b".")
    if not secs.isdigit() or (dot and not frac.isdigit()):
        raise InvalidArchive(f"invalid PAX {key.decode('ascii', 'replace')} value {value[:40]!r}")
    ns = int(secs) * 1_000_000_000 + (int((frac + b"00000000")[:9]) if frac else 0)
    if ns >= _NS_LIMIT:
        raise InvalidArchive(f"PAX {key.decode('ascii', 'replace')} out of range")
    return -ns if negative else ns


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    """Parse ``"%d %s=%s\\n"`` records strictly (trailing NUL padding is tolerated)."""
    records: dict[bytes, bytes] = {}
    pos = 0
    end = len(data)
    while pos < end:
        if data[pos] == 0 and not data[pos:].strip(b"\0"):
            break
        sp = data.find(b" ", pos, pos + 24)
        length_field = data[pos:sp]
        if sp < 0 or not length_field.isdigit():
            raise InvalidArchive("malformed PAX record length")
        length = int(length_field)
        stop = pos + length
        if length <= sp - pos + 1 or stop > end or data[stop - 1] != 0x0A:
            raise InvalidArchive("malformed PAX record")
        key, eq, value = data[sp + 1 : stop - 1].partition(b"=")
        if not eq or not key:
            raise InvalidArchive("malformed PAX record (no key)")
        records[key] = value
        pos = stop
    return records


def _libarchive_xattr(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    from urllib.parse import unquote_to_bytes

    try:
        decoded = base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArchive("invalid base64 in a LIBARCHIVE.xattr record") from exc
    return unquote_to_bytes(name), decoded


def _apply_pax(  # noqa: PLR0917 - one call site, the fields in header order
    pax: dict[bytes, bytes],
    name: bytes,
    linkname: bytes,
    size: int,
    uid: int,
    gid: int,
    mtime_ns: int,
) -> tuple[bytes, bytes, int, int, int, int, int | None, dict[str, bytes]]:
    atime_ns: int | None = None
    xattrs: dict[str, bytes] = {}
    libarchive: dict[bytes, bytes] = {}
    for key, value in pax.items():
        if key == b"path":
            if value:
                if b"\0" in value:
                    raise InvalidArchive("NUL byte inside a PAX path", _decode(value.replace(b"\0", b"\\0")))
                name = value
        elif key == b"linkpath":
            if value:
                if b"\0" in value:
                    raise InvalidArchive(
                        "NUL byte inside a PAX linkpath", _decode(value.replace(b"\0", b"\\0"))
                    )
                linkname = value
        elif key == b"size":
            size = _pax_uint(value, key)
        elif key == b"uid":
            uid = _pax_uint(value, key)
        elif key == b"gid":
            gid = _pax_uint(value, key)
        elif key == b"mtime":
            mtime_ns = _pax_time(value, key)
        elif key == b"atime":
            atime_ns = _pax_time(value, key)
        elif key.startswith(b"SCHILY.xattr."):
            xname = key[13:]
            if not xname or b"\0" in xname:
                raise InvalidArchive("NUL byte or empty name in a PAX xattr record")
            xattrs[_decode(xname)] = value
        elif key.startswith(b"LIBARCHIVE.xattr."):
            xname, xvalue = _libarchive_xattr(key[17:], value)
            if not xname or b"\0" in xname:
                raise InvalidArchive("NUL byte or empty name in a PAX xattr record")
            libarchive[xname] = xvalue
        elif key.startswith(b"GNU.sparse."):
            raise InvalidArchive("sparse files are not supported", _decode(name))
    for xname, xvalue in libarchive.items():
        xattrs.setdefault(_decode(xname), xvalue)
    return name, linkname, size, uid, gid, mtime_ns, atime_ns, xattrs


def iter_entries(stream: BinaryIO, limits: Limits | None = None) -> Iterator[TarEntry]:
    """Yield the members of the tar ``stream`` in order, each one validated (see the module doc).

    The stream is read in large chunks; it need not be seekable. Each entry's data must be read
    (or is skipped) before the next entry is requested.
    """
    limits = limits or Limits()
    src = _Source(stream, limits.max_decompressed_bytes)
    max_header = limits.max_header_size
    max_entry = limits.max_entry_size
    max_entries = limits.max_entries
    max_path = limits.max_path_length
    count = 0
    pax: dict[bytes, bytes] | None = None
    long_name: bytes | None = None
    long_link: bytes | None = None
    entry: TarEntry | None = None
    kinds = _KINDS
    zero = _ZERO_BLOCK
    numeric = _NUMERIC_FIELDS
    ids = _ids
    ids_cache = _IDS_CACHE
    adler32 = zlib.adler32
    mode = uid = gid = size = mtime_ns = stored = 0
    while True:
        if entry is not None:
            # skip the unread data of the previous entry, and its padding (in the buffer, usually)
            gap = entry._remaining + (-entry.size % BLOCK_SIZE)
            if src.end - src.pos >= gap:
                src.pos += gap
            elif not src.skip(gap):
                raise CorruptStream("unexpected end of stream inside the data of", entry.name)
            entry._remaining = 0
            entry = None
        pos = src.pos
        if src.end - pos < BLOCK_SIZE:
            avail = src.fill(BLOCK_SIZE)
            if avail < BLOCK_SIZE:
                if avail:
                    raise CorruptStream("unexpected end of stream inside a tar header")
                if pax is not None or long_name is not None or long_link is not None:
                    raise CorruptStream("unexpected end of stream after an extended header")
                return
            pos = src.pos
        header = bytes(src.view[pos : pos + BLOCK_SIZE])
        src.pos = pos + BLOCK_SIZE
        if header == zero:
            avail = src.fill(BLOCK_SIZE)
            if avail >= BLOCK_SIZE and src.view[src.pos : src.pos + BLOCK_SIZE] != zero:
                raise CorruptStream("a lone zero block inside the archive")
            if 0 < avail < BLOCK_SIZE:
                raise CorruptStream("unexpected end of stream after a zero block")
            if pax is not None or long_name is not None or long_link is not None:
                raise CorruptStream("archive ends after an extended header")
            src.pos += min(avail, BLOCK_SIZE)
            return

        # Numeric fields: the common all-octal case parsed in one go (validated by the regex: no
        # sign, underscore or base prefix can reach int()); anything else by _number, strictly,
        # once the checksum has been verified.
        fast = False
        if numeric(header, 100, 156) is not None:
            try:
                stored = int(header[148:156].strip(b" \0") or b"0", 8)
                mode, uid, gid = ids_cache.get(header[100:124]) or ids(header[100:124])
                size = int(header[124:136].strip(b" \0") or b"0", 8)
                mtime_ns = int(header[136:148].strip(b" \0") or b"0", 8) * 1_000_000_000
                fast = True
            except ValueError:
                pass
        if not fast:
            try:
                stored = _number(header[148:156], "checksum")
            except InvalidArchive as exc:
                raise CorruptStream("malformed tar header checksum field") from exc
        # checksum: the byte sum with the field read as spaces (two exact 256-byte sums via
        # adler32, much faster than sum()); signed sums are accepted too, as in Go
        unsigned = (
            (adler32(header[:256]) & 0xFFFF) + (adler32(header[256:]) & 0xFFFF) + 254 - sum(header[148:156])
        )
        if stored != unsigned:
            signed = (
                unsigned
                - sum(256 for b in header if b & 0x80)
                + sum(256 for b in header[148:156] if b & 0x80)
            )
            if stored != signed:
                offset = src.consumed - (src.end - src.pos) - BLOCK_SIZE
                raise CorruptStream(f"tar header checksum mismatch at offset {offset}")
        if not fast:
            mode = _number(header[100:108], "mode") & 0o7777
            uid = _number(header[108:116], "uid")
            gid = _number(header[116:124], "gid")
            size = _number(header[124:136], "size")
            mtime_ns = _number(header[136:148], "mtime", signed=True) * 1_000_000_000
        typeflag = header[156:157]

        if typeflag in _META:
            if size > max_header:
                raise LimitExceeded(
                    f"extended tar header of {size} bytes is larger than the limit of {max_header}"
                )
            if src.fill(size) < size:
                raise CorruptStream("unexpected end of stream inside an extended header")
            data = bytes(src.view[src.pos : src.pos + size])
            src.pos += size
            if not src.skip(-size % BLOCK_SIZE):
                raise CorruptStream("unexpected end of stream inside an extended header")
            if typeflag == b"x":
                pax = _parse_pax(data)
            elif typeflag == b"g":
                _parse_pax(data)  # validated, then ignored: global records apply to nothing
            else:
                value = data.rstrip(b"\0")
                if b"\0" in value:
                    raise InvalidArchive(
                        "NUL byte inside a GNU long name", _decode(value.replace(b"\0", b"\\0"))
                    )
                if typeflag == b"L":
                    long_name = value
                else:
                    long_link = value
            continue

        kind = kinds.get(typeflag)
        if kind is None:
            if typeflag == b"S":
                raise InvalidArchive("sparse files are not supported", _decode(_cstring(header[0:100])))
            raise InvalidArchive(f"unhandled tar header type {typeflag!r}", _decode(_cstring(header[0:100])))

        if long_name is not None:
            name = long_name
        else:
            end = header.find(b"\0", 0, 100)
            name = header[:end] if end >= 0 else header[:100]
            if header[345] and header[257:263] == b"ustar\0":
                name = _cstring(header[345:500]) + b"/" + name
        if long_link is not None:
            linkname = long_link
        else:
            end = header.find(b"\0", 157, 257)
            linkname = header[157:end] if end >= 0 else header[157:257]
        atime_ns: int | None = None
        xattrs: dict[str, bytes]
        if pax is not None:
            name, linkname, size, uid, gid, mtime_ns, atime_ns, xattrs = _apply_pax(
                pax, name, linkname, size, uid, gid, mtime_ns
            )
        else:
            xattrs = {}
        pax = long_name = long_link = None

        if typeflag == b"\0" and name.endswith(b"/"):
            kind = EntryKind.DIR
        str_name = name.decode("utf-8", "surrogateescape")
        if uid > _UINT32_MAX or gid > _UINT32_MAX:
            raise InvalidArchive("uid or gid above 2**32-1", str_name)
        if not -_NS_LIMIT < mtime_ns < _NS_LIMIT:
            raise InvalidArchive("mtime out of range", str_name)
        if len(name) > max_path or len(linkname) > max_path:
            raise LimitExceeded(f"name longer than the limit of {max_path} bytes: {str_name[:200]!r}")
        devmajor = devminor = 0
        if kind is EntryKind.REG:
            if size > max_entry:
                raise LimitExceeded(
                    f"entry of {size} bytes is larger than the limit of {max_entry}: {str_name!r}"
                )
        else:
            size = 0
            if kind is EntryKind.CHAR or kind is EntryKind.BLOCK:
                devmajor = _number(header[329:337], "devmajor")
                devminor = _number(header[337:345], "devminor")
                if devmajor > _UINT32_MAX or devminor > _UINT32_MAX:
                    raise InvalidArchive("device number outside uint32", str_name)
        count += 1
        if count > max_entries:
            raise LimitExceeded(f"more than {max_entries} entries in the layer")
        entry = TarEntry(
            str_name,
            kind,
            mode,
            uid,
            gid,
            size,
            mtime_ns,
            atime_ns,
            linkname.decode("utf-8", "surrogateescape") if linkname else "",
            devmajor,
            devminor,
            xattrs,
            src,
        )
        yield entry
