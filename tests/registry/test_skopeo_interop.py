"""Interoperability with skopeo, both ways, through the real ``docker-registry``.

- graphdriver pushes, ``skopeo copy docker://... oci:DIR`` pulls: the OCI layout skopeo writes has
  the blobs graphdriver pushed (same digests) and the config's diff IDs.
- skopeo pushes an OCI layout (built here; and the bench image when present, marked slow),
  graphdriver pulls: the root filesystem equals the one imported straight from the layout.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from graphdriver.layers.store import LayerStore
from graphdriver.registry.pull import PullOptions, pull
from graphdriver.registry.push import PushOptions, push_image
from graphdriver.testing.registry_server import RegistryServer
from graphdriver.testing.tarbuild import TarBuilder, compress
from graphdriver.testing.trees import diff_snapshots

BENCH_LAYOUT = Path("/var/tmp/gd-bench/image/oci")
T = 1_700_000_000

pytestmark = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")


def skopeo(*args: str) -> str:
    done = subprocess.run(["skopeo", "--insecure-policy", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"skopeo {' '.join(args)} failed: {done.stderr.strip()}"
    return done.stdout


def read_layout(layout: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest and config of ``tag`` in an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    desc = next(
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    )

    def blob(digest: str) -> bytes:
        algo, _, hexd = digest.partition(":")
        return (layout / "blobs" / algo / hexd).read_bytes()

    manifest = json.loads(blob(desc["digest"]))
    return manifest, json.loads(blob(manifest["config"]["digest"]))


def import_layout(store: LayerStore, layout: Path, tag: str) -> str:
    """Import the layers of ``tag`` straight from the layout's blobs; returns the top layer id."""
    manifest, config = read_layout(layout, tag)
    parent = None
    for desc, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        algo, _, hexd = desc["digest"].partition(":")
        with open(layout / "blobs" / algo / hexd, "rb") as blob:
            parent = store.import_layer(
                blob,
                parent,
                expected_diff_id=diff_id,
                expected_digest=desc["digest"],
                expected_size=desc["size"],
            ).id
    assert parent is not None
    return parent


def write_layout(layout: Path, tag: str, blobs: list[bytes], diff_ids: list[str]) -> None:
    """A minimal OCI image layout with one tagged image of ``blobs`` (gzip layers)."""
    (layout / "blobs" / "sha256").mkdir(parents=True)

    def put(data: bytes) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (layout / "blobs" / "sha256" / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **put(b)} for b in blobs],
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **put(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def layers() -> list[bytes]:
    base = (
        TarBuilder()
        .dir(".", mtime=T)
        .dir("etc", mtime=T)
        .file("etc/os-release", b"ID=test\n", mtime=T)
        .file("etc/gone", b"x", mtime=T)
        .dir("usr", mtime=T)
        .dir("usr/lib", mtime=T)
        .file("usr/lib/big", bytes(range(256)) * 4000, mode=0o755, mtime=T)
        .symlink("lib", "usr/lib", mtime=T)
        .build()
    )
    top = (
        TarBuilder()
        .dir(".", mtime=T)
        .dir("etc", mtime=T)
        .whiteout("etc/gone", mtime=T)
        .file("etc/new", b"new\n", uid=1000, gid=1000, mtime_ns=T * 10**9 + 5)
        .dir("usr/lib", mtime=T)
        .opaque("usr/lib")
        .file("usr/lib/only", b"only\n", mtime=T)
        .build()
    )
    return [base, top]


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_skopeo_pulls_what_graphdriver_pushed(
    kit: Any, registry: RegistryServer, tmp_path: Path, compression: str
) -> None:
    src = kit.store("src")
    img = kit.image(src, layers())
    ref = f"{registry.host}/{kit.repo()}:1"
    pushed = push_image(
        src,
        ref,
        config=img.config,
        layers=img.layers,
        options=PushOptions(insecure=True, compression=compression),
    )
    out = tmp_path / "oci"
    skopeo("copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{out}:got")
    manifest, config = read_layout(out, "got")
    assert manifest["config"]["digest"] == pushed.config.descriptor.digest
    assert config["rootfs"]["diff_ids"] == img.diff_ids
    if compression == "gzip":
        assert [d["digest"] for d in manifest["layers"]] == [b.descriptor.digest for b in pushed.layers]
        assert [d["mediaType"] for d in manifest["layers"]] == [
            b.descriptor.media_type for b in pushed.layers
        ]
    else:
        # skopeo 1.9 gzips uncompressed layers for an oci: destination; the tars are ours
        assert [b.descriptor.digest for b in pushed.layers] == img.diff_ids
        for d, diff_id in zip(manifest["layers"], img.diff_ids, strict=True):
            blob = (out / "blobs" / "sha256" / d["digest"][7:]).read_bytes()
            assert "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest() == diff_id
    # skopeo's copy of the layout imports to the same layers
    again = kit.store("again")
    top = import_layout(again, out, "got")
    assert again.get(top).chain_id == img.chain_ids[-1]


def test_graphdriver_pulls_what_skopeo_pushed(kit: Any, registry: RegistryServer, tmp_path: Path) -> None:
    tars = layers()
    layout = tmp_path / "layout"
    write_layout(
        layout,
        "v1",
        [compress(t, "gzip") for t in tars],
        ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars],
    )
    ref = f"{registry.host}/{kit.repo()}:v1"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{ref}")
    dst = kit.store("dst")
    got = pull(dst, ref, PullOptions(insecure=True))
    manifest, _ = read_layout(layout, "v1")
    assert [la.compressed_digest for la in got.layers] == [d["digest"] for d in manifest["layers"]]
    direct = kit.store("direct")
    top = import_layout(direct, layout, "v1")
    assert direct.get(top).chain_id == got.layers[-1].chain_id
    assert diff_snapshots(kit.rootfs(direct, top), kit.rootfs(dst, got.layers[-1].id)) == []


@pytest.mark.slow
@pytest.mark.skipif(not (BENCH_LAYOUT / "index.json").exists(), reason=f"no bench image at {BENCH_LAYOUT}")
def test_bench_image_pushed_by_skopeo(kit: Any, registry: RegistryServer) -> None:
    ref = f"{registry.host}/{kit.repo('bench')}:gz"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{BENCH_LAYOUT}:gz", f"docker://{ref}")
    dst = kit.store("dst")
    got = pull(dst, ref, PullOptions(insecure=True))
    assert len(got.layers) == 3
    direct = kit.store("direct")
    top = import_layout(direct, BENCH_LAYOUT, "gz")
    assert direct.get(top).chain_id == got.layers[-1].chain_id
    # the upper layers have no "./" entry: the root's mtime is when they were applied
    differences = diff_snapshots(kit.rootfs(direct, top), kit.rootfs(dst, got.layers[-1].id))
    assert [d for d in differences if not d.startswith("/: mtime ")] == []
    assert not dst.check().problems
