"""A registry that misbehaves: wrong bytes, short blobs, 500s, 429s, stalls, redirects, a killed pull.

A :class:`~graphdriver.testing.registry_server.FaultProxy` of ours sits in front of the real
``docker-registry``. Every failed pull must leave the store consistent (``check`` finds nothing)
with no incomplete layer, no staging leftovers and no layer of the layer that failed; every
transient fault must be retried into a success.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from graphdriver.errors import CorruptStream, DigestMismatch
from graphdriver.images.imagestore import ImageStore
from graphdriver.layers.store import LayerStore
from graphdriver.registry.client import RegistryError, RetryPolicy
from graphdriver.registry.pull import PullOptions, pull
from graphdriver.registry.push import PushOptions, push_image
from graphdriver.testing.registry_server import Fault, FaultProxy, RegistryServer, free_port
from graphdriver.testing.tarbuild import TarBuilder, compress
from graphdriver.testing.trees import diff_snapshots

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05, max_retry_after=2.0)
T = 1_700_000_000
BLOB = r"/blobs/sha256:"


def layer(name: str, size: int) -> bytes:
    return TarBuilder().dir(".", mtime=T).file(name, os.urandom(size), mtime=T).build()


def opts(**kw: Any) -> PullOptions:
    kw.setdefault("insecure", True)
    kw.setdefault("retry", FAST)
    return PullOptions(**kw)


def publish(kit: Any, registry: RegistryServer, blobs: list[bytes]) -> tuple[str, Any, Any]:
    """Push an image straight to the registry; returns (repository:tag, the image, the push)."""
    src = kit.store("src")
    img = kit.image(src, blobs)
    name = f"{kit.repo()}:1"
    pushed = push_image(
        src,
        f"{registry.host}/{name}",
        config=img.config,
        layers=img.layers,
        options=PushOptions(insecure=True),
    )
    return name, img, pushed


def assert_clean(store: LayerStore, *, layers: int = 0) -> None:
    """Consistent, nothing half-stored: only ``layers`` complete layers, no staging leftovers."""
    report = store.check()
    assert not report.problems, report.problems
    assert len(store.layers()) == layers
    with store.db.read() as txn:
        rows = txn.conn.execute("SELECT state, count(*) FROM layers GROUP BY state").fetchall()
    assert dict(rows) == ({"complete": layers} if layers else {})
    assert [p for p in os.listdir(store.staging_root) if not p.endswith(".lock")] == []


def test_corrupt_layer_byte_is_a_digest_mismatch(
    kit: Any, registry: RegistryServer, proxy: FaultProxy
) -> None:
    blobs = [layer("base", 50_000), compress(layer("a", 300_000), "gzip")]
    name, _, pushed = publish(kit, registry, blobs)
    bad = pushed.layers[1].descriptor.digest
    proxy.add(Fault("corrupt", path=BLOB + bad[7:], offset=5000))
    store = kit.store("dst")
    events: list[Any] = []
    with pytest.raises(DigestMismatch, match=bad):
        pull(store, f"{proxy.host}/{name}", opts(), sink=events.append)
    # the base layer was applied, then removed again with the failed pull
    assert [e.digest for e in events if e.status == "applied"] == [pushed.layers[0].descriptor.digest]
    assert_clean(store)


def test_corrupt_config_and_manifest(kit: Any, registry: RegistryServer, proxy: FaultProxy) -> None:
    name, _, pushed = publish(kit, registry, [layer("a", 1000)])
    store = kit.store("dst")
    proxy.add(Fault("corrupt", path=BLOB + pushed.config.descriptor.digest[7:], offset=3))
    with pytest.raises(DigestMismatch, match=r"blob sha256:[0-9a-f]{64}: content hashes to"):
        pull(store, f"{proxy.host}/{name}", opts())
    assert proxy.requests("GET", BLOB + pushed.layers[0].descriptor.digest[7:]) == []
    proxy.add(Fault("corrupt", path=r"/manifests/1$", offset=20))
    with pytest.raises(DigestMismatch, match="the registry says sha256:"):
        pull(store, f"{proxy.host}/{name}", opts())
    assert_clean(store)


def test_short_blob_once_resumes_with_range(kit: Any, registry: RegistryServer, proxy: FaultProxy) -> None:
    name, img, pushed = publish(kit, registry, [layer("a", 400_000)])
    digest = pushed.layers[0].descriptor.digest
    proxy.add(Fault("truncate", path=BLOB + digest[7:], offset=100_000))
    store = kit.store("dst")
    got = pull(store, f"{proxy.host}/{name}", opts())
    assert got.layers[0].chain_id == img.chain_ids[0]
    ranges = [r.range for r in proxy.requests("GET", BLOB + digest[7:])]
    assert ranges == [None, "bytes=100000-"]
    assert_clean(store, layers=1)


def test_short_blob_always_is_a_corrupt_stream(kit: Any, registry: RegistryServer, proxy: FaultProxy) -> None:
    name, _, pushed = publish(kit, registry, [compress(layer("a", 200_000), "zstd")])
    digest = pushed.layers[0].descriptor.digest
    proxy.add(Fault("truncate", path=BLOB + digest[7:], offset=50_000, times=-1))
    store = kit.store("dst")
    with pytest.raises(CorruptStream, match=rf"blob {digest}: truncated: .*gave up after 3 attempts"):
        pull(store, f"{proxy.host}/{name}", opts())
    assert_clean(store)


def test_500_once_is_retried_always_is_an_error(
    kit: Any, registry: RegistryServer, proxy: FaultProxy
) -> None:
    name, img, pushed = publish(kit, registry, [layer("a", 1000)])
    store = kit.store("dst")
    proxy.add(Fault("status", path=r"/manifests/", status=500))
    proxy.add(Fault("status", path=BLOB, status=503))
    got = pull(store, f"{proxy.host}/{name}", opts())
    assert got.layers[0].chain_id == img.chain_ids[0]

    other = kit.store("other")
    proxy.add(Fault("status", path=BLOB + pushed.layers[0].descriptor.digest[7:], status=500, times=-1))
    with pytest.raises(RegistryError, match=r"HTTP 500 INJECTED: injected 500 \(gave up after 3 attempts\)"):
        pull(other, f"{proxy.host}/{name}", opts())
    assert_clean(other)


def test_429_with_retry_after_is_obeyed(kit: Any, registry: RegistryServer, proxy: FaultProxy) -> None:
    name, img, _ = publish(kit, registry, [layer("a", 1000)])
    fault = proxy.add(Fault("status", path=r"/manifests/", status=429, headers={"Retry-After": "1"}))
    store = kit.store("dst")
    got = pull(store, f"{proxy.host}/{name}", opts())
    assert got.layers[0].chain_id == img.chain_ids[0]
    assert fault.hits == 1
    assert len(proxy.requests("GET", r"/manifests/")) == 2


def test_stalled_blob_times_out_and_resumes(kit: Any, registry: RegistryServer, proxy: FaultProxy) -> None:
    name, img, pushed = publish(kit, registry, [layer("a", 300_000)])
    digest = pushed.layers[0].descriptor.digest
    proxy.add(Fault("stall", path=BLOB + digest[7:], offset=65_536, delay=60))
    store = kit.store("dst")
    got = pull(store, f"{proxy.host}/{name}", opts(timeout=0.5))
    assert got.layers[0].chain_id == img.chain_ids[0]
    assert [r.range for r in proxy.requests("GET", BLOB + digest[7:])] == [None, "bytes=65536-"]

    other = kit.store("other")
    proxy.add(Fault("stall", path=BLOB + digest[7:], offset=0, delay=60, times=-1))
    with pytest.raises(CorruptStream, match="ReadTimeout"):
        pull(other, f"{proxy.host}/{name}", opts(timeout=0.3))
    assert_clean(other)


def test_blob_redirect_to_storage(kit: Any, registry: RegistryServer, proxy: FaultProxy) -> None:
    name, img, pushed = publish(kit, registry, [layer("a", 20_000), layer("b", 20_000)])
    proxy.add(Fault("redirect", path=BLOB, times=-1))
    store = kit.store("dst")
    got = pull(store, f"{proxy.host}/{name}", opts())
    assert [la.chain_id for la in got.layers] == img.chain_ids
    served = {r.path.rpartition(":")[2] for r in proxy.requests("STORAGE")}
    assert {b.descriptor.digest[7:] for b in pushed.layers} <= served


def test_push_retries_a_failed_chunk(kit: Any, registry: RegistryServer, proxy: FaultProxy) -> None:
    src = kit.store("src")
    img = kit.image(src, [layer("a", 600_000)])
    proxy.add(Fault("status", method="PATCH", path=r"/blobs/uploads/", status=500))
    options = PushOptions(
        insecure=True, retry=FAST, compression="none", monolithic_limit=100_000, chunk_size=200_000
    )
    ref = f"{proxy.host}/{kit.repo()}:1"
    pushed = push_image(src, ref, config=img.config, layers=img.layers, options=options)
    assert [b.action for b in pushed.layers] == ["uploaded"]
    chunks = -(-pushed.layers[0].descriptor.size // 200_000)
    assert chunks == 4
    assert len(proxy.requests("PATCH")) == chunks + 1  # the first one twice
    dst = kit.store("dst")
    assert pull(dst, ref, opts()).layers[0].chain_id == img.chain_ids[0]

    proxy.add(Fault("status", method="PUT", path=r"/blobs/uploads/", status=500, times=-1))
    img2 = kit.image(src, [layer("b", 1000)])
    with pytest.raises(RegistryError, match="HTTP 500"):
        push_image(
            src, f"{proxy.host}/{kit.repo()}:1", config=img2.config, layers=img2.layers, options=options
        )


def test_connection_refused_and_tls_are_one_line(kit: Any, registry: RegistryServer, cli: Any) -> None:
    store = kit.store("dst")
    port = free_port()
    with pytest.raises(RegistryError) as info:
        pull(store, f"127.0.0.1:{port}/x/y:1", opts())
    assert str(info.value) == f"cannot connect to registry 127.0.0.1:{port}: connection refused"
    with pytest.raises(RegistryError, match=r"TLS handshake with registry .* use --insecure"):
        pull(store, f"{registry.host}/x/y:1", PullOptions(retry=FAST))
    out, err = io.StringIO(), io.StringIO()
    status = cli(
        ["--root", str(kit.tmp / "cli"), "--driver", "vfs", "pull", "--insecure", f"127.0.0.1:{port}/x/y:1"],
        stdout=out,
        stderr=err,
    )
    assert status == RegistryError.exit_code
    assert (
        err.getvalue()
        == f"graphdriver: error: cannot connect to registry 127.0.0.1:{port}: connection refused\n"
    )
    assert out.getvalue() == ""


_PULL = """
import sys
from graphdriver.images.imagestore import ImageStore
from graphdriver.layers.store import LayerStore
from graphdriver.registry.progress import JsonLines
from graphdriver.registry.pull import PullOptions, pull
with LayerStore.open(sys.argv[1], "vfs") as store:
    pull(store, sys.argv[2], PullOptions(insecure=True), sink=JsonLines(sys.stdout))
"""


def test_killed_pull_leaves_a_consistent_store_and_the_next_pull_starts_clean(
    kit: Any, registry: RegistryServer, proxy: FaultProxy
) -> None:
    name, img, pushed = publish(kit, registry, [layer("a", 10_000), layer("b", 2_000_000)])
    first, second = (b.descriptor.digest for b in pushed.layers)
    proxy.add(Fault("stall", path=BLOB + second[7:], offset=256 << 10, delay=120))
    root = kit.tmp / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", _PULL, str(root), f"{proxy.host}/{name}"], stdout=subprocess.PIPE
    )
    try:

        def mid_download(events: list[dict[str, Any]]) -> bool:
            applied = any(e.get("digest") == first and e.get("status") == "applied" for e in events)
            started = any(e.get("digest") == second and e.get("status") == "applying" for e in events)
            moving = any(e.get("digest") == second and (e.get("current") or 0) > 0 for e in events)
            return applied and started and moving

        kit.events_until(proc, mid_download)
        with LayerStore.open(root, "vfs", recover=False) as peek, peek.db.read() as txn:
            states = dict(txn.conn.execute("SELECT state, count(*) FROM layers GROUP BY state").fetchall())
        assert states == {"complete": 1, "incomplete": 1}
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    proxy.clear()
    # opening the store cleans up: the incomplete layer (layer recovery), then the stale lease
    # and the complete layer it claimed (image store): the next pull starts clean
    images = ImageStore.open(root, "vfs")
    kit._stores.append(images.layers)
    assert images.layers.recovery is not None and images.layers.recovery.removed
    assert_clean(images.layers)
    got = pull(images, f"{proxy.host}/{name}", opts())
    assert got.downloaded == (first, second)
    assert [la.chain_id for la in got.layers] == img.chain_ids
    assert_clean(images.layers, layers=2)
    assert images.get(f"{proxy.host}/{name}").top_layer == got.layers[-1].id
    src = kit.store("src")
    assert diff_snapshots(kit.rootfs(src, img.layers[-1]), kit.rootfs(images.layers, got.layers[-1].id)) == []
