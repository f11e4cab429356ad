"""The synthetic inputs the benchmark generates itself (the bench image comes from make-image.sh).

- **deep**: 200 small layers (``deep/layer001.tar`` ..): each adds a directory of 10 small files
  and rewrites ``/etc/generation``; every 10th layer deletes a file of an earlier layer (a
  whiteout) and every 25th makes a directory opaque. Also an OCI image layout ``deep/oci`` (ref
  ``raw``, uncompressed layers) for the import operations.
- **wide**: one layer of 100,000 small files (``wide/layer.tar``): 1,000 directories of 100 files
  of 0-2 KiB each.

Both are deterministic (fixed seed, fixed mtimes, numeric owners, PAX) and are written once into
``<work>/inputs/`` and reused while :data:`VERSION` is unchanged. They are built with Python's
``tarfile`` from in-memory data, so nothing on the host is read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tarfile

VERSION = "3"
DEEP_LAYERS = 200
WIDE_DIRS = 1000
WIDE_FILES_PER_DIR = 100
MTIME = 1_700_000_000


def _dir(name: str, mode: int = 0o755) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    info.mtime = MTIME
    return info


def _file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = MTIME
    tar.addfile(info, io.BytesIO(data))


def _payload(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


def _write_deep_layer(path: str, n: int, rng: random.Random) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("etc", "deep", "usr", "usr/share") if n == 1 else ("etc", "deep"):
            tar.addfile(_dir(d))
        _file(tar, "etc/generation", f"{n}\n".encode())
        layer_dir = f"deep/{n:03d}"
        tar.addfile(_dir(layer_dir))
        for i in range(10):
            _file(tar, f"{layer_dir}/f{i}", _payload(rng, rng.randint(100, 4096)))
        if n % 10 == 0:
            tar.addfile(_dir(f"deep/{n - 5:03d}"))
            _file(tar, f"deep/{n - 5:03d}/.wh.f3", b"")
        if n % 25 == 0:
            tar.addfile(_dir(f"deep/{n - 1:03d}"))
            _file(tar, f"deep/{n - 1:03d}/.wh..wh..opq", b"")
            _file(tar, f"deep/{n - 1:03d}/replaced", b"opaque\n")


def _sha256_file(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest(), os.path.getsize(path)


def write_oci_layout(out: str, layers: list[str], ref: str) -> None:
    """An OCI image layout at ``out`` with one image ``ref`` whose layers are the given
    uncompressed tars (hard-linked into ``blobs/`` when possible)."""
    blobs = os.path.join(out, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)

    def put(data: bytes) -> tuple[str, int]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, digest.split(":")[1]), "wb") as f:
            f.write(data)
        return digest, len(data)

    descs = []
    for path in layers:
        digest, size = _sha256_file(path)
        target = os.path.join(blobs, digest.split(":")[1])
        if not os.path.exists(target):
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": size})
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descs]},
            "history": [{"created_by": f"bench layer {i + 1}"} for i in range(len(descs))],
        },
        sort_keys=True,
    ).encode()
    cdigest, csize = put(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": cdigest,
                "size": csize,
            },
            "layers": descs,
        },
        sort_keys=True,
    ).encode()
    mdigest, msize = put(manifest)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": mdigest,
                        "size": msize,
                        "platform": {"architecture": "amd64", "os": "linux"},
                        "annotations": {"org.opencontainers.image.ref.name": ref},
                    }
                ],
            },
            f,
        )


def deep_layers(inputs: str) -> list[str]:
    return [os.path.join(inputs, "deep", f"layer{n:03d}.tar") for n in range(1, DEEP_LAYERS + 1)]


def wide_layer(inputs: str) -> str:
    return os.path.join(inputs, "wide", "layer.tar")


def _build_deep(inputs: str) -> None:
    rng = random.Random(1)
    d = os.path.join(inputs, "deep")
    os.makedirs(d)
    paths = deep_layers(inputs)
    for n, path in enumerate(paths, 1):
        _write_deep_layer(path, n, rng)
    write_oci_layout(os.path.join(d, "oci"), paths, "raw")


def _build_wide(inputs: str) -> None:
    rng = random.Random(2)
    d = os.path.join(inputs, "wide")
    os.makedirs(d)
    with tarfile.open(wide_layer(inputs), "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_dir("wide"))
        for i in range(WIDE_DIRS):
            sub = f"wide/d{i:04d}"
            tar.addfile(_dir(sub))
            for j in range(WIDE_FILES_PER_DIR):
                _file(tar, f"{sub}/f{j:03d}", _payload(rng, rng.randint(0, 2048)))


def ensure_inputs(work: str, which: tuple[str, ...] = ("deep", "wide")) -> str:
    """Build the synthetic inputs under ``<work>/inputs`` if missing or stale; return that dir."""
    inputs = os.path.join(work, "inputs")
    os.makedirs(inputs, exist_ok=True)
    for name, build in (("deep", _build_deep), ("wide", _build_wide)):
        if name not in which:
            continue
        stamp = os.path.join(inputs, f"{name}.done")
        try:
            with open(stamp) as f:
                if f.read().strip() == VERSION:
                    continue
        except FileNotFoundError:
            pass
        print(f"bench: generating the {name} input under {inputs} (once)", flush=True)
        shutil.rmtree(os.path.join(inputs, name), ignore_errors=True)
        build(inputs)
        with open(stamp, "w") as f:
            f.write(VERSION + "\n")
    return inputs
