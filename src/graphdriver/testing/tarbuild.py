"""Build raw tar bytes for tests, including malformed ones.

:class:`TarBuilder` writes members one by one and returns the bytes; nothing touches the
filesystem, so hostile archives (names with ``..``, links out of the root, bad checksums, huge PAX
headers, truncated data) are as easy to write as good ones::

    from graphdriver.testing.tarbuild import TarBuilder

    tar = (
        TarBuilder()
        .dir("etc", mode=0o755)
        .file("etc/hostname", b"box\\n", mode=0o644, uid=0, gid=0, mtime_ns=1_700_000_000_123_456_789)
        .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
        .hardlink("etc/hostname2", "etc/hostname")
        .whiteout("etc/motd")          # etc/.wh.motd
        .opaque("var/cache")           # var/cache/.wh..wh..opq
        .build()                       # bytes, with the two zero end blocks
    )

Every member method takes the common keywords ``mode``, ``uid``, ``gid``, ``mtime`` (whole
seconds), ``mtime_ns`` (written as a PAX ``mtime`` record when it has a fraction), ``atime_ns``
(PAX), ``xattrs`` (``SCHILY.xattr.*`` PAX records), ``pax`` (extra PAX records, written verbatim, in
order) and ``raw`` (header field overrides, see :class:`Header`: e.g. ``raw={"chksum": 1}`` for a
bad checksum, ``raw={"size": -1}`` for a negative base-256 size, ``raw={"devmajor": 2**32}``).
Numbers that do not fit their octal field are written in base-256 (GNU), negative ones too.

Names longer than 100 bytes are written with a PAX ``path`` record (``longnames="pax"``, the
default) or a GNU ``L`` header (``longnames="gnu"``). Lower-level pieces are public too:
:func:`encode_header`, :func:`pax_record`, :meth:`TarBuilder.pax_header` (a bare ``x`` header with
arbitrary, possibly malformed, content), :meth:`TarBuilder.gnu_long`, :meth:`TarBuilder.raw`.
:func:`compress` compresses the result (gzip, zstd, bzip2, xz).

To check what an apply produced, :func:`describe_tree` returns one line per path (type, mode,
owner, nanosecond mtime, content or link target or device numbers, link count, xattrs), so a test
can compare a whole tree with ``==`` and read the difference.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Literal

__all__ = [
    "Header",
    "TarBuilder",
    "compress",
    "describe_tree",
    "encode_header",
    "pax_record",
    "realpath_limit_attack",
]

BLOCK_SIZE = 512

Number = int | bytes


@dataclass
class Header:
    """The fields of one 512-byte ustar header. Ints are encoded; bytes are written verbatim.

    ``chksum=None`` computes the right checksum. ``magic``/``version`` default to POSIX ustar
    (``b"ustar\\0"``, ``b"00"``); GNU headers use ``b"ustar "`` and ``b" \\0"``.
    """

    name: bytes = b""
    mode: Number = 0o644
    uid: Number = 0
    gid: Number = 0
    size: Number = 0
    mtime: Number = 0
    chksum: Number | None = None
    typeflag: bytes = b"0"
    linkname: bytes = b""
    magic: bytes = b"ustar\0"
    version: bytes = b"00"
    uname: bytes = b""
    gname: bytes = b""
    devmajor: Number = 0
    devminor: Number = 0
    prefix: bytes = b""


_LAYOUT = (
    ("name", 0, 100),
    ("mode", 100, 8),
    ("uid", 108, 8),
    ("gid", 116, 8),
    ("size", 124, 12),
    ("mtime", 136, 12),
    ("chksum", 148, 8),
    ("typeflag", 156, 1),
    ("linkname", 157, 100),
    ("magic", 257, 6),
    ("version", 263, 2),
    ("uname", 265, 32),
    ("gname", 297, 32),
    ("devmajor", 329, 8),
    ("devminor", 337, 8),
    ("prefix", 345, 155),
)


def encode_number(value: int, width: int) -> bytes:
    """Octal with a NUL terminator when it fits, else GNU base-256 (two's complement if negative)."""
    if 0 <= value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    if value < 0:
        raw = (value + (1 << (8 * width))).to_bytes(width, "big")
        return bytes([raw[0] | 0xC0]) + raw[1:]
    if value >= 1 << (8 * width - 1):
        raise ValueError(f"{value} does not fit a {width}-byte field")
    return bytes([0x80]) + value.to_bytes(width - 1, "big")


def _field(value: Number, width: int) -> bytes:
    raw = encode_number(value, width) if isinstance(value, int) else value
    if len(raw) > width:
        raise ValueError(f"field value {raw!r} longer than {width} bytes")
    return raw.ljust(width, b"\0")


def encode_header(h: Header) -> bytes:
    """The 512-byte block for ``h``; the checksum is computed unless ``h.chksum`` is set."""
    block = bytearray(BLOCK_SIZE)
    for name, offset, width in _LAYOUT:
        if name == "chksum":
            block[offset : offset + width] = b" " * width
            continue
        block[offset : offset + width] = _field(getattr(h, name), width)
    if h.chksum is None:
        block[148:156] = b"%06o\0 " % sum(block)
    else:
        block[148:156] = _field(h.chksum, 8)
    return bytes(block)


def pax_record(key: bytes | str, value: bytes | str) -> bytes:
    """One ``"%d key=value\\n"`` PAX record with the right length prefix."""
    k = key.encode() if isinstance(key, str) else key
    v = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    body = b" " + k + b"=" + v + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK_SIZE)


def _b(s: str | bytes) -> bytes:
    return s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s


class TarBuilder:
    """Accumulates tar members; :meth:`build` returns the archive bytes. Methods chain."""

    def __init__(self, *, longnames: Literal["pax", "gnu"] = "pax") -> None:
        self._out = io.BytesIO()
        self.longnames = longnames

    # -- low level -----------------------------------------------------------------------

    def raw(self, data: bytes) -> TarBuilder:
        """Append bytes verbatim (no padding)."""
        self._out.write(data)
        return self

    def header(self, h: Header, data: bytes = b"", *, pad: bool = True) -> TarBuilder:
        """Append one header block and its data (padded to a block unless ``pad=False``)."""
        self._out.write(encode_header(h))
        self._out.write(_pad(data) if pad else data)
        return self

    def pax_header(
        self,
        records: Mapping[str | bytes, str | bytes] | Iterable[tuple[str | bytes, str | bytes]] | None = None,
        *,
        data: bytes | None = None,
        typeflag: bytes = b"x",
        size: int | None = None,
        name: bytes = b"PaxHeaders/entry",
    ) -> TarBuilder:
        """Append an ``x`` (or ``g``) header with ``records``, or with raw ``data`` if given.

        ``size`` overrides the size field (e.g. to claim a huge header).
        """
        if data is None:
            items = records.items() if isinstance(records, Mapping) else (records or [])
            data = b"".join(pax_record(k, v) for k, v in items)
        h = Header(name=name, typeflag=typeflag, size=len(data) if size is None else size, mode=0o644)
        return self.header(h, data)

    def global_header(
        self, records: Mapping[str | bytes, str | bytes], *, name: bytes = b"pax_global_header"
    ) -> TarBuilder:
        """Append a PAX global (``g``) header."""
        return self.pax_header(records, typeflag=b"g", name=name)

    def gnu_long(
        self, value: str | bytes, *, kind: Literal["L", "K"] = "L", size: int | None = None
    ) -> TarBuilder:
        """Append a GNU ``L`` (long name) or ``K`` (long link name) header; NUL is appended."""
        data = _b(value) + b"\0"
        h = Header(
            name=b"././@LongLink",
            typeflag=kind.encode(),
            size=len(data) if size is None else size,
            magic=b"ustar ",
            version=b" \0",
            mode=0o644,
        )
        return self.header(h, data)

    def end(self, blocks: int = 2) -> TarBuilder:
        """Append ``blocks`` zero blocks (the end-of-archive marker is two)."""
        self._out.write(bytes(BLOCK_SIZE * blocks))
        return self

    def build(self, *, end: bool = True) -> bytes:
        """The archive bytes, with the end marker unless ``end=False``. The builder stays usable."""
        data = self._out.getvalue()
        return data + bytes(2 * BLOCK_SIZE) if end else data

    def __len__(self) -> int:
        return self._out.tell()

    # -- members -------------------------------------------------------------------------

    def entry(
        self,
        name: str | bytes,
        typeflag: bytes,
        data: bytes = b"",
        *,
        linkname: str | bytes = b"",
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime: int = 0,
        mtime_ns: int | None = None,
        atime_ns: int | None = None,
        devmajor: int = 0,
        devminor: int = 0,
        xattrs: Mapping[str, bytes] | None = None,
        pax: Mapping[str | bytes, str | bytes] | None = None,
        raw: Mapping[str, Number] | None = None,
        pad: bool = True,
    ) -> TarBuilder:
        """Append any member (the typed methods below call this)."""
        bname = _b(name)
        blink = _b(linkname)
        records: list[tuple[bytes | str, bytes | str]] = []
        if mtime_ns is not None:
            mtime = mtime_ns // 1_000_000_000
            if mtime_ns % 1_000_000_000:
                secs, frac = divmod(mtime_ns, 1_000_000_000)
                records.append(("mtime", f"{secs}.{frac:09d}"))
        if atime_ns is not None:
            secs, frac = divmod(atime_ns, 1_000_000_000)
            records.append(("atime", f"{secs}.{frac:09d}"))
        for key, value in (xattrs or {}).items():
            records.append(("SCHILY.xattr." + key, value))
        header_name = bname
        header_link = blink
        if len(bname) > 100:
            if self.longnames == "gnu":
                self.gnu_long(bname)
            else:
                records.append(("path", bname))
            header_name = bname[:100]
        if len(blink) > 100:
            if self.longnames == "gnu":
                self.gnu_long(blink, kind="K")
            else:
                records.append(("linkpath", blink))
            header_link = blink[:100]
        records.extend((pax or {}).items())
        if records:
            self.pax_header(records)
        h = Header(
            name=header_name,
            typeflag=typeflag,
            linkname=header_link,
            mode=mode,
            uid=uid,
            gid=gid,
            mtime=mtime,
            size=len(data),
            devmajor=devmajor,
            devminor=devminor,
        )
        if self.longnames == "gnu":
            h.magic, h.version = b"ustar ", b" \0"
        if raw:
            known = {f.name for f in fields(Header)}
            unknown = set(raw) - known
            if unknown:
                raise ValueError(f"unknown header fields {sorted(unknown)}")
            h = replace(h, **raw)  # type: ignore[arg-type]
        return self.header(h, data, pad=pad)

    def file(self, name: str | bytes, data: bytes = b"", **kw: object) -> TarBuilder:
        """A regular file (type ``0``)."""
        return self.entry(name, b"0", data, **kw)  # type: ignore[arg-type]

    def dir(self, name: str | bytes, **kw: object) -> TarBuilder:
        """A directory (type ``5``); a trailing ``/`` is added. Default mode 0755."""
        kw.setdefault("mode", 0o755)
        bname = _b(name)
        if not bname.endswith(b"/"):
            bname += b"/"
        return self.entry(bname, b"5", **kw)  # type: ignore[arg-type]

    def symlink(self, name: str | bytes, target: str | bytes, **kw: object) -> TarBuilder:
        """A symlink (type ``2``) to ``target``, verbatim. Default mode 0777."""
        kw.setdefault("mode", 0o777)
        return self.entry(name, b"2", linkname=target, **kw)  # type: ignore[arg-type]

    def hardlink(self, name: str | bytes, target: str | bytes, **kw: object) -> TarBuilder:
        """A hard link (type ``1``) to the earlier member ``target``."""
        return self.entry(name, b"1", linkname=target, **kw)  # type: ignore[arg-type]

    def char(self, name: str | bytes, major: int, minor: int, **kw: object) -> TarBuilder:
        """A character device (type ``3``)."""
        return self.entry(name, b"3", devmajor=major, devminor=minor, **kw)  # type: ignore[arg-type]

    def block(self, name: str | bytes, major: int, minor: int, **kw: object) -> TarBuilder:
        """A block device (type ``4``)."""
        return self.entry(name, b"4", devmajor=major, devminor=minor, **kw)  # type: ignore[arg-type]

    def fifo(self, name: str | bytes, **kw: object) -> TarBuilder:
        """A FIFO (type ``6``)."""
        return self.entry(name, b"6", **kw)  # type: ignore[arg-type]

    def whiteout(self, path: str, **kw: object) -> TarBuilder:
        """An OCI whiteout for ``path``: an empty file ``dirname/.wh.basename``."""
        head, _, base = path.rstrip("/").rpartition("/")
        kw.setdefault("mode", 0)
        return self.file(f"{head}/.wh.{base}" if head else f".wh.{base}", b"", **kw)

    def opaque(self, dirpath: str, **kw: object) -> TarBuilder:
        """An opaque-directory marker ``dirpath/.wh..wh..opq`` (``""`` for the root)."""
        d = dirpath.strip("/")
        kw.setdefault("mode", 0)
        return self.file(f"{d}/.wh..wh..opq" if d else ".wh..wh..opq", b"", **kw)


def compress(data: bytes, kind: Literal["none", "gzip", "zstd", "bzip2", "xz"]) -> bytes:
    """``data`` compressed as ``kind`` (gzip with mtime 0, so the bytes are reproducible)."""
    if kind == "none":
        return data
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        import zstandard

        return bytes(zstandard.ZstdCompressor(write_checksum=True).compress(data))
    if kind == "bzip2":
        return bz2.compress(data)
    if kind == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ)
    raise ValueError(f"unknown compression {kind!r}")


def _describe(path: str, st: os.stat_result, *, mtime: bool, xattrs: bool) -> str:
    mode = stat.S_IMODE(st.st_mode)
    owner = f"{st.st_uid}:{st.st_gid}"
    when = f" m={st.st_mtime_ns}" if mtime else ""
    fmt = stat.S_IFMT(st.st_mode)
    if fmt == stat.S_IFLNK:
        text = f"symlink {owner}{when} -> {os.readlink(path)}"
    elif fmt == stat.S_IFDIR:
        text = f"dir {mode:04o} {owner}{when}"
    elif fmt == stat.S_IFREG:
        with open(path, "rb") as f:
            data = f.read()
        text = f"file {mode:04o} {owner}{when} {data!r}"
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        kind = "char" if fmt == stat.S_IFCHR else "block"
        text = f"{kind} {mode:04o} {owner}{when} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    elif fmt == stat.S_IFIFO:
        text = f"fifo {mode:04o} {owner}{when}"
    else:
        text = f"other {fmt:o} {mode:04o} {owner}{when}"
    if fmt != stat.S_IFDIR and st.st_nlink > 1:
        text += f" links={st.st_nlink}"
    if xattrs:
        try:
            names = sorted(os.listxattr(path, follow_symlinks=False))
        except OSError:
            names = []
        if names:
            values = ", ".join(f"{n}={os.getxattr(path, n, follow_symlinks=False)!r}" for n in names)
            text += f" xattrs[{values}]"
    return text


def describe_tree(
    root: str | os.PathLike[str], *, mtime: bool = True, xattrs: bool = True, include_root: bool = False
) -> dict[str, str]:
    """``{relative path: description}`` for everything below ``root`` (symlinks not followed).

    Descriptions look like ``"file 0644 0:0 m=1700000000123456789 b'data'"``,
    ``"dir 0755 0:0 m=..."``, ``"symlink 0:0 m=... -> target"``, ``"char 0666 0:0 m=... 1:3"``,
    ``"fifo 0600 0:0 m=..."``, with `` links=N`` for shared inodes and `` xattrs[name=b'v', ...]``.
    ``mtime=False`` leaves the times out; ``include_root`` adds the root itself as ``"."``.
    """
    base = os.fspath(root)
    out: dict[str, str] = {}
    if include_root:
        out["."] = _describe(base, os.lstat(base), mtime=mtime, xattrs=xattrs)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, base)
            out[rel] = _describe(full, os.lstat(full), mtime=mtime, xattrs=xattrs)
    return dict(sorted(out.items()))


def realpath_limit_attack(path_max: int, root_len: int) -> bytes:
    """CPython's test_realpath_limit_attack (CVE-2025-4517), sized for a layer root whose path
    is ``root_len`` bytes on a filesystem with ``path_max`` (``PC_PATH_MAX``): a chain of
    symlinks whose resolved length passes PATH_MAX, through which ``escape`` points two levels
    above the root, then a hard link and files aimed at ``escape/victim/hello``."""
    steps = "abcdefghijklmnop"
    component = "d" * ((path_max - root_len - 1) // (len(steps) + 1))
    b = TarBuilder()
    path = ""
    for step in steps:
        b.dir(os.path.join(path, component), mode=0o777)
        b.symlink(os.path.join(path, step), component)
        path = os.path.join(path, component)
    linkpath = os.path.join(*steps, "l" * 254)
    b.symlink(linkpath, os.path.join(*[".."] * len(steps)))
    b.symlink("escape", os.path.join(linkpath, ".."))
    b.hardlink("flaglink", "escape/victim/hello")
    b.file("flaglink", b"overwrite")
    b.file("escape/newfile", b"new")
    return b.build()
