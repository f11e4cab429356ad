"""Removal never follows a link out of the store, never deletes through a mount, and leaked mounts
are cleaned when the store is opened.

Symlinks to the sentinel tree beside the store (absolute, relative climbing to ``/`` and down,
to its directories and to its files) are planted everywhere the store deletes: inside layer
data, in an overlay2 layer's ``work/`` and in place of its ``merged/`` dir, as the tar-split
file, as crashed leftovers in the driver home and in ``staging/``, in orphan driver data. Then
``remove``, ``prune``, ``check(repair=True)``, the driver's ``cleanup`` and the recovery of an
open run, and the sentinel must be untouched byte for byte and stat for stat. A bind mount of the
sentinel inside a layer or a staging dir stands for a leaked mount: deleting must refuse (Busy)
or unmount first, never empty the sentinel through it.

Leaked mounts (overlay2): a process holding a mount through the store is SIGKILLed, or killed
between the driver's mount and the count; reopening leaves no mount the metadata does not count,
and the last unmount leaves nothing mounted.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from graphdriver import mount as kmount
from graphdriver.errors import Busy
from graphdriver.layers.check import ProblemKind
from graphdriver.layers.metadata import LayerState
from graphdriver.layers.store import LayerStore
from graphdriver.testing.tarbuild import TarBuilder

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the store and its mounts run as root here")

WORKER = Path(__file__).with_name("store_worker.py")
ORPHAN_ID = "f" * 64


def plant(directory: Path, base: Path) -> None:
    """Links to the sentinel in ``directory`` (created if needed), and a subdirectory of them."""
    directory.mkdir(parents=True, exist_ok=True)
    climb = "../" * 40 + str(base).lstrip("/")
    links = {
        "abs-dir": f"{base}/victim",
        "abs-file": f"{base}/victim/hello",
        "abs-evil": f"{base}/victim-evil",
        "rel-dir": f"{climb}/victim",
        "rel-file": f"{climb}/victim/dir/inner",
    }
    for sub in ("", "sub/deeper/"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
        for name, target in links.items():
            path = directory / f"{sub}{name}"
            if not os.path.lexists(path):
                os.symlink(target, path)


def layer_dirs(store: LayerStore, layer_id: str) -> list[Path]:
    """The directories the driver keeps a layer's data in."""
    home = store.driver.home
    if store.driver.name == "overlay2":
        d = home / layer_id
        return [p for p in (d / "diff", d / "work") if p.is_dir()]
    return [home / "dir" / layer_id]


def bind(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    kmount.mount(str(source), target, None, kmount.MS_BIND)


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def stack(store: LayerStore) -> tuple[str, str, str]:
    """L0 <- L1 (image layers) <- C (container layer), each with content."""
    l0 = store.import_layer(io.BytesIO(TarBuilder().dir("etc").file("etc/a", b"a").build())).id
    l1 = store.import_layer(io.BytesIO(TarBuilder().file("etc/b", b"b").dir("opt").build()), l0).id
    c = store.create_layer(l1).id
    with store.mounted(c) as view:
        (view / "etc/c").write_bytes(b"container")
    return l0, l1, c


def test_remove_and_prune_never_follow_planted_links(driver_name: str, arena: Any, rk: Any) -> None:
    base = arena.base
    with LayerStore.open(arena.root, driver_name) as store:
        layers = stack(store)
        for lid in layers:
            for d in layer_dirs(store, lid):
                plant(d / "planted", base)
            split = store.tarsplit_path(lid)
            split.unlink(missing_ok=True)
            os.symlink(f"{base}/victim/hello", split)
        if driver_name == "overlay2":
            merged = store.driver.home / layers[2] / "merged"
            if merged.is_dir():
                merged.rmdir()
            os.symlink(f"{base}/victim", merged)
        arena.sentinel.arm()
        store.remove(layers[2])
        arena.sentinel.assert_intact(scan=[arena.root])
        from graphdriver.images.imagestore import ImageStore

        ImageStore(store).prune()  # L1 and L0: no image or container uses them
        arena.sentinel.assert_intact(scan=[arena.root])
        assert store.layers() == []
        assert store.check().clean
        assert not kmount.mounts_under(base)


def test_mount_point_replaced_by_a_link_is_not_followed(mounting_driver: str, arena: Any) -> None:
    """A layer's merged/ swapped for a link to the sentinel: the mount must not land there."""
    with LayerStore.open(arena.root, mounting_driver) as store:
        _, _, c = stack(store)
        merged = store.driver.home / c / "merged"
        if merged.is_dir():
            merged.rmdir()
        os.symlink(f"{arena.base}/victim", merged)
        arena.sentinel.arm()
        try:
            path = store.mount(c)
        except Exception:  # refusing is fine
            path = None
        try:
            assert not kmount.is_mountpoint(arena.base / "victim"), "the overlay was mounted on the sentinel"
            arena.sentinel.assert_intact()
        finally:
            if path is not None:
                store.unmount(c)
            for m in kmount.mounts_under(arena.base / "victim"):
                kmount.unmount(m.mount_point, detach=True)


def test_staging_leftovers_with_links_and_mounts(driver_name: str, arena: Any) -> None:
    base = arena.base
    with LayerStore.open(arena.root, driver_name) as store:
        staging = store.staging_root
    os.symlink(f"{base}/victim", staging / "stage-link")
    plant(staging / "stage-dir", base)
    plant(staging / "stage-mnt", base)
    bind(base / "victim", staging / "stage-mnt/bound")
    arena.sentinel.arm()
    try:
        with LayerStore.open(arena.root, driver_name) as store:  # recovery cleans staging/
            arena.sentinel.assert_intact()
            assert os.listdir(staging) == []
            assert not kmount.mounts_under(staging)
            assert not kmount.is_mountpoint(base / "victim")
            assert store.check().clean
    finally:
        for m in kmount.mounts_under(staging):
            kmount.unmount(m.mount_point, detach=True)
    arena.sentinel.assert_intact()


def test_staging_lock_replaced_by_a_link(driver_name: str, arena: Any) -> None:
    with LayerStore.open(arena.root, driver_name) as store:
        staging = store.staging_root
    plant(staging / "stage-lock", arena.base)
    os.symlink(f"{arena.base}/victim/hello", staging / "stage-lock.lock")
    arena.sentinel.arm()
    try:
        with LayerStore.open(arena.root, driver_name) as store:
            assert store.check().clean
    finally:
        arena.sentinel.assert_intact()


def test_driver_home_leftovers_with_links(driver_name: str, arena: Any) -> None:
    base = arena.base
    with LayerStore.open(arena.root, driver_name) as store:
        home = store.driver.home
        pid = dead_pid()
    if driver_name == "overlay2":
        os.symlink(f"{base}/victim", home / f".tmp-create-{pid}-link")
        plant(home / f".tmp-create-{pid}-dir", base)
        plant(home / f".rm-{pid}-{ORPHAN_ID}-dir", base)
        os.symlink(f"{base}/victim", home / "l" / ("A" * 26))
    else:
        (home / "dir").mkdir(exist_ok=True)
        os.symlink(f"{base}/victim", home / "dir" / f".tmp-{ORPHAN_ID}-link")
        plant(home / "dir" / f".tmp-{ORPHAN_ID}-dir", base)
        plant(home / "dir" / f".rm-{ORPHAN_ID}-dir", base)
    arena.sentinel.arm()
    with LayerStore.open(arena.root, driver_name) as store:
        arena.sentinel.assert_intact()
        store.driver.cleanup()  # leftovers go, links removed without being followed
        arena.sentinel.assert_intact()
        leftovers = home if driver_name == "overlay2" else home / "dir"
        assert not [n for n in os.listdir(leftovers) if n.startswith((".tmp-", ".rm-"))]
        store.check(repair=True)
        arena.sentinel.assert_intact()


def test_orphan_data_repair_never_follows_links(driver_name: str, arena: Any) -> None:
    base = arena.base
    with LayerStore.open(arena.root, driver_name) as store:
        l0 = store.import_layer(io.BytesIO(TarBuilder().file("x", b"x").build())).id
        home = store.driver.home
        if driver_name == "overlay2":
            orphan = home / ORPHAN_ID
            plant(orphan / "diff", base)
            plant(orphan / "work", base)
            (orphan / "link").write_text("../../victim")
            (orphan / "lower").write_text(f"l/../../../victim:{base}/victim")
            (orphan / "parent").write_text(l0)
        else:
            plant(home / "dir" / ORPHAN_ID, base)
        os.symlink(f"{base}/victim/hello", store.tarsplit_root / f"{ORPHAN_ID}.tsplit.zst")
        arena.sentinel.arm()
        report = store.check(repair=True)
        arena.sentinel.assert_intact(scan=[arena.root])
        assert {p.kind for p in report.problems} == {ProblemKind.ORPHAN_DATA}
        assert all(p.repaired for p in report.problems), [str(p) for p in report.problems]
        assert not os.path.lexists(home / ORPHAN_ID) and not os.path.lexists(home / "dir" / ORPHAN_ID)
        assert store.check().clean


def test_recovery_of_a_crashed_import_never_follows_links(
    driver_name: str, arena: Any, tmp_path: Path
) -> None:
    blob = tmp_path / "layer.tar"
    blob.write_bytes(TarBuilder().file("payload", b"p" * 100_000).build())
    LayerStore.open(arena.root, driver_name).close()
    env = dict(os.environ, GRAPHDRIVER_FAULT="import.after-apply:kill")
    proc = subprocess.run(
        [sys.executable, str(WORKER), "import", str(arena.root), driver_name, str(blob)],
        env=env,
        capture_output=True,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with LayerStore.open(arena.root, driver_name, recover=False) as store:
        with store.db.read() as txn:
            crashed = [la.id for la in txn.all() if la.state is LayerState.INCOMPLETE]
        assert len(crashed) == 1
        for d in layer_dirs(store, crashed[0]):
            plant(d / "planted", arena.base)
    arena.sentinel.arm()
    with LayerStore.open(arena.root, driver_name) as store:
        assert store.recovery is not None and store.recovery.removed == crashed
        arena.sentinel.assert_intact(scan=[arena.root])
        assert store.check().clean


def test_deleting_through_a_leaked_bind_mount_is_refused(driver_name: str, arena: Any) -> None:
    """A bind mount of the sentinel left inside a layer: remove says Busy, deletes nothing, and
    the layer stays; unmounted, the removal goes through."""
    with LayerStore.open(arena.root, driver_name) as store:
        l0 = store.import_layer(io.BytesIO(TarBuilder().file("x", b"x").build())).id
        target = layer_dirs(store, l0)[0] / "leaked"
        bind(arena.base / "victim", target)
        arena.sentinel.arm()
        try:
            with pytest.raises(Busy, match="mount"):
                store.remove(l0)
            arena.sentinel.assert_intact()
            assert [la.id for la in store.layers()] == [l0]
        finally:
            for m in kmount.mounts_under(arena.root):
                kmount.unmount(m.mount_point, detach=True)
        store.remove(l0)
        arena.sentinel.assert_intact(scan=[arena.root])
        assert store.layers() == [] and store.check().clean


# -- leaked mounts after a crash (overlay2) -----------------------------------------------------


def hold_mount(root: Path, layer: str, fault: str | None = None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "GRAPHDRIVER_FAULT"}
    if fault:
        env["GRAPHDRIVER_FAULT"] = fault
    return subprocess.Popen(
        [sys.executable, str(WORKER), "mount-and-hold", str(root), "overlay2", layer],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def counted_mounts(store: LayerStore) -> set[str]:
    return {
        la.mount_point
        for la in store.layers()
        if la.mount_point and la.mount_kind == "mount" and store.mount_alive(la)
    }


def test_sigkill_while_holding_a_mount(mounting_driver: str, arena: Any) -> None:
    with LayerStore.open(arena.root, mounting_driver) as store:
        _, _, c = stack(store)
    proc = hold_mount(arena.root, c)
    try:
        assert proc.stdout is not None
        path = json.loads(proc.stdout.readline())["path"]
        assert kmount.is_mountpoint(path)
    finally:
        proc.kill()
        proc.wait()
    with LayerStore.open(arena.root, mounting_driver) as store:
        under = {m.mount_point for m in kmount.mounts_under(arena.root)}
        assert under == counted_mounts(store) == {path}  # counted, so not leaked: anyone can release it
        assert store.get(c).mount_count == 1
        assert store.check().clean
        assert store.unmount(c) == 0
        assert not kmount.mounts_under(arena.root)
        store.remove(c)
        assert store.check().clean


def test_sigkill_between_mount_and_count(mounting_driver: str, arena: Any) -> None:
    with LayerStore.open(arena.root, mounting_driver) as store:
        _, _, c = stack(store)
    proc = hold_mount(arena.root, c, fault="mount.after-get:kill")
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert kmount.mounts_under(arena.root), "the driver's mount should be there, uncounted"
    with LayerStore.open(arena.root, mounting_driver) as store:
        assert store.recovery is not None and store.recovery.reset_mounts == [c]
        assert not kmount.mounts_under(arena.root)
        assert store.get(c).mount_count == 0
        assert store.check().clean
        with store.mounted(c) as view:  # and it mounts again
            assert (view / "etc/c").read_bytes() == b"container"
        assert not kmount.mounts_under(arena.root)


def test_lock_file_replaced_by_a_link(driver_name: str, arena: Any) -> None:
    """A layer's lock file swapped for a link to the sentinel's file: locks never follow it."""
    with LayerStore.open(arena.root, driver_name) as store:
        l0 = store.import_layer(io.BytesIO(TarBuilder().file("x", b"x").build())).id
        lock_path = store.locks.layer(l0).path
        lock_path.unlink(missing_ok=True)
        os.symlink(f"{arena.base}/victim/hello", lock_path)
        arena.sentinel.arm()
        try:
            store.remove(l0)
        except OSError:
            pass  # refusing is fine
        arena.sentinel.assert_intact()
