"""Pulls whose layers are applied in parallel (``parallel_apply``, LayerStore.import_layers).

On overlay2 a pull applies the missing layers at the same time, each in a forked worker that
follows its blob's spool file while a download thread writes it. These tests pin what a user
relies on: the same layers, tree and records as a one-by-one pull; layers the store has are not
downloaded; bad bytes and short blobs store nothing and report the download's own error; a pull
killed while its workers apply leaves a store that the next open cleans and the next pull fills.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from graphdriver.errors import CorruptStream, DigestMismatch
from graphdriver.images.imagestore import ImageStore
from graphdriver.layers.store import LayerStore
from graphdriver.registry.client import RetryPolicy
from graphdriver.registry.progress import Event
from graphdriver.registry.pull import PullOptions, pull
from graphdriver.registry.push import PushOptions, push_image
from graphdriver.testing.registry_server import Fault, FaultProxy, RegistryServer
from graphdriver.testing.tarbuild import TarBuilder, compress
from graphdriver.testing.trees import diff_snapshots

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05, max_retry_after=2.0)
T = 1_700_000_000
BLOB = r"/blobs/sha256:"


def opts(**kw: Any) -> PullOptions:
    kw.setdefault("insecure", True)
    kw.setdefault("retry", FAST)
    return PullOptions(**kw)


def stack_blobs() -> list[bytes]:
    """Three layers: a base, one with a whiteout, an opaque dir and a hard link, a big top."""
    base = (
        TarBuilder()
        .dir(".", mode=0o755, mtime=T)
        .dir("etc", mode=0o755, mtime=T)
        .file("etc/a", b"a\n", mode=0o644, mtime=T)
        .file("etc/gone", b"gone\n", mode=0o644, mtime=T)
        .dir("data", mode=0o750, uid=7, gid=8, mtime=T)
        .file("data/old", b"old\n", mtime=T)
        .build()
    )
    middle = (
        TarBuilder()
        .dir(".", mode=0o755, mtime=T + 1)
        .dir("etc", mode=0o755, mtime=T + 1)
        .whiteout("etc/gone")
        .file("etc/b", b"b\n", mode=0o600, uid=1000, gid=1000, mtime_ns=T * 10**9 + 5,
              xattrs={"user.k": b"v"})
        .dir("data", mode=0o750, uid=7, gid=8, mtime=T + 1)
        .opaque("data")
        .file("data/new", b"new\n", mtime=T)
        .hardlink("data/new-link", "data/new", mtime=T)
        .build()
    )
    top = TarBuilder().dir(".", mode=0o755, mtime=T + 2).dir("big", mode=0o755, mtime=T)
    top.file("big/random", os.urandom(3 << 20), mtime=T)
    return [compress(base, "gzip"), compress(middle, "zstd"), top.build()]


def publish(kit: Any, registry: RegistryServer, blobs: list[bytes]) -> tuple[str, Any, Any]:
    src = kit.store("src")
    img = kit.image(src, blobs)
    name = f"{kit.repo()}:1"
    pushed = push_image(
        src, f"{registry.host}/{name}", config=img.config, layers=img.layers,
        options=PushOptions(insecure=True),
    )
    return name, img, pushed


def assert_clean(store: LayerStore, *, layers: int = 0) -> None:
    report = store.check()
    assert not report.problems, report.problems
    with store.db.read() as txn:
        rows = txn.conn.execute("SELECT state, count(*) FROM layers GROUP BY state").fetchall()
    assert dict(rows) == ({"complete": layers} if layers else {})
    assert [p for p in os.listdir(store.staging_root) if not p.endswith(".lock")] == []


def test_parallel_pull_equals_a_one_by_one_pull(kit: Any, registry: RegistryServer) -> None:
    name, img, pushed = publish(kit, registry, stack_blobs())
    ref = f"{registry.host}/{name}"
    events: list[Event] = []
    par = kit.store("par", "overlay2")
    got = pull(par, ref, opts(parallel_apply=True), sink=events.append)
    one = kit.store("one", "overlay2")
    serial = pull(one, ref, opts(parallel_apply=False))
    digests = [b.descriptor.digest for b in pushed.layers]
    assert [la.chain_id for la in got.layers] == img.chain_ids == [la.chain_id for la in serial.layers]
    assert sorted(got.downloaded) == sorted(digests)
    for a, b in zip(got.layers, serial.layers, strict=True):
        assert (a.diff_id, a.compressed_digest, a.compressed_size, a.uncompressed_size, a.size) == (
            b.diff_id,
            b.compressed_digest,
            b.compressed_size,
            b.uncompressed_size,
            b.size,
        )
    src_tree = kit.rootfs(kit.store("src"), img.layers[-1])
    assert diff_snapshots(src_tree, kit.rootfs(par, got.layers[-1].id)) == []
    assert diff_snapshots(src_tree, kit.rootfs(one, serial.layers[-1].id)) == []
    for i, layer in enumerate(got.layers):  # each layer on its own, too
        assert diff_snapshots(kit.rootfs(one, serial.layers[i].id), kit.rootfs(par, layer.id)) == []
    with par.original_tar(got.layers[1].id) as tar:  # the tar-split the worker wrote
        assert b"etc/.wh.gone" in tar.read()
    assert_clean(par, layers=3)
    # every layer: waiting, downloading, downloaded, applying, applied (in its own order)
    for d in digests:
        seen = [e.status for e in events if e.digest == d and e.event == "status"]
        assert seen[0] == "waiting" and seen[-1] in ("applied", "downloaded"), seen
        assert {"downloading", "downloaded", "applying", "applied"} <= set(seen), seen
        assert seen.index("applying") < seen.index("applied")


def test_layers_the_store_has_are_not_downloaded(kit: Any, registry: RegistryServer) -> None:
    blobs = stack_blobs()
    base_name, _, _ = publish(kit, registry, blobs[:1])
    name, img, pushed = publish(kit, registry, blobs)
    dst = kit.store("dst", "overlay2")
    pull(dst, f"{registry.host}/{base_name}", opts())
    events: list[Event] = []
    got = pull(dst, f"{registry.host}/{name}", opts(), sink=events.append)
    first, *rest = (b.descriptor.digest for b in pushed.layers)
    assert sorted(got.downloaded) == sorted(rest)
    assert [e.status for e in events if e.digest == first] == ["exists"]
    assert [la.chain_id for la in got.layers] == img.chain_ids
    assert_clean(dst, layers=3)


def test_a_bad_byte_stores_nothing(kit: Any, registry: RegistryServer, proxy: FaultProxy) -> None:
    name, _, pushed = publish(kit, registry, stack_blobs())
    bad = pushed.layers[1].descriptor.digest
    proxy.add(Fault("corrupt", path=BLOB + bad[7:], offset=40, times=-1))
    dst = kit.store("dst", "overlay2")
    with pytest.raises(DigestMismatch) as info:
        pull(dst, f"{proxy.host}/{name}", opts(parallel_apply=True))
    assert bad in str(info.value)
    assert_clean(dst)


def test_a_short_blob_reports_the_download_error(
    kit: Any, registry: RegistryServer, proxy: FaultProxy
) -> None:
    name, _, pushed = publish(kit, registry, stack_blobs())
    short = pushed.layers[2].descriptor.digest
    proxy.add(Fault("truncate", path=BLOB + short[7:], offset=100_000, times=-1))
    dst = kit.store("dst", "overlay2")
    with pytest.raises(CorruptStream) as info:
        pull(dst, f"{proxy.host}/{name}", opts(parallel_apply=True))
    assert f"blob {short}: truncated" in str(info.value)
    assert_clean(dst)


def test_a_layer_that_needs_its_lowers_is_applied_again_from_its_spool(
    kit: Any, registry: RegistryServer
) -> None:
    """Layer 2 writes lib/x where only the base has lib (a symlink to usr/lib): its worker cannot
    resolve it, so it is applied again from the spool file once the base is complete."""
    base = (
        TarBuilder()
        .dir(".", mode=0o755, mtime=T)
        .dir("usr", mode=0o755, mtime=T)
        .dir("usr/lib", mode=0o755, mtime=T)
        .symlink("lib", "usr/lib", mtime=T)
        .build()
    )
    second = TarBuilder().dir(".", mode=0o755, mtime=T + 1).file("lib/x", b"x\n", mtime=T + 1).build()
    third = TarBuilder().dir(".", mode=0o755, mtime=T + 2).file("y", os.urandom(1 << 20), mtime=T).build()
    name, img, _ = publish(kit, registry, [compress(base, "gzip"), compress(second, "gzip"), third])
    dst = kit.store("dst", "overlay2")
    events: list[Event] = []
    got = pull(dst, f"{registry.host}/{name}", opts(parallel_apply=True), sink=events.append)
    assert [la.chain_id for la in got.layers] == img.chain_ids
    second_digest = got.resolved.parsed.layers[1].digest
    assert [e.status for e in events if e.digest == second_digest].count("applying") == 2
    tree = kit.rootfs(dst, got.layers[-1].id)
    assert tree["/usr/lib/x"].size == 2 and tree["/lib"].target == "usr/lib"
    apply_time = ("/usr: mtime ", "/usr/lib: mtime ")  # the apply's time on either driver
    want = kit.rootfs(kit.store("src"), img.layers[-1])
    assert [d for d in diff_snapshots(want, tree) if not d.startswith(apply_time)] == []
    assert_clean(dst, layers=3)


def test_cli_switch(kit: Any, registry: RegistryServer, cli: Any, capsys: pytest.CaptureFixture[str]) -> None:
    name, img, _ = publish(kit, registry, stack_blobs())
    for flag in ("--parallel-apply", "--no-parallel-apply"):
        root = kit.tmp / flag.strip("-")
        code = cli(["--root", str(root), "--driver", "overlay2", "--json", "pull", "--insecure", flag,
                    f"{registry.host}/{name}"])
        out = capsys.readouterr()
        assert code == 0, out.err
        doc = json.loads(out.out)
        assert [la["chain_id"] for la in doc["layers"]] == img.chain_ids
        statuses = [json.loads(line).get("status") for line in out.err.splitlines() if line.startswith("{")]
        assert statuses.count("applied") == 3
        with LayerStore.open(root) as store:
            assert_clean(store, layers=3)


# -- a pull killed while its workers apply ----------------------------------------------------------

_PULL = """
import sys
from graphdriver.layers.store import LayerStore
from graphdriver.registry.progress import JsonLines
from graphdriver.registry.pull import PullOptions, pull
with LayerStore.open(sys.argv[1], "overlay2") as store:
    pull(store, sys.argv[2], PullOptions(insecure=True, parallel_apply=True), sink=JsonLines(sys.stdout))
"""


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def test_killed_parallel_pull_leaves_a_store_the_next_open_cleans(
    kit: Any, registry: RegistryServer, proxy: FaultProxy
) -> None:
    blobs = stack_blobs()
    name, img, pushed = publish(kit, registry, blobs)
    digests = [b.descriptor.digest for b in pushed.layers]
    stalled = digests[1]
    proxy.add(Fault("stall", path=BLOB + stalled[7:], offset=64, delay=120))
    root = kit.tmp / "killed"
    kit.store("probe", "overlay2")  # skips here when overlay2 does not work
    proc = subprocess.Popen(
        [sys.executable, "-c", _PULL, str(root), f"{proxy.host}/{name}"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    waiters: list[int] = []
    try:

        def mid_apply(events: list[dict[str, Any]]) -> bool:
            def has(d: str, status: str) -> bool:
                return any(e.get("digest") == d and e.get("status") == status for e in events)

            return has(digests[0], "applied") and has(stalled, "applying") and has(digests[2], "downloaded")

        kit.events_until(proc, mid_apply)
        with LayerStore.open(root, "overlay2", recover=False) as peek, peek.db.read() as txn:
            states = dict(txn.conn.execute("SELECT state, count(*) FROM layers GROUP BY state").fetchall())
        assert states == {"incomplete": 3}  # the stack is recorded before its workers start
        workers = _children(proc.pid)
        assert workers, "no worker process is applying"
        waiters = [os.pidfd_open(pid) for pid in workers]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for fd in waiters:  # the workers die with the pull (PR_SET_PDEATHSIG and the group kill)
            select.select([fd], [], [], 60)
            os.close(fd)
    assert proc.returncode == -signal.SIGKILL
    proxy.clear()
    images = ImageStore.open(root, "overlay2")
    kit._stores.append(images.layers)
    assert images.layers.recovery is not None and images.layers.recovery.removed
    assert_clean(images.layers)
    assert os.listdir(Path(root) / "overlay2" / "l") == []
    got = pull(images, f"{proxy.host}/{name}", opts())
    assert sorted(got.downloaded) == sorted(digests)
    assert [la.chain_id for la in got.layers] == img.chain_ids
    assert_clean(images.layers, layers=3)
    src = kit.store("src")
    assert diff_snapshots(kit.rootfs(src, img.layers[-1]), kit.rootfs(images.layers, got.layers[-1].id)) == []
