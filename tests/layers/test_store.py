"""The layer store on real drivers: import, identities, names, container layers, mounts, removal.

Blobs are trees packed by GNU tar or by the library's exporter, as plain tar, gzip and zstd; the
mounted result is compared with the source tree field by field (type, mode, owner, size, mtime
with ns, xattrs, link target, content, hard-link groups).
"""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest

from graphdriver import mount as kmount
from graphdriver.errors import AlreadyExists, Busy, DigestMismatch, InvalidArgument, NotFound
from graphdriver.layers import LayerKind, chain_id, chain_ids
from graphdriver.layers.metadata import SCHEMA_VERSION
from graphdriver.layers.store import LayerStore
from graphdriver.testing.tarbuild import TarBuilder
from graphdriver.testing.trees import diff_snapshots, make_sample_tree, snapshot_tree

T0 = 1_700_000_000_000_000_000


def small_tree(root: Path) -> Path:
    root.mkdir(mode=0o755)
    (root / "etc").mkdir(mode=0o755)
    (root / "etc/hostname").write_bytes(b"box\n")
    (root / "etc/motd").write_bytes(b"hello\n")
    (root / "bin").mkdir(mode=0o755)
    (root / "bin/sh").write_bytes(b"#!shell\n" * 100)
    os.chmod(root / "bin/sh", 0o755)
    os.symlink("bin/sh", root / "sh")
    for p in sorted(root.rglob("*"), reverse=True):
        os.utime(p, ns=(T0, T0), follow_symlinks=False)
    os.utime(root, ns=(T0, T0))
    return root


def child_tar() -> bytes:
    return (
        TarBuilder()
        .dir("etc", mode=0o755, mtime=T0 // 10**9)
        .file("etc/hostname", b"child\n", mode=0o644, mtime=T0 // 10**9)
        .whiteout("etc/motd")
        .file("new", b"new file\n", mode=0o600, uid=1000, gid=1000, mtime=T0 // 10**9)
        .build()
    )


def leftovers(store: LayerStore) -> dict[str, Any]:
    """What is on disk besides complete layers: rows in other states, locks of layers that do not
    exist (chain locks, locks of failed builds), staging entries."""
    with store.db.read() as txn:
        other_rows = [(la.id, str(la.state)) for la in txn.all() if str(la.state) != "complete"]
    live = {f"layer-{la.id}.lock" for la in store.layers()}
    locks = sorted(p.name for p in (store.root / "locks").iterdir() if p.name not in live | {"store.lock"})
    staging = sorted(os.listdir(store.root / "staging"))
    return {"rows": other_rows, "locks": locks, "staging": staging}


def driver_ids(store: LayerStore) -> list[str]:
    from graphdriver.layers.check import driver_layer_ids

    ids = driver_layer_ids(store)
    assert ids is not None
    return ids


# -- identities ----------------------------------------------------------------------------------


def test_chain_ids_follow_the_oci_spec_by_hand() -> None:
    d1 = "sha256:" + "a" * 64
    d2 = "sha256:" + "b" * 64
    d3 = "sha256:" + "c" * 64
    c2 = "sha256:" + hashlib.sha256(f"{d1} {d2}".encode()).hexdigest()
    c3 = "sha256:" + hashlib.sha256(f"{c2} {d3}".encode()).hexdigest()
    assert chain_ids([d1, d2, d3]) == [d1, c2, c3]
    assert chain_id(None, d1) == d1
    assert chain_id(c2, d3) == c3
    # the example of the OCI image spec (config.md): ChainID(A|B) = Digest(ChainID(A) + " " + DiffID(B))
    with pytest.raises(InvalidArgument):
        chain_id(None, "sha256:short")


# -- import ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_import_gnu_tar_reproduces_the_tree(
    store: LayerStore, tmp_path: Path, kit: Any, compression: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_sample_tree(src)
    b = kit.blob(kit.gnu_tar(src), compression)
    layer = store.import_layer(
        io.BytesIO(b.data), expected_diff_id=b.diff_id, expected_digest=b.digest, expected_size=b.size
    )
    assert layer.diff_id == b.diff_id
    assert layer.chain_id == b.diff_id  # a base layer's chain ID is its diff ID
    assert layer.compressed_digest == b.digest
    assert layer.compressed_size == b.size
    assert layer.uncompressed_size == len(b.tar)
    assert layer.kind is LayerKind.IMAGE
    assert layer.parent is None
    assert layer.size > 0
    with store.mounted(layer.id) as root:
        assert diff_snapshots(snapshot_tree(src), snapshot_tree(root)) == []
    assert store.layers() == [store.get(layer.id)]
    assert leftovers(store) == {"rows": [], "locks": [], "staging": []}
    # the original tar comes back byte for byte (tar-split + stored files), so content checks hold
    with store.original_tar(layer.id) as stream:
        assert stream.read() == b.tar
    assert store.check(verify_content=True).clean


def test_import_without_expected_digests_measures_them(store: LayerStore, tmp_path: Path, kit: Any) -> None:
    b = kit.blob(kit.gnu_tar(small_tree(tmp_path / "src")), "gzip")
    layer = store.import_layer(io.BytesIO(b.data))
    assert (layer.diff_id, layer.compressed_digest, layer.compressed_size) == (b.diff_id, b.digest, b.size)
    assert layer.chain_id == b.diff_id


def test_child_layer_chain_id_and_view(store: LayerStore, tmp_path: Path, kit: Any) -> None:
    base = kit.blob(kit.gnu_tar(small_tree(tmp_path / "src")), "gzip")
    child = kit.blob(child_tar(), "zstd")
    l1 = store.import_layer(io.BytesIO(base.data), expected_diff_id=base.diff_id)
    l2 = store.import_layer(io.BytesIO(child.data), l1.id, expected_diff_id=child.diff_id, names=["child"])
    by_hand = "sha256:" + hashlib.sha256(f"{base.diff_id} {child.diff_id}".encode()).hexdigest()
    assert l2.chain_id == by_hand
    assert l2.parent == l1.id
    assert store.get("child") == l2
    assert store.by_chain_id(by_hand) == l2
    with store.mounted("child") as root:
        assert (root / "etc/hostname").read_bytes() == b"child\n"
        assert not (root / "etc/motd").exists()
        assert not (root / "etc/.wh.motd").exists()
        st = os.lstat(root / "new")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 1000, 1000)
        assert (root / "bin/sh").read_bytes() == b"#!shell\n" * 100
    # the parent's own view is untouched
    with store.mounted(l1.id) as root:
        assert (root / "etc/hostname").read_bytes() == b"box\n"
        assert (root / "etc/motd").read_bytes() == b"hello\n"


def test_library_export_round_trip(store: LayerStore, tmp_path: Path, kit: Any) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_sample_tree(src)
    tar = kit.library_tar(src)
    b = kit.blob(tar, "gzip")
    layer = store.import_layer(io.BytesIO(b.data), expected_diff_id=b.diff_id)
    with store.mounted(layer.id) as root:
        assert diff_snapshots(snapshot_tree(src), snapshot_tree(root)) == []
    with store.diff(layer.id) as stream:
        assert stream.read() == tar  # a canonical tar comes back byte for byte
    assert store.check(verify_content=True).clean


def test_same_layer_twice_stores_nothing_new(store: LayerStore, tmp_path: Path, kit: Any) -> None:
    b = kit.blob(kit.gnu_tar(small_tree(tmp_path / "src")), "gzip")
    first = store.import_layer(io.BytesIO(b.data), expected_diff_id=b.diff_id)

    class Unreadable(io.RawIOBase):
        def readinto(self, buf: Any) -> int:
            raise AssertionError("a known chain ID must not read the blob")

        def readable(self) -> bool:
            return True

    again = store.import_layer(Unreadable(), expected_diff_id=b.diff_id, names=["again"])  # type: ignore[arg-type]
    assert again.id == first.id
    assert again.names == ("again",)
    # without the diff ID up front the blob is applied, found to be a duplicate, and dropped
    third = store.import_layer(io.BytesIO(b.data))
    assert third.id == first.id
    assert [la.id for la in store.layers()] == [first.id]
    assert driver_ids(store) == [first.id]
    assert leftovers(store) == {"rows": [], "locks": [], "staging": []}


@pytest.mark.parametrize(
    "bad",
    ["diff-id", "digest", "size", "truncated", "gzip-crc", "trailing-garbage"],
)
def test_mismatch_leaves_nothing(store: LayerStore, tmp_path: Path, kit: Any, bad: str) -> None:
    from graphdriver.errors import ArchiveError

    b = kit.blob(kit.gnu_tar(small_tree(tmp_path / "src")), "gzip")
    data = b.data
    kwargs: dict[str, Any] = {
        "expected_diff_id": b.diff_id,
        "expected_digest": b.digest,
        "expected_size": b.size,
    }
    expected: type[Exception] = DigestMismatch
    if bad == "diff-id":
        kwargs["expected_diff_id"] = "sha256:" + "0" * 64
    elif bad == "digest":
        kwargs["expected_digest"] = "sha256:" + "0" * 64
    elif bad == "size":
        kwargs["expected_size"] = b.size + 1
    elif bad == "truncated":
        data = data[: len(data) // 2]
        kwargs = {}
        expected = ArchiveError
    elif bad == "gzip-crc":
        data = data[:-8] + bytes([data[-8] ^ 0xFF]) + data[-7:]
        kwargs = {}
        expected = ArchiveError
    elif bad == "trailing-garbage":
        data = data + b"garbage"
        kwargs = {}
        expected = ArchiveError
    with pytest.raises(expected):
        store.import_layer(io.BytesIO(data), **kwargs)
    assert store.layers() == []
    assert driver_ids(store) == []
    assert leftovers(store) == {"rows": [], "locks": [], "staging": []}
    assert store.check().clean


# -- names and container layers ----------------------------------------------------------------


def test_names_are_unique(store: LayerStore, tmp_path: Path, kit: Any) -> None:
    b1 = kit.blob(kit.gnu_tar(small_tree(tmp_path / "one")))
    b2 = kit.blob(child_tar())
    l1 = store.import_layer(io.BytesIO(b1.data), names=["base", "alias"])
    assert store.get("alias") == l1
    with pytest.raises(AlreadyExists, match="base"):
        store.import_layer(io.BytesIO(b2.data), l1.id, names=["base"])
    assert [la.id for la in store.layers()] == [l1.id]
    assert driver_ids(store) == [l1.id]
    with pytest.raises(AlreadyExists):
        store.create_layer(l1.id, names=["alias"])
    with pytest.raises(AlreadyExists):
        store.create_layer(l1.id, id="alias")  # a name cannot be shadowed by an id
    with pytest.raises(InvalidArgument):
        store.import_layer(io.BytesIO(b2.data), l1.id, names=[""])
    store.remove_names("base", ["alias"])
    assert store.get("base").names == ("base",)
    with pytest.raises(NotFound):
        store.get("alias")
    assert leftovers(store) == {"rows": [], "locks": [], "staging": []}


def test_container_layers(store: LayerStore, tmp_path: Path, kit: Any) -> None:
    from graphdriver.archive.types import Change, ChangeKind

    b = kit.blob(kit.gnu_tar(small_tree(tmp_path / "src")))
    image = store.import_layer(io.BytesIO(b.data))
    c = store.create_layer(image.id, id="web-1", names=["web"])
    assert (c.id, c.kind, c.parent, c.names, c.chain_id, c.size) == (
        "web-1",
        LayerKind.CONTAINER,
        image.id,
        ("web",),
        None,
        0,
    )
    with pytest.raises(AlreadyExists):
        store.create_layer(image.id, id="web-1")
    with pytest.raises(InvalidArgument):
        store.create_layer(image.id, id="../escape")
    with pytest.raises(NotFound):
        store.create_layer("no-such-parent")
    with store.mounted("web") as root:
        assert (root / "etc/hostname").read_bytes() == b"box\n"
        (root / "etc/hostname").write_bytes(b"container\n")
        (root / "etc/motd").unlink()
        (root / "data").write_bytes(b"x" * 1000)
    assert store.changes("web") == [
        Change("/data", ChangeKind.ADD),
        Change("/etc", ChangeKind.MODIFY),
        Change("/etc/hostname", ChangeKind.MODIFY),
        Change("/etc/motd", ChangeKind.DELETE),
    ]
    assert store.diff_size("web") == 1000 + len(b"container\n")
    with store.diff("web") as stream, tarfile.open(fileobj=io.BytesIO(stream.read())) as tf:
        names = sorted(m.name for m in tf)
    assert names == ["data", "etc", "etc/.wh.motd", "etc/hostname"]
    # an image layer on nothing, created empty
    empty = store.create_layer(None, read_write=False, names=["scratch"])
    assert empty.kind is LayerKind.IMAGE and empty.parent is None
    store.remove("web")
    store.remove("scratch")
    assert [la.id for la in store.layers()] == [image.id]


# -- mounts -----------------------------------------------------------------------------------


def test_mount_counts_persist_across_instances_and_processes(
    store: LayerStore, store_root: Path, driver_name: str, tmp_path: Path, kit: Any
) -> None:
    b = kit.blob(kit.gnu_tar(small_tree(tmp_path / "src")))
    layer = store.import_layer(io.BytesIO(b.data), names=["l"])
    path = store.mount("l")
    assert store.mount("l") == path
    assert store.get("l").mount_count == 2
    with LayerStore.open(store_root, driver_name) as other:  # a second instance (and its recovery)
        assert other.get("l").mount_count == 2
        assert other.unmount("l") == 1
    out = kit.run_worker("unmount", str(store_root), driver_name, layer.id)
    assert '"count": 0' in out.stdout
    assert store.get("l").mount_count == 0
    if store.driver.capabilities.mounts and kmount.is_mountpoint(path):
        raise AssertionError(f"{path} still mounted after the last unmount")
    with pytest.raises(InvalidArgument, match="not mounted"):
        store.unmount("l")
    out = kit.run_worker("mount", str(store_root), driver_name, layer.id)
    assert store.get("l").mount_count == 1
    assert store.unmount("l", force=False) == 0
    # force drops every count at once
    store.mount("l")
    store.mount("l")
    assert store.unmount("l", force=True) == 0
    assert store.check().clean


def test_external_umount_resets_the_count(
    store_root: Path, mounting_driver: str, tmp_path: Path, kit: Any
) -> None:
    with LayerStore.open(store_root, mounting_driver) as store:
        base = store.import_layer(io.BytesIO(kit.blob(kit.gnu_tar(small_tree(tmp_path / "src"))).data))
        store.create_layer(base.id, names=["c"])
        path = store.mount("c")
        store.mount("c")
        assert kmount.is_mountpoint(path)
        kmount.unmount(path)  # behind the store's back
        assert not store.mount_alive(store.get("c"))
        assert store.mount("c") == path  # remounted, counted from 1
        assert kmount.is_mountpoint(path)
        assert store.get("c").mount_count == 1
        assert (path / "etc/hostname").read_bytes() == b"box\n"
        kmount.unmount(path)
        # unmount of a stale count settles at 0 without error
        assert store.unmount("c") == 0
        assert store.check().clean
        store.mount("c")
        kmount.unmount(path)
    # and a reopened store resets a stale count during recovery
    with LayerStore.open(store_root, mounting_driver) as store:
        assert store.get("c").mount_count == 0
        assert store.check().clean
        store.remove("c")


def test_counts_from_an_earlier_boot_are_stale(
    store: LayerStore, store_root: Path, driver_name: str, tmp_path: Path, kit: Any
) -> None:
    layer = store.import_layer(io.BytesIO(kit.blob(kit.gnu_tar(small_tree(tmp_path / "src"))).data))
    store.mount(layer.id)
    store.unmount(layer.id)
    with store.write() as txn:  # pretend the layer was mounted before a reboot
        txn.set_mount(layer.id, 3, str(tmp_path / "gone"), "plain", "another-boot")
    assert not store.mount_alive(store.get(layer.id))
    store.close()
    with LayerStore.open(store_root, driver_name) as reopened:
        assert reopened.get(layer.id).mount_count == 0
        reopened.remove(layer.id)  # no longer "in use"


def test_remove_refuses_mounted_layers_and_parents(store: LayerStore, tmp_path: Path, kit: Any) -> None:
    base = store.import_layer(io.BytesIO(kit.blob(kit.gnu_tar(small_tree(tmp_path / "src"))).data))
    child = store.import_layer(io.BytesIO(kit.blob(child_tar()).data), base.id)
    with pytest.raises(Busy, match="child"):
        store.remove(base.id)
    store.mount(child.id)
    with pytest.raises(Busy, match="mounted"):
        store.remove(child.id)
    assert store.get(child.id).state == "complete"
    store.unmount(child.id)
    store.remove(child.id)
    store.remove(base.id)
    with pytest.raises(NotFound):
        store.remove(base.id)
    assert store.layers() == []
    assert driver_ids(store) == []
    assert leftovers(store) == {"rows": [], "locks": [], "staging": []}


def test_df_from_recorded_sizes(store: LayerStore, tmp_path: Path, kit: Any) -> None:
    b1 = kit.blob(kit.gnu_tar(small_tree(tmp_path / "src")), "gzip")
    b2 = kit.blob(child_tar(), "zstd")
    l1 = store.import_layer(io.BytesIO(b1.data))
    l2 = store.import_layer(io.BytesIO(b2.data), l1.id)
    store.create_layer(l2.id, names=["c"])
    assert l1.size == store.diff_size(l1.id)
    assert l2.size == store.diff_size(l2.id)
    df = store.df()
    assert (df.layers, df.image_layers, df.container_layers, df.mounted) == (3, 2, 1, 0)
    assert df.size == l1.size + l2.size
    assert df.compressed_size == b1.size + b2.size
    assert df.uncompressed_size == len(b1.tar) + len(b2.tar)


# -- the store itself -------------------------------------------------------------------------


def test_layout_and_schema(store: LayerStore, store_root: Path, driver_name: str) -> None:
    assert stat.S_IMODE(os.stat(store_root).st_mode) == 0o700
    assert (store_root / driver_name).is_dir()
    assert (store_root / "locks").is_dir()
    conn = sqlite3.connect(store_root / "layers.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT value FROM meta WHERE key = 'driver'").fetchone()[0] == driver_name
    finally:
        conn.close()
    other = "overlay2" if driver_name == "vfs" else "vfs"
    with pytest.raises(InvalidArgument, match=f"created with driver {driver_name}"):
        LayerStore.open(store_root, other)


def test_unknown_layers_are_not_found(store: LayerStore) -> None:
    for call in (store.get, store.remove, store.mount, store.unmount, store.changes, store.diff_size):
        with pytest.raises(NotFound, match="nope"):
            call("nope")
