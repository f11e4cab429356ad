"""Push and pull against the real ``docker-registry``: round trips, skipping, mounts, indexes, the CLI.

Images are built in a layer store from real layer tars (a sample tree with every file kind,
then layers with whiteouts, an opaque directory and incompressible data), pushed, and pulled into
another store; the pulled root filesystem must equal the original field by field (type, mode,
owner, size, mtime with ns, xattrs, link targets, content, hard links).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from graphdriver.errors import InvalidArgument, NotFound
from graphdriver.images.records import ImageTxn
from graphdriver.layers.store import LayerStore
from graphdriver.registry.client import RegistryClient
from graphdriver.registry.progress import Event
from graphdriver.registry.pull import PullOptions, pull
from graphdriver.registry.push import PushOptions, push, push_image
from graphdriver.testing.registry_server import RegistryServer
from graphdriver.testing.tarbuild import TarBuilder, compress
from graphdriver.testing.trees import diff_snapshots, make_sample_tree

T = 1_700_000_000


def base_blob(tmp: Path) -> bytes:
    from graphdriver.archive.export import tar_tree

    root = tmp / "sample"
    root.mkdir()
    make_sample_tree(root)
    out = io.BytesIO()
    tar_tree(root, out)
    return compress(out.getvalue(), "gzip")


def middle_blob() -> bytes:
    return (
        TarBuilder()
        .dir(".", mode=0o755, mtime=T)
        .dir("etc", mode=0o755, mtime=T)
        .file("etc/hostname", b"pulled\n", mode=0o644, mtime_ns=T * 10**9 + 123_456_789)
        .file("etc/conf", b"a=1\n", mode=0o600, uid=1000, gid=1000, mtime=T, xattrs={"user.k": b"v"})
        .symlink("etc/link", "hostname", mtime=T)
        .dir("opaque", mode=0o755, mtime=T)
        .opaque("opaque")
        .file("opaque/only", b"only\n", mtime=T)
        .build()
    )


def top_blob(size: int = 1_500_000) -> bytes:
    return (
        TarBuilder()
        .dir(".", mode=0o755, mtime=T + 1)
        .file("random.bin", os.urandom(size), mode=0o644, mtime=T)
        .hardlink("random.link", "random.bin", mtime=T)
        .build()
    )


OPTS = PullOptions(insecure=True)


def push_opts(**kw: Any) -> PushOptions:
    kw.setdefault("insecure", True)
    return PushOptions(**kw)


@pytest.mark.parametrize("driver", ["vfs", "overlay2"])
def test_round_trip_gives_the_same_layers_and_tree(kit: Any, registry: RegistryServer, driver: str) -> None:
    src = kit.store("src", driver)
    img = kit.image(src, [base_blob(kit.tmp), middle_blob(), compress(top_blob(), "zstd")])
    ref = f"{registry.host}/{kit.repo()}:1"
    # small limits: the top layer goes up in PATCH chunks, the others in one PUT
    pushed = push_image(
        src,
        ref,
        config=img.config,
        layers=img.layers,
        options=push_opts(monolithic_limit=256 << 10, chunk_size=256 << 10),
    )
    assert [b.action for b in pushed.layers] == ["uploaded"] * 3
    assert pushed.layers[2].descriptor.size > 256 << 10

    dst = kit.store("dst", driver)
    got = pull(dst, ref, OPTS)
    assert [la.chain_id for la in got.layers] == img.chain_ids
    assert [la.diff_id for la in got.layers] == img.diff_ids
    assert got.resolved.manifest_digest == pushed.digest
    assert got.resolved.config.raw == img.config
    assert sorted(got.downloaded) == sorted(b.descriptor.digest for b in pushed.layers)
    assert diff_snapshots(kit.rootfs(src, img.layers[-1]), kit.rootfs(dst, got.layers[-1].id)) == []
    assert not dst.check().problems
    with dst.db.read() as txn:
        row = ImageTxn(txn).image(got.image.id)
    assert row is not None
    assert row.top_layer == got.layers[-1].id
    assert row.config == img.config
    assert f"{ref}" in row.names
    assert row.manifest_digests == (pushed.digest,)


def test_second_pull_downloads_nothing(kit: Any, registry: RegistryServer) -> None:
    src = kit.store("src")
    img = kit.image(src, [middle_blob(), top_blob(200_000)])
    ref = f"{registry.host}/{kit.repo()}:v"
    push_image(src, ref, config=img.config, layers=img.layers, options=push_opts())
    dst = kit.store("dst")
    first = pull(dst, ref, PullOptions(insecure=True, stream_apply=False, parallel=1))
    events: list[Event] = []
    again = pull(dst, ref, OPTS, sink=events.append)
    assert again.downloaded == ()
    assert [la.id for la in again.layers] == [la.id for la in first.layers]
    statuses = [e.status for e in events if e.event == "status"]
    assert statuses == ["exists", "exists"]
    assert len(dst.layers()) == 2


def test_shared_base_is_not_downloaded_again(kit: Any, registry: RegistryServer) -> None:
    src = kit.store("src")
    base = kit.image(src, [middle_blob()])
    full = kit.image(src, [middle_blob(), top_blob(100_000)])
    assert full.chain_ids[0] == base.chain_ids[0]
    repo = kit.repo()
    push_image(
        src, f"{registry.host}/{repo}:base", config=base.config, layers=base.layers, options=push_opts()
    )
    pushed = push_image(
        src, f"{registry.host}/{repo}:full", config=full.config, layers=full.layers, options=push_opts()
    )
    assert [b.action for b in pushed.layers] == ["exists", "uploaded"]
    dst = kit.store("dst")
    pull(dst, f"{registry.host}/{repo}:base", OPTS)
    got = pull(dst, f"{registry.host}/{repo}:full", OPTS)
    assert got.downloaded == (pushed.layers[1].descriptor.digest,)
    assert [la.chain_id for la in got.layers] == full.chain_ids


def test_push_heads_then_mounts_across_repositories(kit: Any, registry: RegistryServer) -> None:
    src = kit.store("src")
    img = kit.image(src, [middle_blob(), top_blob(100_000)])
    a, b, c = kit.repo(), kit.repo(), kit.repo()
    first = push_image(
        src, f"{registry.host}/{a}:1", config=img.config, layers=img.layers, options=push_opts()
    )
    assert [x.action for x in first.layers] == ["uploaded", "uploaded"]
    assert first.config.action == "uploaded"
    again = push_image(
        src, f"{registry.host}/{a}:2", config=img.config, layers=img.layers, options=push_opts()
    )
    assert [x.action for x in again.layers] == ["exists", "exists"]
    assert again.digest == first.digest  # reproducible gzip: the same blobs, the same manifest
    other = push_image(
        src, f"{registry.host}/{b}:1", config=img.config, layers=img.layers, options=push_opts()
    )
    assert [(x.action, x.source) for x in other.layers] == [("mounted", a), ("mounted", a)]
    assert other.digest == first.digest
    # a store that never saw the registry: mounts only where it is told to look
    fresh = kit.store("fresh")
    img2 = kit.image(fresh, [middle_blob()])
    told = push_image(
        fresh,
        f"{registry.host}/{c}:1",
        config=img2.config,
        layers=img2.layers,
        options=push_opts(mount_from=(a,)),
    )
    assert [(x.action, x.source) for x in told.layers] == [("mounted", a)]


def test_push_of_a_pulled_image_reuses_its_blobs(kit: Any, registry: RegistryServer) -> None:
    src = kit.store("src")
    img = kit.image(src, [compress(middle_blob(), "zstd")])
    repo = kit.repo()
    pushed = push_image(
        src,
        f"{registry.host}/{repo}:1",
        config=img.config,
        layers=img.layers,
        options=push_opts(compression="zstd"),
    )
    dst = kit.store("dst")
    pulled = pull(dst, f"{registry.host}/{repo}:1", OPTS)
    assert pulled.layers[0].compressed_digest == pushed.layers[0].descriptor.digest
    # pushed by image name: the blob it was pulled as is mounted, nothing is recompressed
    back = push(dst, f"{registry.host}/{repo}:1", f"{registry.host}/{kit.repo()}:copy", push_opts())
    assert [(x.action, x.source) for x in back.layers] == [("mounted", repo)]
    assert back.layers[0].descriptor == pushed.layers[0].descriptor
    assert back.digest == pushed.digest


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_layer_compressions(kit: Any, registry: RegistryServer, compression: str) -> None:
    src = kit.store("src")
    img = kit.image(src, [middle_blob()])
    ref = f"{registry.host}/{kit.repo()}:1"
    pushed = push_image(
        src, ref, config=img.config, layers=img.layers, options=push_opts(compression=compression)
    )
    desc = pushed.layers[0].descriptor
    if compression == "none":
        assert desc.digest == img.diff_ids[0]
        assert desc.media_type == "application/vnd.oci.image.layer.v1.tar"
    else:
        assert desc.media_type == "application/vnd.oci.image.layer.v1.tar+zstd"
    dst = kit.store("dst")
    got = pull(dst, ref, OPTS)
    assert got.layers[0].chain_id == img.chain_ids[0]
    assert got.layers[0].compressed_digest == desc.digest


def test_index_platform_selection(kit: Any, registry: RegistryServer) -> None:
    from graphdriver.images.manifests import MT_OCI_INDEX, MT_OCI_MANIFEST, Platform, host_platform

    src = kit.store("src")
    repo = kit.repo()
    amd = kit.image(src, [TarBuilder().file("arch", b"amd64\n", mtime=T).build()], os_arch="linux/amd64")
    arm = kit.image(src, [TarBuilder().file("arch", b"arm64\n", mtime=T).build()], os_arch="linux/arm64")
    manifests = []
    for tag, img, plat in (("amd", amd, ("linux", "amd64", None)), ("arm", arm, ("linux", "arm64", "v8"))):
        r = push_image(
            src, f"{registry.host}/{repo}:{tag}", config=img.config, layers=img.layers, options=push_opts()
        )
        entry: dict[str, Any] = {
            "mediaType": MT_OCI_MANIFEST,
            "digest": r.digest,
            "size": len(r.manifest),
            "platform": {"os": plat[0], "architecture": plat[1]},
        }
        if plat[2]:
            entry["platform"]["variant"] = plat[2]
        manifests.append(entry)
    index = json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": manifests}).encode()
    with RegistryClient(registry.host, insecure=True) as client:
        client.put_manifest(repo, "multi", index, MT_OCI_INDEX)

    dst = kit.store("dst")
    got = pull(
        dst,
        f"{registry.host}/{repo}:multi",
        PullOptions(insecure=True, platform=Platform.parse("linux/arm64")),
    )
    assert got.layers[-1].chain_id == arm.chain_ids[-1]
    assert got.resolved.index_digest is not None
    if host_platform().architecture == "amd64":
        mine = pull(dst, f"{registry.host}/{repo}:multi", OPTS)
        assert mine.layers[-1].chain_id == amd.chain_ids[-1]
    with pytest.raises(NotFound, match=r"no image for platform linux/s390x .*linux/amd64, linux/arm64/v8"):
        pull(
            dst,
            f"{registry.host}/{repo}:multi",
            PullOptions(insecure=True, platform=Platform.parse("linux/s390x")),
        )
    # a single-platform image for another platform is refused when a platform is asked for
    with pytest.raises(NotFound, match="is an image for linux/arm64"):
        pull(
            dst,
            f"{registry.host}/{repo}:arm",
            PullOptions(insecure=True, platform=Platform.parse("linux/amd64")),
        )


def test_pull_by_digest_and_unknown_names(kit: Any, registry: RegistryServer) -> None:
    src = kit.store("src")
    img = kit.image(src, [middle_blob()])
    repo = kit.repo()
    pushed = push_image(
        src, f"{registry.host}/{repo}:1", config=img.config, layers=img.layers, options=push_opts()
    )
    dst = kit.store("dst")
    got = pull(dst, f"{registry.host}/{repo}@{pushed.digest}", OPTS)
    assert got.resolved.manifest_digest == pushed.digest
    with pytest.raises(NotFound, match="MANIFEST_UNKNOWN"):
        pull(dst, f"{registry.host}/{repo}:nope", OPTS)
    with pytest.raises(NotFound, match="not found in registry"):
        pull(dst, f"{registry.host}/{kit.repo()}:1", OPTS)
    with pytest.raises(InvalidArgument):
        pull(dst, f"{registry.host}/Upper/case:1", OPTS)
    assert not dst.check().problems


def test_cli_pull_and_push(kit: Any, registry: RegistryServer, cli: Any) -> None:
    src = kit.store("src")
    img = kit.image(src, [middle_blob(), top_blob(50_000)])
    repo = kit.repo()
    ref = f"{registry.host}/{repo}:1"
    push_image(src, ref, config=img.config, layers=img.layers, options=push_opts())
    root = kit.tmp / "cli-root"
    out, err = io.StringIO(), io.StringIO()
    status = cli(
        ["--root", str(root), "--driver", "vfs", "--json", "pull", "--insecure", ref], stdout=out, stderr=err
    )
    assert status == 0, err.getvalue()
    doc = json.loads(out.getvalue())
    assert doc["reference"] == ref
    assert [la["chain_id"] for la in doc["layers"]] == img.chain_ids
    assert all(la["downloaded"] for la in doc["layers"])
    events = [json.loads(line) for line in err.getvalue().splitlines()]
    applied = [e["digest"] for e in events if e.get("status") == "applied"]
    assert applied == [la["digest"] for la in doc["layers"]]

    out, err = io.StringIO(), io.StringIO()
    target = f"{registry.host}/{kit.repo()}:copy"
    status = cli(["--root", str(root), "push", "--insecure", ref, target], stdout=out, stderr=err)
    assert status == 0, err.getvalue()
    assert err.getvalue() == ""
    assert out.getvalue().startswith(f"{target}: pushed manifest sha256:")
    assert "0 uploaded, 2 mounted, 0 already there" in out.getvalue()

    out, err = io.StringIO(), io.StringIO()
    status = cli(["--root", str(root), "push", "--insecure", "no/such:image", target], stdout=out, stderr=err)
    assert status == NotFound.exit_code
    assert err.getvalue() == "graphdriver: error: image not known: no/such:image\n"

    out, err = io.StringIO(), io.StringIO()
    status = cli(
        ["--root", str(root), "pull", "--insecure", "--platform", "linux", ref], stdout=out, stderr=err
    )
    assert status == InvalidArgument.exit_code
    assert err.getvalue().startswith("graphdriver: error: invalid platform 'linux'")
    with LayerStore.open(root) as store:
        assert not store.check().problems


def test_later_layers_download_while_an_earlier_one_applies(
    kit: Any, registry: RegistryServer, proxy: Any
) -> None:
    import threading

    from graphdriver.testing.registry_server import Fault

    src = kit.store("src")
    img = kit.image(src, [top_blob(400_000), middle_blob()])
    name = f"{kit.repo()}:1"
    pushed = push_image(
        src, f"{registry.host}/{name}", config=img.config, layers=img.layers, options=push_opts()
    )
    first, second = (b.descriptor.digest for b in pushed.layers)
    # the bottom layer's blob stops half way until the top layer's blob has been downloaded and
    # the bottom layer is being applied: a pull that did not download in parallel, or did not
    # apply while downloading, would wait for the stall's 60 s and fail below
    release = threading.Event()
    stall = proxy.add(Fault("stall", path=f"/blobs/{first}", offset=100_000, delay=60, release=release))
    events: list[Event] = []
    seen: set[tuple[str | None, str | None]] = set()

    def sink(e: Event) -> None:
        events.append(e)
        seen.add((e.digest, e.status))
        if {(second, "downloaded"), (first, "applying")} <= seen:
            release.set()

    got = pull(kit.store("dst"), f"{proxy.host}/{name}", OPTS, sink=sink)
    assert [la.chain_id for la in got.layers] == img.chain_ids
    order = [(e.digest, e.status) for e in events if e.event == "status" and e.digest]
    pos = order.index
    assert pos((second, "downloaded")) < pos((first, "downloaded"))
    assert pos((first, "applying")) < pos((first, "downloaded"))
    assert pos((first, "applied")) < pos((second, "applying"))
    assert not stall.timed_out
