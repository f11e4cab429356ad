"""The strict tar reader: formats, field decoding, data access, and every malformed-header error."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphdriver.archive.tarformat import EntryKind, TarEntry, iter_entries
from graphdriver.archive.types import Limits
from graphdriver.errors import CorruptStream, InvalidArchive, LimitExceeded
from graphdriver.testing.tarbuild import Header, TarBuilder, encode_header, pax_record


def entries(data: bytes, limits: Limits | None = None) -> list[tuple[TarEntry, bytes]]:
    out = []
    for entry in iter_entries(io.BytesIO(data), limits):
        out.append((entry, entry.read()))
    return out


class OneByteReader(io.RawIOBase):
    """Returns at most one byte per read: exercises every buffer boundary."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        chunk = self._data.read(1)
        b[: len(chunk)] = chunk
        return len(chunk)


def test_every_kind_and_field() -> None:
    tar = (
        TarBuilder()
        .dir("etc", mode=0o755, uid=0, gid=0, mtime=1000)
        .file(
            "etc/passwd", b"root:x:0:0\n", mode=0o4755, uid=1000, gid=2000, mtime_ns=1_700_000_000_123_456_789
        )
        .symlink("etc/localtime", "/usr/share/zoneinfo/UTC", uid=5, gid=6)
        .hardlink("etc/passwd2", "etc/passwd")
        .char("dev/null", 1, 3, mode=0o666)
        .block("dev/loop0", 7, 0, mode=0o660, gid=6)
        .fifo("run/fifo", mode=0o600)
        .file(
            "x",
            b"",
            atime_ns=5_000_000_001,
            xattrs={"user.a": b"1", "security.capability": b"\x01\x00\x00\x02"},
        )
        .build()
    )
    got = [
        (
            e.name,
            e.kind,
            e.mode,
            e.uid,
            e.gid,
            e.size,
            e.mtime_ns,
            e.atime_ns,
            e.linkname,
            e.devmajor,
            e.devminor,
            data,
        )
        for e, data in entries(tar)
    ]
    assert got == [
        ("etc/", EntryKind.DIR, 0o755, 0, 0, 0, 1000 * 10**9, None, "", 0, 0, b""),
        (
            "etc/passwd",
            EntryKind.REG,
            0o4755,
            1000,
            2000,
            11,
            1_700_000_000_123_456_789,
            None,
            "",
            0,
            0,
            b"root:x:0:0\n",
        ),
        ("etc/localtime", EntryKind.SYMLINK, 0o777, 5, 6, 0, 0, None, "/usr/share/zoneinfo/UTC", 0, 0, b""),
        ("etc/passwd2", EntryKind.HARDLINK, 0o644, 0, 0, 0, 0, None, "etc/passwd", 0, 0, b""),
        ("dev/null", EntryKind.CHAR, 0o666, 0, 0, 0, 0, None, "", 1, 3, b""),
        ("dev/loop0", EntryKind.BLOCK, 0o660, 0, 6, 0, 0, None, "", 7, 0, b""),
        ("run/fifo", EntryKind.FIFO, 0o600, 0, 0, 0, 0, None, "", 0, 0, b""),
        ("x", EntryKind.REG, 0o644, 0, 0, 0, 0, 5_000_000_001, "", 0, 0, b""),
    ]
    last = entries(tar)[-1][0]
    assert last.xattrs == {"user.a": b"1", "security.capability": b"\x01\x00\x00\x02"}


def test_gnu_long_names_and_base256_numbers() -> None:
    long_name = "d/" + "n" * 250 + "/file"
    long_link = "t" * 300
    tar = (
        TarBuilder(longnames="gnu")
        .file(long_name, b"data", uid=2**31, gid=2**32 - 1)
        .symlink("s", long_link)
        .file("big-mtime", b"", mtime=8**11 + 5)  # does not fit 11 octal digits: base-256
        .build()
    )
    (a, da), (b, _), (c, _) = entries(tar)
    assert (a.name, a.uid, a.gid, da) == (long_name, 2**31, 2**32 - 1, b"data")
    assert (b.name, b.linkname) == ("s", long_link)
    assert c.mtime_ns == (8**11 + 5) * 10**9


def test_pax_records_override_header_fields() -> None:
    tar = (
        TarBuilder()
        .file(
            "short",
            b"12345",
            pax={"path": "p/" + "x" * 200, "uid": "4294967295", "gid": "7", "mtime": "-1.5", "size": "5"},
        )
        .hardlink("h", "short", pax={"linkpath": "l" * 150})
        .build()
    )
    (a, data), (b, _) = entries(tar)
    assert (a.name, a.uid, a.gid, a.mtime_ns, data) == (
        "p/" + "x" * 200,
        2**32 - 1,
        7,
        -1_500_000_000,
        b"12345",
    )
    assert b.linkname == "l" * 150


def test_libarchive_xattrs_decoded_and_schily_wins() -> None:
    tar = (
        TarBuilder()
        .file(
            "f",
            pax={
                "LIBARCHIVE.xattr.user.sp%20ace": "dmFsdWU",  # base64 without padding, url-encoded name
                "LIBARCHIVE.xattr.user.both": "bGli",
                "SCHILY.xattr.user.both": "schily",
            },
        )
        .build()
    )
    ((e, _),) = entries(tar)
    assert e.xattrs == {"user.sp ace": b"value", "user.both": b"schily"}


def test_ustar_prefix_and_old_style_entries() -> None:
    tar = (
        TarBuilder()
        .header(Header(name=b"file", prefix=b"some/long/prefix", typeflag=b"0", size=2), b"hi")
        .header(Header(name=b"contig", typeflag=b"7", size=1), b"c")
        .header(Header(name=b"nul-type", typeflag=b"\0", size=1), b"n")
        .header(Header(name=b"olddir/", typeflag=b"\0"))
        .header(Header(name=b"name\0../evil", typeflag=b"0"))  # the name field ends at its NUL
        .build()
    )
    got = [(e.name, e.kind, d) for e, d in entries(tar)]
    assert got == [
        ("some/long/prefix/file", EntryKind.REG, b"hi"),
        ("contig", EntryKind.REG, b"c"),
        ("nul-type", EntryKind.REG, b"n"),
        ("olddir/", EntryKind.DIR, b""),
        ("name", EntryKind.REG, b""),
    ]


def test_global_header_is_ignored() -> None:
    tar = TarBuilder().global_header({"comment": "commit abc", "path": "foo/bar"}).file("a", b"1").build()
    assert [(e.name, d) for e, d in entries(tar)] == [("a", b"1")]


def test_header_only_types_carry_no_data_whatever_their_size_field() -> None:
    # the size fields claim data; Go and tarfile read none for these types, and so do we
    tar = (
        TarBuilder()
        .dir("d", raw={"size": 1024})
        .symlink("s", "t", raw={"size": 512})
        .file("after", b"ok")
        .build()
    )
    got = [(e.name, e.size, d) for e, d in entries(tar)]
    assert got == [("d/", 0, b""), ("s", 0, b""), ("after", 2, b"ok")]


def test_data_access_readinto_copy_skip_across_buffer_boundaries(tmp_path: Path) -> None:
    big = os.urandom(3 << 20) + b"tail"
    tar = (
        TarBuilder()
        .file("big", big)
        .file("small", b"s" * 700)
        .file("skipped", b"x" * 5000)
        .file("last", b"L")
        .build()
    )
    it = iter_entries(io.BytesIO(tar))
    e = next(it)
    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        head = bytearray(10)
        assert e.readinto(head) == 10
        assert e.remaining == len(big) - 10
        assert e.copy_to_fd(fd) == len(big) - 10
    finally:
        os.close(fd)
    assert bytes(head) + out.read_bytes() == big
    e = next(it)
    assert e.read(100) == b"s" * 100
    assert e.read() == b"s" * 600
    assert e.read() == b""
    next(it)  # "skipped": not read at all
    e = next(it)
    assert (e.name, e.read()) == ("last", b"L")
    assert list(it) == []


def test_one_byte_reads_parse_the_same() -> None:
    tar = TarBuilder().file("a" * 150, b"x" * 1500, xattrs={"user.k": b"v"}).dir("d").file("b", b"yy").build()
    slow = [(e.name, e.kind, e.xattrs, e.read()) for e in iter_entries(OneByteReader(tar))]  # type: ignore[arg-type]
    fast = [(e.name, e.kind, e.xattrs, d) for e, d in entries(tar)]
    assert slow == fast


def test_end_of_archive_variants() -> None:
    body = TarBuilder().file("a", b"1").build(end=False)
    assert [e.name for e, _ in entries(body)] == ["a"]  # no end marker at a block boundary
    assert [e.name for e, _ in entries(body + bytes(512))] == ["a"]  # a single zero block at the end
    # bytes after the end marker are not read as entries
    assert [e.name for e, _ in entries(body + bytes(1024) + TarBuilder().file("b").build())] == ["a"]
    assert entries(b"") == []


def test_signed_checksum_is_accepted() -> None:
    h = Header(name="é".encode(), typeflag=b"0")
    block = bytearray(encode_header(h))
    signed = sum(b - 256 if b > 127 else b for b in block[:148]) + 256 + sum(block[156:])
    block[148:156] = b"%06o\0 " % signed
    assert [e.name for e, _ in entries(bytes(block) + bytes(1024))] == ["é"]


# ---------------------------------------------------------------------------------------------
# errors


def bad(tar: bytes, error: type[Exception], match: str, limits: Limits | None = None) -> None:
    with pytest.raises(error, match=match):
        entries(tar, limits)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_bad_checksum_in_any_header_is_corrupt(which: int) -> None:
    b = TarBuilder()
    for i in range(3):
        b.file(f"f{i}", b"x", raw={"chksum": 1} if i == which else None)
    bad(b.build(), CorruptStream, "checksum mismatch")


def test_garbage_checksum_field_is_corrupt() -> None:
    bad(TarBuilder().file("f", raw={"chksum": b"zz\0"}).build(), CorruptStream, "checksum")


def test_truncated_data_and_headers_are_corrupt() -> None:
    tar = TarBuilder().file("a", b"x" * 2000).file("b", b"y").build(end=False)
    bad(tar[: 512 + 1000], CorruptStream, "inside the data of: 'a'")
    bad(tar[: 512 + 2048 + 100], CorruptStream, "inside a tar header")
    bad(tar[: 512 + 2000], CorruptStream, "inside the data of")  # padding missing
    # skipping (not reading) truncated data fails the same way
    with pytest.raises(CorruptStream):
        for _ in iter_entries(io.BytesIO(tar[: 512 + 1000])):
            pass


def test_lone_zero_block_then_header_is_corrupt() -> None:
    tar = TarBuilder().file("a").raw(bytes(512)).file("b").build()
    bad(tar, CorruptStream, "lone zero block")


def test_extended_header_without_entry_is_corrupt() -> None:
    bad(TarBuilder().pax_header({"path": "x"}).build(), CorruptStream, "extended header")
    bad(TarBuilder().gnu_long("x" * 200).build(end=False), CorruptStream, "extended header")


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ({"path": b"evil\0/../../x"}, "NUL byte inside a PAX path"),
        ({"linkpath": b"a\0b"}, "NUL byte inside a PAX linkpath"),
        ({b"SCHILY.xattr.user.a\0b": b"v"}, "NUL byte or empty name"),
        ({"SCHILY.xattr.": b"v"}, "NUL byte or empty name"),
        ({"size": "-1"}, "invalid PAX size"),
        ({"size": "+5"}, "invalid PAX size"),
        ({"uid": "1_0"}, "invalid PAX uid"),
        ({"gid": "4294967296"}, "uid or gid above"),
        ({"mtime": "1.2.3"}, "invalid PAX mtime"),
        ({"mtime": "99999999999999999999"}, "out of range"),
        ({"LIBARCHIVE.xattr.user.x": "!!!"}, "invalid base64"),
        ({"GNU.sparse.major": "1"}, "sparse files are not supported"),
    ],
)
def test_bad_pax_records(records: dict[str | bytes, str | bytes], match: str) -> None:
    bad(TarBuilder().file("f", pax=records).build(), InvalidArchive, match)


@pytest.mark.parametrize(
    "raw_pax",
    [b"5 a=b\n", b"9 a=b\n", b"x a=b\n", b"6 ab\n", b"6 =b\n\n", b"3 \n", b"7 a=bc"],
)
def test_malformed_pax_records(raw_pax: bytes) -> None:
    bad(TarBuilder().pax_header(data=raw_pax).file("f").build(), InvalidArchive, "malformed PAX")


def test_pax_trailing_nul_padding_is_tolerated() -> None:
    tar = TarBuilder().pax_header(data=pax_record("path", "real") + bytes(20)).file("f").build()
    assert [e.name for e, _ in entries(tar)] == ["real"]


def test_nul_inside_gnu_long_name_is_invalid() -> None:
    tar = TarBuilder().gnu_long(b"good\0../evil").file("f").build()
    bad(tar, InvalidArchive, "NUL byte inside a GNU long name")


@pytest.mark.parametrize("typeflag", [b"L", b"K", b"x", b"g"])
def test_huge_extended_headers_are_refused_before_reading(typeflag: bytes) -> None:
    # the header claims 64 MiB but the stream holds 10 bytes: the limit fires from the size field
    tar = (
        TarBuilder()
        .header(Header(name=b"h", typeflag=typeflag, size=64 << 20), b"10 a=bcde\n", pad=False)
        .build(end=False)
    )
    bad(tar, LimitExceeded, "extended tar header of 67108864 bytes")
    just_over = TarBuilder().pax_header(data=b"x" * 200).file("f").build()
    bad(just_over, LimitExceeded, "larger than the limit of 100", Limits(max_header_size=100))


def test_large_header_limit_grows_the_buffer() -> None:
    value = "v" * (3 << 20)
    tar = TarBuilder().file("f", xattrs={"user.big": value.encode()}).build()
    ((e, _),) = entries(tar, Limits(max_header_size=4 << 20))
    assert e.xattrs["user.big"] == value.encode()


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"size": -1}, "negative number in the size field"),
        ({"size": -256}, "negative number in the size field"),
        ({"uid": -1}, "negative number in the uid field"),
        ({"uid": 2**40}, "uid or gid above"),
        ({"mode": b"0009\0"}, "invalid number"),
        ({"size": b"+12\0"}, "invalid number"),
        ({"mtime": b"1 2\0"}, "invalid number"),
    ],
)
def test_bad_numeric_fields(raw: dict[str, int | bytes], match: str) -> None:
    bad(TarBuilder().file("f", raw=raw).build(), InvalidArchive, match)


@pytest.mark.parametrize(("major", "minor"), [(2**32, 0), (0, 2**32), (-1, 0), (0, -1)])
def test_device_numbers_outside_uint32_are_invalid(major: int, minor: int) -> None:
    tar = TarBuilder().char("dev/x", 0, 0, raw={"devmajor": major, "devminor": minor}).build()
    bad(tar, InvalidArchive, "device number outside uint32|negative number")


def test_device_fields_of_other_types_are_not_interpreted() -> None:
    tar = TarBuilder().file("f", raw={"devmajor": b"garbage"}).build()
    assert [e.name for e, _ in entries(tar)] == ["f"]


@pytest.mark.parametrize("typeflag", [b"V", b"M", b"N", b"D", b"Z", b"X"])
def test_unknown_typeflags_are_invalid(typeflag: bytes) -> None:
    bad(TarBuilder().entry("weird", typeflag).build(), InvalidArchive, "unhandled tar header type")


def test_gnu_sparse_member_is_refused() -> None:
    bad(TarBuilder().entry("sparse", b"S").build(), InvalidArchive, "sparse files are not supported")


def test_limits() -> None:
    three = TarBuilder().file("a", b"1").file("b", b"22").file("c" * 40, b"333").build()
    bad(three, LimitExceeded, "more than 2 entries", Limits(max_entries=2))
    bad(three, LimitExceeded, "entry of 3 bytes", Limits(max_entry_size=2))
    bad(three, LimitExceeded, "name longer than the limit of 30", Limits(max_path_length=30))
    bad(three, LimitExceeded, "uncompressed bytes", Limits(max_decompressed_bytes=2000))
    assert len(entries(three, Limits(max_entries=3, max_entry_size=3, max_path_length=40))) == 3


# ---------------------------------------------------------------------------------------------
# real tools' archives


def test_gnu_tar_and_bsdtar_archives_parse(tmp_path: Path) -> None:
    src = tmp_path / "src"
    deep = src / ("long-" * 30) / ("name-" * 30)
    deep.mkdir(parents=True)
    (deep / "file").write_bytes(b"content")
    os.symlink("l" * 150, src / "link")
    os.link(deep / "file", src / "hard")
    os.setxattr(deep / "file", "user.mark", b"\x00\xffbinary")
    os.utime(deep / "file", ns=(1, 1_600_000_000_987_654_321))
    listing = {}
    for tool, args in [
        ("gnu-posix", ["tar", "--format=posix", "--xattrs", "--xattrs-include=*"]),
        ("gnu-gnu", ["tar", "--format=gnu"]),
        ("bsdtar", ["bsdtar", "--xattrs", "--format=pax"]),
    ]:
        out = tmp_path / f"{tool}.tar"
        try:
            subprocess.run([*args, "-cf", str(out), "-C", str(src), "."], check=True, capture_output=True)
        except FileNotFoundError:
            pytest.skip(f"{args[0]} is not installed")
        got = {e.name.removeprefix("./").rstrip("/"): (e, d) for e, d in entries(out.read_bytes())}
        rel = os.path.relpath(deep / "file", src)
        # one of the two names carries the data, the other is a hard link to it
        (e, data), (link, _) = sorted((got[rel], got["hard"]), key=lambda p: p[0].kind is EntryKind.HARDLINK)
        assert (e.kind, data, link.kind) == (EntryKind.REG, b"content", EntryKind.HARDLINK)
        assert link.linkname.removeprefix("./") == e.name.removeprefix("./")
        if tool != "gnu-gnu":
            assert e.xattrs.get("user.mark") == b"\x00\xffbinary"
            assert e.mtime_ns == 1_600_000_000_987_654_321
        assert got["link"][0].linkname == "l" * 150
        listing[tool] = sorted(got)
    assert listing["gnu-posix"] == listing["gnu-gnu"] == listing["bsdtar"]


# ---------------------------------------------------------------------------------------------
# property: what the builder writes, the reader reads back

names = st.text(
    alphabet=st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=40
).filter(lambda s: s not in (".", ".."))


@settings(max_examples=60, deadline=None)
@given(
    members=st.lists(
        st.tuples(
            st.lists(names, min_size=1, max_size=6).map("/".join),
            st.binary(max_size=1500),
            st.integers(0, 0o7777),
            st.integers(0, 2**32 - 1),
            st.integers(-(2**40), 2**40),
        ),
        max_size=8,
    ),
    gnu=st.booleans(),
)
def test_roundtrip_property(members: list[tuple[str, bytes, int, int, int]], gnu: bool) -> None:
    b = TarBuilder(longnames="gnu" if gnu else "pax")
    for name, data, mode, uid, mtime_ns in members:
        b.file(name, data, mode=mode, uid=uid, gid=uid, mtime_ns=mtime_ns if not gnu else None)
    got = [(e.name, d, e.mode, e.uid, e.gid) for e, d in entries(b.build())]
    assert got == [(n, d, m, u, u) for n, d, m, u, _ in members]
