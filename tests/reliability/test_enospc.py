"""ENOSPC: the store root on a small ext4 loop filesystem (64 MiB, no reserved blocks) runs full.

- During an apply (the layer's data does not fit): the import fails with the kernel's ENOSPC as
  an OSError whose message is one line, the partial layer is gone (no record, no driver data, no
  tar-split, nothing in ``staging/``: the store exactly as before), the sentinel beside the store
  untouched, and once space is freed the same import succeeds with the exact content.
- In a metadata commit (the SQLite WAL cannot grow): the operation fails with a one-line error
  naming the full disk, the metadata keeps its previous state, and everything works again once
  space is freed.
- Between the apply and the commit of an import (the importer is stopped at the fault point
  ``import.after-sync`` while the disk is filled, then continued): the commit fails, and after
  space is freed the next open recovers: no layer listed, ``check()`` clean, the import retried
  succeeds.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from graphdriver.layers.store import LayerStore
from graphdriver.testing.loopfs import LoopFilesystem, loop_filesystem
from graphdriver.testing.sentinel import Sentinel
from graphdriver.testing.tarbuild import TarBuilder

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop filesystems need root")

WORKER = Path(__file__).with_name("store_worker.py")
MiB = 1 << 20


@pytest.fixture
def small_fs(rk: Any) -> Iterator[LoopFilesystem]:
    with loop_filesystem("ext4", "64M", mkfs_options=["-m", "0"]) as fs:
        try:
            yield fs
        finally:
            rk.release_mounts(fs.path)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int = 0) -> Path:
    """Allocate a filler file so that about ``leave`` bytes stay free (0: none at all)."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        want = free_bytes(path) - leave
        while want > 0:
            try:
                os.posix_fallocate(fd, os.fstat(fd).st_size, want)
                break
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                want -= MiB  # the allocation's own metadata needs a little room
        if leave == 0:
            for chunk in (1 << 16, 4096, 512, 1):
                try:
                    while True:
                        os.write(fd, bytes(chunk))
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
    finally:
        os.close(fd)
    return filler


def big_layer(tmp: Path, files: int, size: int) -> tuple[Path, dict[str, str]]:
    """A plain tar of ``files`` incompressible files of ``size`` bytes, in a file on /tmp."""
    b = TarBuilder().dir("data")
    digests = {}
    for i in range(files):
        data = os.urandom(size)
        b.file(f"data/f{i}", data)
        digests[f"data/f{i}"] = hashlib.sha256(data).hexdigest()
    path = tmp / "big.tar"
    path.write_bytes(b.build())
    return path, digests


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text.strip() == text and text, repr(text)
    return text


def l0() -> bytes:
    return TarBuilder().dir("etc").file("etc/hostname", b"small\n").build()


def test_enospc_during_apply(
    driver_name: str, small_fs: LoopFilesystem, tmp_path: Path, rk: Any
) -> None:
    """The failed import is rolled back at once: the space is free again, the store as before."""
    base = small_fs.path
    sentinel = Sentinel(base, exclude=("store", "filler"))
    blob, digests = big_layer(tmp_path, 3, 8 * MiB)
    with LayerStore.open(base / "store", driver_name) as store:
        top = store.import_layer(io.BytesIO(l0())).id
        filler = fill(base, leave=12 * MiB)
        sentinel.arm()
        before = rk.capture(store)
        for parent in (None, top):
            with open(blob, "rb") as f, pytest.raises(OSError) as info:
                store.import_layer(f, parent)
            assert info.value.errno == errno.ENOSPC
            assert "No space left on device" in one_line(info.value)
            sentinel.assert_intact(scan=[base / "store"])
            assert free_bytes(base) >= 11 * MiB  # the partial layer's space came back
            rk.assert_unchanged(store, before)
        filler.unlink()
        with open(blob, "rb") as f:
            layer = store.import_layer(f, top)
        with store.mounted(layer.id) as view:
            got = {p: hashlib.sha256((view / p).read_bytes()).hexdigest() for p in digests}
            assert got == digests
            assert (view / "etc/hostname").read_bytes() == b"small\n"
        assert store.check(verify_content=True).clean


def test_enospc_during_apply_then_reopen(
    driver_name: str, small_fs: LoopFilesystem, tmp_path: Path, rk: Any
) -> None:
    """Whatever the failed import left, freeing space and reopening gives the store as it was,
    and the import succeeds with the exact content."""
    base = small_fs.path
    sentinel = Sentinel(base, exclude=("store", "filler"))
    blob, digests = big_layer(tmp_path, 3, 8 * MiB)
    root = base / "store"
    with LayerStore.open(root, driver_name) as store:
        top = store.import_layer(io.BytesIO(l0())).id
        filler = fill(base, leave=12 * MiB)
        sentinel.arm()
        before = rk.capture(store)
        with open(blob, "rb") as f, pytest.raises(OSError) as info:
            store.import_layer(f, top)
        assert info.value.errno == errno.ENOSPC
        assert store.layers() == [la for la in before.records]
    filler.unlink()
    with LayerStore.open(root, driver_name) as store:
        rk.assert_unchanged(store, before)
        sentinel.assert_intact(scan=[root])
        with open(blob, "rb") as f:
            layer = store.import_layer(f, top)
        with store.mounted(layer.id) as view:
            got = {p: hashlib.sha256((view / p).read_bytes()).hexdigest() for p in digests}
        assert got == digests
        assert store.check(verify_content=True).clean


def test_enospc_in_a_metadata_commit(small_fs: LoopFilesystem, rk: Any) -> None:
    base = small_fs.path
    with LayerStore.open(base / "store", "vfs") as store:
        layer = store.import_layer(io.BytesIO(l0()), names=["L0"])
        filler = fill(base)
        before = rk.capture(store)
        names = [f"name-{i}-" + "n" * 200 for i in range(400)]
        with pytest.raises(OSError) as info:
            store.add_names(layer.id, names)
        assert info.value.errno == errno.ENOSPC
        assert "disk is full" in one_line(info.value)
        # nothing else works either, and each refusal is ENOSPC and leaves the store as it was
        with pytest.raises(OSError) as info:
            store.create_layer(layer.id)
        assert info.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as info:
            store.import_layer(io.BytesIO(TarBuilder().file("x", b"x").build()))
        assert info.value.errno == errno.ENOSPC
        filler.unlink()
        rk.assert_unchanged(store, before)
        assert store.get(layer.id).names == ("L0",)
        store.add_names(layer.id, names)
        assert len(store.get(layer.id).names) == 401
    with LayerStore.open(base / "store", "vfs") as store:
        assert store.recovery is not None and store.recovery.nothing_done
        assert store.check().clean


def test_full_disk_in_a_commit_is_enospc_not_corruption(small_fs: LoopFilesystem) -> None:
    base = small_fs.path
    with LayerStore.open(base / "store", "vfs") as store:
        layer = store.import_layer(io.BytesIO(l0()))
        fill(base)
        with pytest.raises(OSError) as info:
            store.add_names(layer.id, [f"name-{i}-" + "n" * 200 for i in range(400)])
        assert info.value.errno == errno.ENOSPC


def test_enospc_between_apply_and_commit(small_fs: LoopFilesystem, tmp_path: Path, rk: Any) -> None:
    base = small_fs.path
    root = base / "store"
    blob_path = tmp_path / "layer.tar"
    blob_path.write_bytes(TarBuilder().file("payload", os.urandom(MiB)).build())
    with LayerStore.open(root, "vfs") as store:
        store.import_layer(io.BytesIO(l0()))
        before = rk.capture(store)
    env = dict(os.environ, GRAPHDRIVER_FAULT="import.after-sync:stop")
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "import", str(root), "vfs", str(blob_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), status
        filler = fill(base)
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, (proc.returncode, out, err)
    result = json.loads(out)
    assert "disk is full" in result["message"] or result["errno"] == errno.ENOSPC, result
    filler.unlink()
    with LayerStore.open(root, "vfs") as store:
        rk.assert_unchanged(store, before)
        with open(blob_path, "rb") as f:
            layer = store.import_layer(f)
        assert store.check(verify_content=True).clean
        assert [la.id for la in store.layers()][-1] == layer.id
