"""Crash consistency: SIGKILL a store process at every step, reopen, and find a consistent store.

Each case starts a real process (``layer_worker.py``) with ``GRAPHDRIVER_FAULT=<point>:kill`` so
that it kills itself at that exact step of an import, a create, a remove, a mount, an unmount or
a recovery. The store is then reopened (which runs recovery) and must show: no incomplete or
half-removed layer, ``check()`` clean, no leaked mount, the driver holding exactly the listed
layers, and the operation, retried, succeeding. One case feeds the blob through a pipe and stops
the importer half way through the apply, to show that a concurrent open leaves an import that is
still running alone, before the importer is killed.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from graphdriver import mount as kmount
from graphdriver.layers import faults
from graphdriver.layers.check import driver_layer_ids
from graphdriver.layers.metadata import LayerState
from graphdriver.layers.store import LayerStore

PRIMARY = "overlay2"
"""The driver every fault point runs on (vfs when overlay2 does not work here)."""
SECONDARY_POINTS = {
    "import.after-record",
    "import.after-create",
    "import.apply-mid",
    "import.after-sync",
    "import.in-commit",
    "import.after-discard",
    "create.after-create",
    "remove.after-mark",
    "remove.after-driver-remove",
    "mount.after-get",
    "unmount.after-put",
    "recovery.after-remove-one",
}
"""The points that also run on the other drivers (their create/remove steps differ), so that
the matrix stays within the suite's time budget."""


@pytest.fixture(autouse=True)
def _matrix(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, kit: Any) -> None:
    params = getattr(request.node, "callspec", None)
    if params is None or "driver_name" not in params.params:
        return
    driver, point = params.params["driver_name"], params.params.get("point")
    if driver == PRIMARY or point is None or point in SECONDARY_POINTS:
        return
    if kit.driver_unsupported(PRIMARY, tmp_path_factory.getbasetemp()) is None:
        pytest.skip(f"every fault point runs on {PRIMARY}; on {driver} a subset")


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


@dataclass
class Setup:
    root: Path
    driver: str
    base: str
    base_blob: Any
    child_blob: Any
    child_file: Path
    child: str | None = None
    container: str | None = None


def _setup(
    tmp_path: Path,
    driver: str,
    kit: Any,
    *,
    child: bool = False,
    container: bool = False,
    mounted: bool = False,
) -> Setup:
    root = tmp_path / "store"
    base_blob = kit.blob(_tar({"etc/hostname": b"base\n", "etc/motd": b"motd\n"}), "gzip")
    # 512 KiB of incompressible data: an apply that takes several reads of the blob
    child_blob = kit.blob(_tar({"big": os.urandom(512 << 10), "etc/hostname": b"child\n"}), "gzip")
    child_file = child_blob.write(tmp_path / "child.blob")
    with LayerStore.open(root, driver) as store:
        base = store.import_layer(
            io.BytesIO(base_blob.data), expected_diff_id=base_blob.diff_id, names=["base"]
        )
        s = Setup(root, driver, base.id, base_blob, child_blob, child_file)
        if child:
            s.child = store.import_layer(io.BytesIO(child_blob.data), base.id, names=["child"]).id
        if container:
            s.container = store.create_layer(base.id, id="ctr").id
            if mounted:
                store.mount("ctr")
    return s


def _assert_consistent(s: Setup) -> LayerStore:
    """Reopen (recovery runs) and check every invariant; returns the open store."""
    store = LayerStore.open(s.root, s.driver)
    with store.db.read() as txn:
        states = {la.id: la.state for la in txn.all()}
    assert all(st is LayerState.COMPLETE for st in states.values()), states
    listed = sorted(la.id for la in store.layers())
    assert sorted(states) == listed
    assert driver_layer_ids(store) == listed
    report = store.check()
    assert report.clean, [str(p) for p in report.problems]
    live = {la.mount_point for la in store.layers() if store.mount_alive(la) and la.mount_kind == "mount"}
    leaked = [m.mount_point for m in kmount.mounts_under(s.root) if m.mount_point not in live]
    assert leaked == []
    chains = [la.chain_id for la in store.layers() if la.chain_id]
    assert len(chains) == len(set(chains))
    return store


def _kill_at(s: Setup, kit: Any, point: str, *args: str) -> None:
    proc = kit.run_worker(*args, env={"GRAPHDRIVER_FAULT": f"{point}:kill"}, check=False)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)


def _import_child(s: Setup, kit: Any, *, fault: str | None = None, known: bool = True) -> None:
    args = ["import", str(s.root), s.driver, str(s.child_file), "--parent", s.base]
    if known:
        args += ["--diff-id", s.child_blob.diff_id, "--digest", s.child_blob.digest]
    if fault:
        _kill_at(s, kit, fault, *args)
        return
    # the retry runs in this process (the store is shared all the same)
    with LayerStore.open(s.root, s.driver) as store, open(s.child_file, "rb") as f:
        layer = store.import_layer(
            f,
            s.base,
            expected_diff_id=s.child_blob.diff_id if known else None,
            expected_digest=s.child_blob.digest if known else None,
        )
        assert layer.diff_id == s.child_blob.diff_id


IMPORT_POINTS = [
    "import.before-record",
    "import.after-record",
    "import.after-create",
    "import.apply-start",
    "import.apply-mid",
    "import.after-apply",
    "import.after-drain",
    "import.after-verify",
    "import.after-sync",
    "import.in-commit",
    "import.after-commit",
]


@pytest.mark.parametrize("point", IMPORT_POINTS)
def test_kill_during_import(tmp_path: Path, driver_name: str, kit: Any, point: str) -> None:
    s = _setup(tmp_path, driver_name, kit)
    _import_child(s, kit, fault=point)
    with _assert_consistent(s) as store:
        committed = store.by_chain_id(_child_chain(s))
        assert (committed is not None) == (point == "import.after-commit")
    _import_child(s, kit)  # the retry succeeds (or finds the committed layer)
    with _assert_consistent(s) as store:
        layer = store.by_chain_id(_child_chain(s))
        assert layer is not None
        with store.mounted(layer.id) as root:
            assert (root / "etc/hostname").read_bytes() == b"child\n"
            assert (root / "etc/motd").read_bytes() == b"motd\n"
        assert len(store.layers()) == 2


def _child_chain(s: Setup) -> str:
    from graphdriver.layers import chain_id

    return chain_id(s.base_blob.diff_id, s.child_blob.diff_id)


@pytest.mark.parametrize("point", ["import.after-discard"])
def test_kill_after_dropping_a_duplicate(tmp_path: Path, driver_name: str, kit: Any, point: str) -> None:
    s = _setup(tmp_path, driver_name, kit, child=True)
    _import_child(s, kit, fault=point, known=False)
    with _assert_consistent(s) as store:
        assert [la.id for la in store.layers()] == [s.base, s.child]
    _import_child(s, kit, known=False)
    _assert_consistent(s).close()


@pytest.mark.parametrize("point", ["create.after-record", "create.after-create", "create.after-commit"])
def test_kill_during_create(tmp_path: Path, driver_name: str, kit: Any, point: str) -> None:
    s = _setup(tmp_path, driver_name, kit)
    _kill_at(s, kit, point, "create", str(s.root), s.driver, "--parent", s.base, "--id", "ctr")
    with _assert_consistent(s) as store:
        assert ("ctr" in {la.id for la in store.layers()}) == (point == "create.after-commit")
        if point == "create.after-commit":
            store.remove("ctr")
    with LayerStore.open(s.root, s.driver) as store:
        store.create_layer(s.base, id="ctr")
    with _assert_consistent(s) as store:
        assert store.get("ctr").parent == s.base


@pytest.mark.parametrize("point", ["remove.after-mark", "remove.after-driver-remove", "remove.after-delete"])
def test_kill_during_remove(tmp_path: Path, driver_name: str, kit: Any, point: str) -> None:
    s = _setup(tmp_path, driver_name, kit, child=True)
    assert s.child is not None
    _kill_at(s, kit, point, "remove", str(s.root), s.driver, s.child)
    with _assert_consistent(s) as store:
        assert [la.id for la in store.layers()] == [s.base]  # a half-removed layer is never listed
    # the retry: importing the layer again works, and so does removing it again
    _import_child(s, kit)
    with _assert_consistent(s) as store:
        child = store.by_chain_id(_child_chain(s))
        assert child is not None
        store.remove(child.id)
    _assert_consistent(s).close()


@pytest.mark.parametrize("target", ["ctr", "base"])
@pytest.mark.parametrize("point", ["mount.after-get", "mount.after-record", "unmount.after-put"])
def test_kill_during_mount_and_unmount(
    tmp_path: Path, driver_name: str, kit: Any, point: str, target: str
) -> None:
    """On a container layer (overlay2 mounts it) and on a base layer (overlay2 hands out its
    diff/ unmounted but counts the get): neither a leaked mount nor a get nobody can put stays."""
    s = _setup(tmp_path, driver_name, kit, container=True)
    if point.startswith("unmount"):
        with LayerStore.open(s.root, s.driver) as store:
            store.mount(target)
    op = "unmount" if point.startswith("unmount") else "mount"
    _kill_at(s, kit, point, op, str(s.root), s.driver, target)
    with _assert_consistent(s) as store:
        assert store.get(target).mount_count >= 0
        # the retry: mount and unmount balance, and nothing stays mounted
        path = store.mount(target)
        assert (path / "etc/hostname").read_bytes() == b"base\n"
        while store.get(target).mount_count > 0:
            store.unmount(target)
        assert not kmount.mounts_under(s.root)
        # and nothing is left "in use": both layers can be removed
        store.remove("ctr")
        store.remove("base")
    _assert_consistent(s).close()


@pytest.mark.parametrize("point", ["recovery.after-mark", "recovery.after-remove-one"])
def test_kill_during_recovery(tmp_path: Path, driver_name: str, kit: Any, point: str) -> None:
    s = _setup(tmp_path, driver_name, kit, container=True)
    _kill_at(
        s, kit, "import.after-apply", "import", str(s.root), s.driver, str(s.child_file), "--parent", s.base
    )
    _kill_at(s, kit, "create.after-create", "create", str(s.root), s.driver, "--parent", s.base, "--id", "c2")
    _kill_at(s, kit, point, "open", str(s.root), s.driver)  # the recovery itself dies
    _import_child(s, kit)
    with LayerStore.open(s.root, s.driver) as store:
        store.create_layer(s.base, id="c2")
    with _assert_consistent(s) as store:
        assert {la.id for la in store.layers()} >= {"c2", "ctr", s.base}


def test_stopped_import_is_left_alone_then_killed(tmp_path: Path, driver_name: str, kit: Any) -> None:
    """An import still running in another process (here: stopped half way through its apply, reading
    its blob from a slow pipe) is never taken for a crash; once killed, it is cleaned up."""
    s = _setup(tmp_path, driver_name, kit)
    env = dict(os.environ, GRAPHDRIVER_FAULT="import.apply-mid:stop@2")
    proc = subprocess.Popen(
        [sys.executable, str(kit.worker), "import", str(s.root), s.driver, "-", "--parent", s.base],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None
    half = s.child_blob.data[: len(s.child_blob.data) * 3 // 4]

    def feed() -> None:
        try:
            assert proc.stdin is not None
            proc.stdin.write(half)
            proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), status
        with LayerStore.open(s.root, s.driver) as store:  # recovery runs, and must leave it alone
            with store.db.read() as txn:
                building = [la for la in txn.all() if la.state is LayerState.INCOMPLETE]
            assert len(building) == 1
            assert store.driver.exists(building[0].id)
            assert [la.id for la in store.layers()] == [s.base]  # never listed
            assert store.check().clean  # an import in progress is not a problem
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        writer.join()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    _assert_consistent(s).close()
    _import_child(s, kit)
    _assert_consistent(s).close()


def test_fault_points_are_all_exercised_and_named() -> None:
    """Every fault point the store has is reached by a case above (so none is dead), and an
    unknown point in the environment is refused rather than silently ignored."""
    covered = {
        *IMPORT_POINTS,
        "import.after-discard",
        "create.after-record",
        "create.after-create",
        "create.after-commit",
        "remove.after-mark",
        "remove.after-driver-remove",
        "remove.after-delete",
        "mount.after-get",
        "mount.after-record",
        "unmount.after-put",
        "recovery.after-mark",
        "recovery.after-remove-one",
    }
    assert covered == set(faults.POINTS)
    assert len(covered) >= 20
    from graphdriver.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="unknown fault point"):
        faults.parse("import.no-such-step:kill")
    with pytest.raises(InvalidArgument, match="unknown action"):
        faults.parse("import.after-create:explode")


def test_injected_exception_rolls_back_in_process(tmp_path: Path, driver_name: str, kit: Any) -> None:
    """An unexpected error (not a crash) at each import step leaves nothing behind either."""
    s = _setup(tmp_path, driver_name, kit)
    with LayerStore.open(s.root, s.driver) as store:
        for point in IMPORT_POINTS:
            if point == "import.after-commit":
                continue
            with faults.injected(f"{point}:raise"), pytest.raises(faults.InjectedFaultError):
                store.import_layer(io.BytesIO(s.child_blob.data), s.base)
            assert [la.id for la in store.layers()] == [s.base], point
            assert store.check().clean, point
    _assert_consistent(s).close()
