"""Layer tar export: exact member lists, header fields and bytes; GNU tar and bsdtar read it.

The output is read back with Python's tarfile (fine for reading our own, trusted output), and
checked against the external tools where they are installed.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import stat
import struct
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from graphdriver.archive.export import export_changes, open_export, tar_tree
from graphdriver.archive.tarwriter import TarKind, TarWriter
from graphdriver.archive.types import Change, ChangeKind, WhiteoutFormat
from graphdriver.errors import InvalidArgument, NotFound
from graphdriver.testing.trees import diff_snapshots, snapshot_tree

A, C, D = ChangeKind.ADD, ChangeKind.MODIFY, ChangeKind.DELETE
T0 = 1_700_000_000_123_456_789
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (chown, mknod, security.*/trusted.* xattrs)")
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
BIG = bytes(range(251)) * 8400  # 2,108,400 bytes: streamed with sendfile, not buffered
ALLOWED_PAX = ("mtime", "path", "linkpath", "uid", "gid", "size", "hdrcharset", "SCHILY.xattr.")


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return tf.getmembers()


def names(data: bytes) -> list[str]:
    return [m.name + ("/" if m.isdir() and m.name != "." else "") for m in members(data)]


def raw_names(data: bytes) -> list[str]:
    """Member names as stored (tarfile strips a directory's trailing slash; GNU tar does not)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return [m.name for m in tf]


def content(data: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        f = tf.extractfile(name)
        assert f is not None
        return f.read()


def export(root: Path, changes: list[Change], **kw: WhiteoutFormat) -> bytes:
    buf = io.BytesIO()
    n = export_changes(root, changes, buf, **kw)
    assert n == len(buf.getvalue())
    return buf.getvalue()


def tree_bytes(root: Path, **kw: WhiteoutFormat) -> bytes:
    buf = io.BytesIO()
    n = tar_tree(root, buf, **kw)
    assert n == len(buf.getvalue())
    return buf.getvalue()


def put(path: Path, data: bytes, mode: int = 0o644, mtime: int = T0) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)
    os.utime(path, ns=(mtime, mtime))


def fix_times(root: Path) -> None:
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            os.utime(os.path.join(dirpath, name), ns=(T0, T0), follow_symlinks=False)
    os.utime(root, ns=(T0, T0))


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "tree"
    for d in ("bin", "data/sub", "etc"):
        (root / d).mkdir(parents=True)
    put(root / "etc/passwd", b"root:x:0:0\n")
    os.setxattr(root / "etc/passwd", "user.note", b"n\x00\xff")
    put(root / "bin/suid", b"#!/bin/sh\n", 0o4755)
    put(root / "data/big", BIG, 0o600)
    put(root / "data/h1", b"linked\n")
    os.link(root / "data/h1", root / "data/h2")
    os.link(root / "data/h1", root / "data/sub/h3")
    os.symlink("etc/passwd", root / "lnk")
    os.utime(root / "lnk", ns=(T0, T0), follow_symlinks=False)
    os.mkfifo(root / "fifo", 0o640)
    os.utime(root / "fifo", ns=(T0, T0))
    monkeypatch.chdir(root)  # AF_UNIX paths are short: bind relative to the tree
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("sock")
    sock.close()
    if ROOT:
        put(root / "bin/ping", b"\x7fELF\n", 0o755)
        os.setxattr(root / "bin/ping", "security.capability", CAPABILITY)
        os.setxattr(root / "etc/passwd", "trusted.overlay.origin", b"\x00\x01")
        os.setxattr(root / "etc", "trusted.overlay.opaque", b"y")
        os.setxattr(root / "etc", "user.overlay.opaque", b"y")
        os.chown(root / "bin/suid", 1000, 1001)
        os.chmod(root / "bin/suid", 0o4755)
        (root / "dev").mkdir()
        os.mknod(root / "dev/null", stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(root / "dev/sda9", stat.S_IFBLK, os.makedev(8, 9))
        os.chmod(root / "dev/null", 0o666)
        os.chmod(root / "dev/sda9", 0o660)
        os.utime(root / "dev/null", ns=(T0, T0))
        os.utime(root / "dev/sda9", ns=(T0, T0))
    fix_times(root)
    monkeypatch.chdir(tmp_path)
    return root


def test_tar_tree_member_list(tree: Path) -> None:
    expected = [
        "./",
        "bin/",
        "bin/ping",
        "bin/suid",
        "data/",
        "data/big",
        "data/h1",
        "data/h2",
        "data/sub/",
        "data/sub/h3",
        "dev/",
        "dev/null",
        "dev/sda9",
        "etc/",
        "etc/passwd",
        "fifo",
        "lnk",
    ]
    if not ROOT:
        expected = [n for n in expected if n not in ("bin/ping", "dev/", "dev/null", "dev/sda9")]
    data = tree_bytes(tree)
    assert raw_names(data) == [n.rstrip("/") if n != "./" else "." for n in expected]
    kinds = {m.name: m.type for m in members(data)}
    assert kinds["."] == tarfile.DIRTYPE
    assert kinds["data/big"] == tarfile.REGTYPE
    assert kinds["lnk"] == tarfile.SYMTYPE
    assert kinds["fifo"] == tarfile.FIFOTYPE
    assert "sock" not in kinds  # sockets are skipped


def test_stored_names_of_directories_end_with_a_slash(tree: Path) -> None:
    data = tree_bytes(tree)
    assert data[:2] == b"./"  # the first header is the root, "./"
    assert b"data/sub/\x00" in data


def test_header_fields(tree: Path) -> None:
    by_name = {m.name: m for m in members(tree_bytes(tree))}
    passwd = by_name["etc/passwd"]
    assert (passwd.mode, passwd.uid, passwd.gid, passwd.size) == (0o644, 0, 0, 11)
    assert (passwd.uname, passwd.gname) == ("", "")
    assert passwd.pax_headers["mtime"] == "1700000000.123456789"
    suid = by_name["bin/suid"]
    assert suid.mode == 0o4755
    if ROOT:
        assert (suid.uid, suid.gid) == (1000, 1001)
    lnk = by_name["lnk"]
    assert (lnk.linkname, lnk.size, lnk.mode) == ("etc/passwd", 0, 0o777)
    assert by_name["fifo"].mode == 0o640
    assert by_name["."].pax_headers["mtime"] == "1700000000.123456789"
    for m in by_name.values():
        assert all(k.startswith(ALLOWED_PAX) for k in m.pax_headers), m.pax_headers  # no atime/ctime


@needs_root
def test_devices(tree: Path) -> None:
    by_name = {m.name: m for m in members(tree_bytes(tree))}
    null, sda9 = by_name["dev/null"], by_name["dev/sda9"]
    assert (null.type, null.devmajor, null.devminor, null.mode, null.size) == (
        tarfile.CHRTYPE,
        1,
        3,
        0o666,
        0,
    )
    assert (sda9.type, sda9.devmajor, sda9.devminor, sda9.mode) == (tarfile.BLKTYPE, 8, 9, 0o660)


def test_xattrs_in_pax_and_overlay_ones_never(tree: Path) -> None:
    data = tree_bytes(tree)
    by_name = {m.name: m for m in members(data)}
    assert by_name["etc/passwd"].pax_headers["SCHILY.xattr.user.note"] == "n\x00\udcff"
    if ROOT:
        pax = by_name["bin/ping"].pax_headers
        assert pax["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape") == CAPABILITY
    for m in by_name.values():
        assert not any("overlay" in k for k in m.pax_headers), (m.name, m.pax_headers)
    assert b"overlay" not in data


def test_hard_links_point_to_the_first_name(tree: Path) -> None:
    data = tree_bytes(tree)
    by_name = {m.name: m for m in members(data)}
    assert by_name["data/h1"].type == tarfile.REGTYPE
    assert content(data, "data/h1") == b"linked\n"
    for name in ("data/h2", "data/sub/h3"):
        link = by_name[name]
        assert (link.type, link.linkname, link.size) == (tarfile.LNKTYPE, "data/h1", 0)


def test_big_file_content(tree: Path) -> None:
    data = tree_bytes(tree)
    assert content(data, "data/big") == BIG


def test_export_changes_order_and_whiteouts(tree: Path) -> None:
    data = export(
        tree,
        [
            Change("/data", C),
            Change("/data/h2", A),
            Change("/data/old", D),
            Change("/etc", C),
            Change("/etc/passwd", C),
            Change("/gone", D),
        ],
    )
    assert raw_names(data) == ["data", "data/h2", "data/.wh.old", "etc", "etc/passwd", ".wh.gone"]
    by_name = {m.name: m for m in members(data)}
    # the first name of a hard-linked inode in the exported set carries the data
    assert by_name["data/h2"].type == tarfile.REGTYPE
    assert content(data, "data/h2") == b"linked\n"
    for name in ("data/.wh.old", ".wh.gone"):
        wh = by_name[name]
        assert (wh.type, wh.size, wh.mode, wh.uid, wh.gid, wh.mtime) == (tarfile.REGTYPE, 0, 0, 0, 0, 0)
        assert wh.pax_headers == {}


def test_empty_change_list_is_an_empty_archive(tree: Path) -> None:
    assert export(tree, []) == bytes(1024)


def test_archive_ends_with_two_zero_blocks_and_no_record_padding(tree: Path) -> None:
    data = export(tree, [Change("/etc/passwd", A)])
    # PAX header + its data (mtime, xattr) + header + data + 2 end blocks; never padded to 10240
    assert len(data) == 6 * 512
    assert data[-1024:] == bytes(1024)


def test_deterministic_bytes(tree: Path) -> None:
    first = tree_bytes(tree)
    for dirpath, _, filenames in os.walk(tree):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    f.read()
                st = os.lstat(p)
                os.utime(p, ns=(st.st_atime_ns + 10**12, st.st_mtime_ns))
    assert tree_bytes(tree) == first
    with open(tree.parent / "out.tar", "wb") as f:  # a real fd: the sendfile path
        tar_tree(tree, f)
    assert (tree.parent / "out.tar").read_bytes() == first


def test_overlay_source_format(tmp_path: Path) -> None:
    if not ROOT:
        pytest.skip("needs root (mknod, trusted.* xattrs)")
    up = tmp_path / "upper"
    (up / "d").mkdir(parents=True)
    put(up / "d/c", b"c")
    os.setxattr(up / "d", "trusted.overlay.opaque", b"y")
    os.setxattr(up / "d", "user.keep", b"k")
    os.mknod(up / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.mknod(up / "d/gone2", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.link(up / "gone", up / "gone3")  # the kernel shares one whiteout inode: never a hard link entry
    os.chown(up / "gone", 1000, 1000)
    fix_times(up)

    data = tree_bytes(up, source_format=WhiteoutFormat.OVERLAY)
    assert raw_names(data) == [".", "d", "d/.wh..wh..opq", "d/c", "d/.wh.gone2", ".wh.gone", ".wh.gone3"]
    by_name = {m.name: m for m in members(data)}
    for name in ("d/.wh..wh..opq", "d/.wh.gone2", ".wh.gone", ".wh.gone3"):
        wh = by_name[name]
        assert (wh.type, wh.size, wh.mode, wh.uid, wh.gid, wh.mtime) == (tarfile.REGTYPE, 0, 0, 0, 0, 0)
    assert by_name["d"].pax_headers == {"SCHILY.xattr.user.keep": "k", "mtime": "1700000000.123456789"}

    oci = tree_bytes(up)  # as plain files: a 0/0 device, no opaque marker, overlay xattrs still hidden
    assert raw_names(oci) == [".", "d", "d/c", "d/gone2", "gone", "gone3"]
    by_name = {m.name: m for m in members(oci)}
    assert (by_name["gone"].type, by_name["gone"].devmajor, by_name["gone"].devminor) == (
        tarfile.CHRTYPE,
        0,
        0,
    )
    assert (by_name["gone3"].type, by_name["gone3"].linkname) == (tarfile.LNKTYPE, "gone")
    assert b"overlay" not in oci


def test_overlay_source_opaque_root(tmp_path: Path) -> None:
    if not ROOT:
        pytest.skip("needs root (trusted.* xattrs)")
    up = tmp_path / "upper"
    up.mkdir()
    os.setxattr(up, "trusted.overlay.opaque", b"y")
    put(up / "f", b"f")
    assert raw_names(tree_bytes(up, source_format=WhiteoutFormat.OVERLAY)) == [".", ".wh..wh..opq", "f"]


def test_names_beyond_ustar(tmp_path: Path) -> None:
    root = tmp_path / "names"
    split_dir = "d" * 60 + "/" + "e" * 60
    long_dir = "/".join(["x" * 200, "y" * 200])
    (root / split_dir).mkdir(parents=True)
    (root / long_dir).mkdir(parents=True)
    put(root / split_dir / ("f" * 90), b"split")  # 212 bytes: fits the 155/100 ustar split
    put(root / long_dir / "z", b"pax")  # 403 bytes: needs a PAX path
    put(root / "caf\u00e9", b"utf8")
    put(root / os.fsdecode(b"raw\xff\xfe"), b"binary name")
    target = "t" * 150
    os.symlink(target, root / "longlink")
    data = tree_bytes(root)
    by_name = {m.name: m for m in members(data)}
    split = by_name[f"{split_dir}/{'f' * 90}"]
    assert "path" not in split.pax_headers
    assert by_name[f"{long_dir}/z"].pax_headers["path"] == f"{long_dir}/z"
    assert by_name["caf\u00e9"].pax_headers["path"] == "caf\u00e9"
    raw = by_name[os.fsdecode(b"raw\xff\xfe")]
    assert raw.pax_headers["hdrcharset"] == "BINARY"
    assert content(data, raw.name) == b"binary name"
    assert by_name["longlink"].linkname == target
    assert by_name["longlink"].pax_headers["linkpath"] == target


def test_tarwriter_bytes_equal_gnu_tars_ustar(tmp_path: Path) -> None:
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    (tmp_path / "etc").mkdir()
    put(tmp_path / "etc/hostname", b"host\n")
    opts = ["--format=ustar", "--numeric-owner", "--owner=1", "--group=2", "--mtime=@1600000000"]
    gnu = subprocess.run(
        ["tar", *opts, "-cf", "-", "-C", str(tmp_path), "etc/hostname"],
        check=True,
        capture_output=True,
    ).stdout
    ours = io.BytesIO()
    w = TarWriter(ours)
    w.add(
        "etc/hostname",
        TarKind.REGULAR,
        mode=0o644,
        uid=1,
        gid=2,
        size=5,
        mtime_ns=1_600_000_000 * 10**9,
        data=b"host\n",
    )
    assert w.close() == 4 * 512  # header, data, two end blocks: no padding to a 10240-byte record
    assert ours.getvalue() == gnu[: 4 * 512]
    assert gnu[4 * 512 :] == bytes(len(gnu) - 4 * 512)


def test_tarwriter_pax_for_big_ids_and_odd_times() -> None:
    out = io.BytesIO()
    w = TarWriter(out)
    w.add("big-ids", TarKind.REGULAR, uid=3_000_000, gid=2**32 - 2, mtime_ns=-1_500_000_000)
    w.add("far", TarKind.REGULAR, mtime_ns=10**12 * 10**9)
    w.close()
    by_name = {m.name: m for m in members(out.getvalue())}
    big = by_name["big-ids"]
    assert (big.uid, big.gid) == (3_000_000, 2**32 - 2)
    assert big.pax_headers == {"uid": "3000000", "gid": "4294967294", "mtime": "-1.500000000"}
    assert big.mtime == -1.5
    assert by_name["far"].pax_headers == {"mtime": "1000000000000"}


def test_tarwriter_refuses_inconsistent_entries() -> None:
    w = TarWriter(io.BytesIO())
    with pytest.raises(InvalidArgument):
        w.add("d/", TarKind.DIRECTORY, size=3, data=b"abc")
    with pytest.raises(InvalidArgument):
        w.add("f", TarKind.REGULAR, size=3, data=b"ab")
    with pytest.raises(InvalidArgument):
        w.add("f", TarKind.REGULAR, size=3)
    with pytest.raises(InvalidArgument):
        w.add("a\x00b", TarKind.REGULAR)


def test_shrinking_file_keeps_the_archive_valid(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"12345")
    out = io.BytesIO()
    w = TarWriter(out)
    with open(f, "rb") as src:
        st = os.fstat(src.fileno())
        f.write_bytes(b"12")  # truncated after the size was taken
        w.add_stat("f", st, data_fd=src.fileno())
    w.close()
    assert content(out.getvalue(), "f") == b"12\x00\x00\x00"


# -- safety and robustness -----------------------------------------------------------------------


def test_entries_behind_symlinks_and_vanished_ones_are_skipped(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    put(outside / "secret", b"host secret")
    os.symlink(outside, tree / "escape")
    data = export(
        tree,
        [
            Change("/absent", A),
            Change("/escape/secret", A),
            Change("/etc/passwd/child", A),
            Change("/sock", A),
            Change("/fifo", A),
        ],
    )
    assert raw_names(data) == ["fifo"]
    assert b"host secret" not in data


@pytest.mark.parametrize("path", ["relative", "/a/../b", "/a//b", "/a/./b", "/a/", "/..", ""])
def test_unclean_change_paths_are_refused(tree: Path, path: str) -> None:
    with pytest.raises(InvalidArgument):
        export(tree, [Change(path, A)])


def test_deleting_the_root_is_refused(tree: Path) -> None:
    with pytest.raises(InvalidArgument):
        export(tree, [Change("/", D)])


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        export(tmp_path / "absent", [])
    with pytest.raises(NotFound), open_export(tmp_path / "absent", None):
        pass


# -- external readers ----------------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["tar", "bsdtar"])
def test_external_tools_list_and_extract(tree: Path, tmp_path: Path, tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    archive = tmp_path / "t.tar"
    with open(archive, "wb") as f:
        tar_tree(tree, f)
    listed = subprocess.run([tool, "-tf", str(archive)], check=True, capture_output=True).stdout
    assert [n.rstrip("/") or "." for n in os.fsdecode(listed).splitlines()] == [
        "." if n == "./" else n.rstrip("/") for n in names(archive.read_bytes())
    ]
    dest = tmp_path / "out"
    dest.mkdir()
    if tool == "tar":
        cmd = [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-xpf",
            str(archive),
            "-C",
            str(dest),
        ]
    else:
        cmd = ["bsdtar", "--xattrs", "--numeric-owner", "-xpf", str(archive), "-C", str(dest)]
    subprocess.run(cmd, check=True)
    want, got = snapshot_tree(tree), snapshot_tree(dest)
    want.pop("/sock")
    if tool == "bsdtar":  # bsdtar leaves the mtime of the directory it extracts into
        want.pop("/")
        got.pop("/")
    assert diff_snapshots(want, got) == []


# -- the streaming reader ------------------------------------------------------------------------


def test_open_export_streams_the_same_bytes(tree: Path) -> None:
    with open_export(tree, None) as stream:
        chunks = []
        while chunk := stream.read(1000):
            chunks.append(chunk)
    assert b"".join(chunks) == tree_bytes(tree)
    changes = [Change("/data", C), Change("/data/big", A), Change("/old", D)]
    with open_export(tree, changes) as stream:
        assert stream.read() == export(tree, changes)


def test_open_export_raises_the_writers_error_on_read(tree: Path) -> None:
    with open_export(tree, [Change("/data/big", A), Change("bad", A)]) as stream:
        got = b""
        with pytest.raises(InvalidArgument):
            while chunk := stream.read(100_000):
                got += chunk
    assert len(got) > len(BIG) // 2  # what came before the error was readable


def test_open_export_raises_the_writers_error_on_exit(tree: Path) -> None:
    with pytest.raises(InvalidArgument), open_export(tree, [Change("/etc/passwd", A), Change("bad", A)]):
        pass


def test_open_export_early_exit_stops_the_writer(tree: Path, tmp_path: Path) -> None:
    put(tree / "huge", bytes(16 << 20))
    with open_export(tree, [Change("/huge", A)]) as stream:
        assert len(stream.read(10)) == 10
    assert not [t for t in threading.enumerate() if t.name.startswith("export ")]
