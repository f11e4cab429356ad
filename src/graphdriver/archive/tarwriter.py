"""A deterministic tar writer: explicit header fields in, the same bytes out, always.

:class:`TarWriter` writes POSIX ustar headers and adds a PAX ``x`` record (keys sorted) only when a
field cannot be said in ustar:

- ``path`` / ``linkpath``: a name that does not fit the 100/155 ustar split (link names: 100), or
  that is not ASCII; a name that is not valid UTF-8 also gets ``hdrcharset=BINARY``;
- ``uid`` / ``gid`` / ``size``: values beyond the octal fields (2,097,151 and 8 GiB - 1);
- ``mtime``: a time with non-zero nanoseconds (``mtime=sec.nnnnnnnnn``) or outside the octal field;
- ``SCHILY.xattr.<name>``: every extended attribute given.

Nothing else is ever written: no user or group names, no atime or ctime, no GNU extensions, and
the archive ends with exactly two zero blocks (no padding to a 10240-byte record). PAX headers
are all named ``././@PaxHeader`` (as Python's tarfile names them), mode 0644, owner 0:0, mtime 0.

Output is kept as a list of pieces (headers, small files' data, padding) and written with one
``writev(2)`` per 256 KiB, so nothing is copied twice and a tree of small files costs few system
calls. Larger files (over 64 KiB) go from their descriptor to the output's with ``sendfile(2)``
when the output has a real file descriptor (a file, a pipe, a socket). A file that shrinks while
it is read is padded with zeros to the size announced in its header, and one that grows is cut,
so the archive stays valid.
"""

from __future__ import annotations

import enum
import errno
import io
import os
import stat
import zlib
from collections.abc import Mapping
from typing import BinaryIO

from graphdriver.errors import ArchiveError, InvalidArgument

__all__ = ["TarKind", "TarWriter"]

BLOCK = 512
_NUL = b"\0"
_ZERO_BLOCKS = bytes(2 * BLOCK)
_MAX_OCTAL_7 = 0o7777777
_MAX_OCTAL_11 = 0o77777777777
_MAGIC = b"ustar\x0000"
_SMALL_FILE = 64 << 10  # files up to this size are read into the buffer instead of sendfile
_FLUSH_AT = 256 << 10  # write pending output when it grows past this
_MAX_PARTS = 1000  # or when it has this many pieces (IOV_MAX is 1024)
_ZEROS = memoryview(bytes(BLOCK))  # padding: slices of one zero block
_CHUNK = 1 << 20  # read/write chunk when sendfile is not possible


class TarKind(bytes, enum.Enum):
    """Tar entry types; each member is its ustar typeflag byte."""

    REGULAR = b"0"
    HARDLINK = b"1"
    SYMLINK = b"2"
    CHAR = b"3"
    BLOCK = b"4"
    DIRECTORY = b"5"
    FIFO = b"6"


_NON_ASCII = bytes(range(0x80, 0x100)) + _NUL


def _ascii_field(b: bytes, width: int) -> bytes:
    """A best-effort ustar field for a value that is carried in a PAX record."""
    return b.translate(None, _NON_ASCII)[:width]


def _pax_record(key: bytes, value: bytes) -> bytes:
    """``"<len> <key>=<value>\\n"``, where len counts the whole record, its own digits included."""
    size = len(key) + len(value) + 3
    digits = len(str(size))
    if len(str(size + digits)) != digits:
        digits += 1
    return b"%d %s=%s\n" % (size + digits, key, value)


def _pax_mtime(mtime_ns: int) -> bytes:
    sign = b"-" if mtime_ns < 0 else b""
    sec, nsec = divmod(abs(mtime_ns), 1_000_000_000)
    if nsec:
        return b"%s%d.%09d" % (sign, sec, nsec)
    return b"%s%d" % (sign, sec)


_KIND_BY_FORMAT: dict[int, bytes] = {  # plain bytes: cheaper than enum members in the hot path
    stat.S_IFREG: TarKind.REGULAR.value,
    stat.S_IFDIR: TarKind.DIRECTORY.value,
    stat.S_IFLNK: TarKind.SYMLINK.value,
    stat.S_IFCHR: TarKind.CHAR.value,
    stat.S_IFBLK: TarKind.BLOCK.value,
    stat.S_IFIFO: TarKind.FIFO.value,
}


def _split_ustar(name: bytes) -> tuple[bytes, bytes] | None:
    """(prefix, name) for an ASCII name longer than 100 bytes that fits ustar, or None."""
    if len(name) > 256:
        return None
    # the rightmost '/' that leaves at most 155 bytes of prefix and a non-empty name part
    i = name.rfind(b"/", 0, min(156, len(name) - 1))
    if i <= 0 or len(name) - i - 1 > 100:
        return None
    return name[:i], name[i + 1 :]


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_ZERO_DEVS = b"0000000\0" * 2
_XNAME = b"././@PaxHeader"  # one name for every PAX header, as Python's tarfile writes
_XHEADERS: dict[int, bytes] = {}  # x headers by data size: they differ only in that
_TAIL = _MAGIC + bytes(64)  # magic, version, empty uname and gname: numeric ids only
_CHKSUM_BLANK = 8 * 0x20  # the checksum field counts as 8 spaces


def _byte_sum(b: bytes) -> int:
    """The sum of the bytes of an ASCII string shorter than 516 bytes, computed in C.

    The sum is then below Adler-32's modulus 65521, so the low half of Adler-32 is 1 + the sum.
    """
    return (zlib.adler32(b) & 0xFFFF) - 1


# Header fields that repeat from entry to entry, formatted once: (field bytes, byte sum).
_OWNER_FIELDS: dict[tuple[int, int, int], tuple[bytes, int]] = {}  # mode, uid, gid
_TIME_FIELDS: dict[int, tuple[bytes, int]] = {}  # mtime seconds
_PLAIN_TAILS: dict[bytes, tuple[bytes, int]] = {}  # typeflag, for no link name, prefix or device
_CACHE_LIMIT = 4096


def _owner_field(mode: int, uid: int, gid: int) -> tuple[bytes, int]:
    field = b"%07o\0%07o\0%07o\0" % (mode, uid, gid)
    if len(_OWNER_FIELDS) >= _CACHE_LIMIT:
        _OWNER_FIELDS.clear()
    _OWNER_FIELDS[mode, uid, gid] = found = (field, _byte_sum(field))
    return found


def _time_field(mtime: int) -> tuple[bytes, int]:
    field = b"%011o\0" % mtime
    if len(_TIME_FIELDS) >= _CACHE_LIMIT:
        _TIME_FIELDS.clear()
    _TIME_FIELDS[mtime] = found = (field, _byte_sum(field))
    return found


def _tail(kind: bytes, link_f: bytes, prefix_f: bytes, devs: bytes) -> tuple[bytes, int]:
    """Typeflag to the end of the header (linkname, magic, empty user/group names, devices,
    prefix, padding)."""
    tail = b"".join((kind, link_f.ljust(100, _NUL), _TAIL, devs, prefix_f.ljust(167, _NUL)))
    return tail, _byte_sum(tail)


def _ustar(  # noqa: PLR0917 - the hot path: positional arguments are the cheapest call
    name_f: bytes,
    kind: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    link_f: bytes,
    prefix_f: bytes,
    devs: bytes,
) -> bytes:
    """One 512-byte ustar header; every field must already fit, and be ASCII.

    The checksum is the byte sum of the header with the checksum field as 8 spaces, added up
    from the sums of its fields.
    """
    owner = _OWNER_FIELDS.get((mode, uid, gid)) or _owner_field(mode, uid, gid)
    when = _TIME_FIELDS.get(mtime) or _time_field(mtime)
    size_f = b"%011o\0" % size
    if link_f or prefix_f or devs is not _ZERO_DEVS:
        tail = _tail(kind, link_f, prefix_f, devs)
    else:
        tail = _PLAIN_TAILS.get(kind) or _PLAIN_TAILS.setdefault(kind, _tail(kind, b"", b"", devs))
    chksum = _byte_sum(name_f) + owner[1] + _byte_sum(size_f) + when[1] + _CHKSUM_BLANK + tail[1]
    return b"".join((name_f.ljust(100, _NUL), owner[0], size_f, when[0], b"%06o\0 " % chksum, tail[0]))


_MTIME_XHEADER = _ustar(_XNAME, b"x", 0o644, 0, 0, 30, 0, b"", b"", _ZERO_DEVS)
_MTIME_PAD = _ZEROS[30:]


def _writev_all(fd: int, parts: list[bytes | memoryview]) -> None:
    """Write every piece, in order, resuming after short writes (pipes, signals)."""
    i = 0
    while i < len(parts):
        batch = parts[i : i + _MAX_PARTS]
        n = os.writev(fd, batch)
        for piece in batch:
            if n >= len(piece):
                n -= len(piece)
                i += 1
                continue
            parts[i] = memoryview(piece)[n:]  # the rest of a piece written in part
            break


class TarWriter:
    """Write a tar stream entry by entry to ``out``; :meth:`close` ends the archive.

    ``out`` is written through its file descriptor when it has one (after flushing whatever the
    caller buffered in it), otherwise through ``out.write``. The writer never seeks and never
    closes ``out``. :attr:`bytes_written` counts every byte written, including the end blocks.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._fd: int | None
        try:
            fd = out.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            fd = -1
        if fd >= 0:
            out.flush()
            self._fd = fd
        else:
            self._fd = None
        self._sendfile_ok = self._fd is not None
        # pending output: a list of pieces, written with one writev(2) per flush, never concatenated
        self._parts: list[bytes | memoryview] = []
        self._pending = 0
        self._written = 0
        self._closed = False

    @property
    def bytes_written(self) -> int:
        """Bytes of archive produced so far (buffered bytes included)."""
        return self._written + self._pending

    # -- output -------------------------------------------------------------------------------

    def _put(self, *pieces: bytes | memoryview) -> None:
        for piece in pieces:
            self._parts.append(piece)
            self._pending += len(piece)

    def _flush_buf(self) -> None:
        parts = self._parts
        if not parts:
            return
        if self._fd is None:
            data = memoryview(b"".join(parts))
            while data:
                n = self._out.write(data)
                if n is None:
                    raise ArchiveError("the tar output would block: give a blocking stream")
                data = data[n:]
        else:
            _writev_all(self._fd, parts)
        self._written += self._pending
        self._parts = []
        self._pending = 0

    # -- headers ------------------------------------------------------------------------------

    def _pax_header(self, records: list[tuple[bytes, bytes]]) -> None:
        """Buffer an ``x`` header with ``records`` (sorted here) and its padded data."""
        records.sort()
        data = b"".join([_pax_record(k, v) for k, v in records])
        size = len(data)
        xheader = _XHEADERS.get(size) or self._xheader(size)
        self._put(xheader, data, _ZEROS[: -size % BLOCK])

    @staticmethod
    def _xheader(size: int) -> bytes:
        xheader = _ustar(_XNAME, b"x", 0o644, 0, 0, size, 0, b"", b"", _ZERO_DEVS)
        if size < 4096:
            _XHEADERS[size] = xheader
        return xheader

    def _header(  # noqa: PLR0917 - called per entry: positional arguments are the cheapest call
        self,
        name: bytes,
        kind: bytes,
        mode: int,
        uid: int,
        gid: int,
        size: int,
        mtime_ns: int,
        linkname: bytes,
        devmajor: int,
        devminor: int,
        xattrs: Mapping[str, bytes] | Mapping[bytes, bytes] | None,
    ) -> None:
        sec, nsec = divmod(mtime_ns, 1_000_000_000)
        if (
            len(name) <= 100
            and len(linkname) <= 100
            and uid <= _MAX_OCTAL_7
            and gid <= _MAX_OCTAL_7
            and size <= _MAX_OCTAL_11
            and 0 <= sec <= _MAX_OCTAL_11
            and not devmajor
            and not devminor
            and not xattrs
            and name.isascii()
            and linkname.isascii()
            and uid >= 0
            and gid >= 0
        ):
            # the common case: at most the nanoseconds of mtime need a PAX record
            parts = self._parts
            if nsec and 1_000_000_000 <= sec < 10_000_000_000:  # 2001-2286: a 30-byte record
                parts.append(_MTIME_XHEADER)
                parts.append(b"30 mtime=%d.%09d\n" % (sec, nsec))
                parts.append(_MTIME_PAD)
                self._pending += 2 * BLOCK
            elif nsec:
                self._pax_header([(b"mtime", _pax_mtime(mtime_ns))])
            parts.append(_ustar(name, kind, mode & 0o7777, uid, gid, size, sec, linkname, b"", _ZERO_DEVS))
            self._pending += BLOCK
            return

        pax: list[tuple[bytes, bytes]] = []
        binary = False
        prefix_f = b""
        if len(name) <= 100 and name.isascii():
            name_f = name
        else:
            split = _split_ustar(name) if name.isascii() else None
            if split is None:
                pax.append((b"path", name))
                binary = not _valid_utf8(name)
                name_f = _ascii_field(name, 100)
            else:
                prefix_f, name_f = split
        if len(linkname) <= 100 and linkname.isascii():
            link_f = linkname
        else:
            pax.append((b"linkpath", linkname))
            binary = binary or not _valid_utf8(linkname)
            link_f = _ascii_field(linkname, 100)
        if not 0 <= uid <= _MAX_OCTAL_7:
            pax.append((b"uid", b"%d" % uid))
            uid = 0
        if not 0 <= gid <= _MAX_OCTAL_7:
            pax.append((b"gid", b"%d" % gid))
            gid = 0
        if size > _MAX_OCTAL_11:
            pax.append((b"size", b"%d" % size))
            size = 0
        if nsec or not 0 <= sec <= _MAX_OCTAL_11:
            pax.append((b"mtime", _pax_mtime(mtime_ns)))
            if not 0 <= sec <= _MAX_OCTAL_11:
                sec = 0
        if devmajor or devminor:
            if not (0 <= devmajor <= _MAX_OCTAL_7 and 0 <= devminor <= _MAX_OCTAL_7):
                raise ArchiveError(f"device number {devmajor}:{devminor} does not fit a tar header: {name!r}")
            devs = b"%07o\0%07o\0" % (devmajor, devminor)
        else:
            devs = _ZERO_DEVS
        if xattrs:
            for key, value in xattrs.items():
                kb = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key
                pax.append((b"SCHILY.xattr." + kb, value))
                binary = binary or (not kb.isascii() and not _valid_utf8(kb))
        if pax:
            if binary:
                pax.append((b"hdrcharset", b"BINARY"))
            self._pax_header(pax)
        self._put(_ustar(name_f, kind, mode & 0o7777, uid, gid, size, sec, link_f, prefix_f, devs))

    # -- entries ------------------------------------------------------------------------------

    def add(
        self,
        name: str | bytes,
        kind: TarKind,
        *,
        mode: int = 0,
        uid: int = 0,
        gid: int = 0,
        size: int = 0,
        mtime_ns: int = 0,
        linkname: str | bytes = b"",
        devmajor: int = 0,
        devminor: int = 0,
        xattrs: Mapping[str, bytes] | Mapping[bytes, bytes] | None = None,
        data_fd: int | None = None,
        data: bytes | None = None,
    ) -> None:
        """Append one entry.

        Args:
            name: the member name as stored (``etc/passwd``, ``etc/`` for a directory, ``./``);
                ``str`` names are encoded with :func:`os.fsencode`.
            kind: the entry type.
            mode: permission bits including setuid/setgid/sticky (type bits are dropped).
            uid, gid: numeric owner.
            size: data size; only regular files carry data, every other kind must pass 0.
            mtime_ns: modification time in nanoseconds since the epoch.
            linkname: symlink target or hard-link target member name.
            devmajor, devminor: device numbers of char and block devices.
            xattrs: extended attributes, written as ``SCHILY.xattr.<name>`` PAX records.
            data_fd: a file descriptor to read ``size`` bytes of data from, from offset 0.
            data: the data itself, for small synthetic entries (exactly ``size`` bytes).

        Raises:
            InvalidArgument: inconsistent fields (data for a non-regular entry, size mismatch).
        """
        if self._closed:
            raise InvalidArgument("tar writer is closed")
        if size or data:
            if kind is not TarKind.REGULAR or size < 0:
                raise InvalidArgument(f"only regular tar entries carry data: {name!r}")
            if data is not None:
                if len(data) != size:
                    raise InvalidArgument(f"data of {len(data)} bytes for tar entry {name!r} of size {size}")
            elif data_fd is None:
                raise InvalidArgument(f"no data given for tar entry {name!r} of size {size}")
        name_b = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
        link_b = linkname.encode("utf-8", "surrogateescape") if isinstance(linkname, str) else linkname
        if _NUL in name_b or _NUL in link_b:
            raise InvalidArgument(f"NUL byte in tar entry name or link name: {name!r}")
        self._header(name_b, kind.value, mode, uid, gid, size, mtime_ns, link_b, devmajor, devminor, xattrs)
        if size:
            if data is not None:
                self._put(data)
            else:
                assert data_fd is not None
                self._copy_data(data_fd, size)
            pad = -size % BLOCK
            if pad:
                self._put(_ZEROS[:pad])
        if self._pending >= _FLUSH_AT or len(self._parts) >= _MAX_PARTS:
            self._flush_buf()

    def add_stat(
        self,
        name: str | bytes,
        st: os.stat_result,
        *,
        linkname: str | bytes = b"",
        xattrs: Mapping[str, bytes] | Mapping[bytes, bytes] | None = None,
        data_fd: int | None = None,
    ) -> None:
        """Append the entry an ``lstat``/``fstat`` result describes.

        The kind, mode, owner, mtime (ns) and, for devices, the major and minor numbers come from
        ``st``; a regular file's data (``st_size`` bytes) is read from ``data_fd``. A symlink
        needs ``linkname``. For sockets (no tar form) :class:`InvalidArgument` is raised.
        """
        kind = _KIND_BY_FORMAT.get(stat.S_IFMT(st.st_mode))
        if kind is None:
            raise InvalidArgument(f"no tar entry type for mode {st.st_mode:o}: {name!r}")
        if kind == b"0":
            size = st.st_size
            if size and data_fd is None:
                raise InvalidArgument(f"no data given for tar entry {name!r} of size {size}")
            devmajor = devminor = 0
        elif kind in (b"3", b"4"):
            size = 0
            devmajor, devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        else:
            size = devmajor = devminor = 0
        if self._closed:
            raise InvalidArgument("tar writer is closed")
        name_b = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
        link_b = linkname.encode("utf-8", "surrogateescape") if isinstance(linkname, str) else linkname
        if _NUL in name_b or _NUL in link_b:
            raise InvalidArgument(f"NUL byte in tar entry name or link name: {name!r}")
        self._header(
            name_b,
            kind,
            st.st_mode,
            st.st_uid,
            st.st_gid,
            size,
            st.st_mtime_ns,
            link_b,
            devmajor,
            devminor,
            xattrs,
        )
        if size:
            assert data_fd is not None
            pad = -size % BLOCK
            if size <= _SMALL_FILE:
                # the common case, inline: one read, kept as a piece of the next writev
                chunk = os.pread(data_fd, size, 0)
                self._parts.append(chunk)
                self._pending += len(chunk)
                if len(chunk) < size:
                    self._put(bytes(size - len(chunk)))  # the file shrank under us
            else:
                self._copy_data(data_fd, size)
            if pad:
                self._parts.append(_ZEROS[:pad])
                self._pending += pad
        if self._pending >= _FLUSH_AT or len(self._parts) >= _MAX_PARTS:
            self._flush_buf()

    def _copy_data(self, fd: int, size: int) -> None:
        if size <= _SMALL_FILE or not self._sendfile_ok:
            done = 0
            while done < size:
                chunk = os.pread(fd, min(size - done, _CHUNK), done)
                if not chunk:
                    break
                done += len(chunk)
                self._put(chunk)
                if self._pending >= _CHUNK:
                    self._flush_buf()
        else:
            self._flush_buf()
            done = self._sendfile(fd, size)
            if done < 0:  # this output or input cannot sendfile: fall back for the whole run
                self._sendfile_ok = False
                self._copy_data(fd, size)
                return
        if done < size:
            # the file shrank under us: keep the archive valid by padding to the announced size
            self._put(bytes(size - done))

    def _sendfile(self, fd: int, size: int) -> int:
        """Send ``size`` bytes of ``fd`` to the output; the count sent (short at EOF), or -1."""
        out_fd = self._fd
        assert out_fd is not None
        done = 0
        while done < size:
            try:
                n = os.sendfile(out_fd, fd, done, min(size - done, 1 << 30))
            except OSError as exc:
                if done == 0 and exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    return -1
                raise
            if n == 0:
                break
            done += n
            self._written += n
        return done

    def close(self) -> int:
        """Write the two zero end blocks and flush; return the total bytes written."""
        if not self._closed:
            self._put(_ZERO_BLOCKS)
            self._flush_buf()
            if self._fd is None:
                self._out.flush()
            self._closed = True
        return self._written
