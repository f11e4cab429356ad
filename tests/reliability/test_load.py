"""Load: N processes (2, 8, 32) share one store and mix every operation for a bounded time.

Each process (tests/reliability/load_worker.py) imports layers of two stacks (its diff ID known
up front or not), creates container layers, mounts, writes files through the mounts, reads whole
layer diffs, unmounts and removes, reopening the store (and so running recovery) every few
operations. Afterwards:

- no process saw an error other than the documented refusals (Busy, NotFound, AlreadyExists),
  and no unmount returned a count below zero;
- zero lost layers: every layer an import or create returned is listed unless a remove
  removed it; zero phantom layers: nothing is listed that no process produced;
- zero corrupt layers: ``check(verify_content=True)`` is clean (every image layer's stored
  content hashes to its diff ID), and every file written into a container layer that is still
  there has the bytes written;
- every mount count is 0, nothing is mounted below the root, one layer per chain ID, the
  driver holds exactly the listed layers, ``staging/`` is empty.

The figures (processes, operations by kind, Busy refusals, errors, operations per second) are
printed and attached to the test report (``user_properties``). CI runs ~15 s per N on overlay2
(vfs where overlay2 does not work); ``-m slow`` runs a minute per N on both drivers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from graphdriver import mount as kmount
from graphdriver.layers.check import driver_layer_ids
from graphdriver.layers.store import LayerStore

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the load runs mount as root")

WORKER = Path(__file__).with_name("load_worker.py")


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


def write_blobs(blobdir: Path, rk: Any) -> None:
    """Two stacks, a <- b <- e and a <- c, and d alone; mixed compressions."""
    layout: dict[str, tuple[str | None, dict[str, bytes], str]] = {
        "a": (None, {"etc/hostname": b"a\n", "bin/x": os.urandom(48 << 10)}, "gzip"),
        "b": ("a", {"etc/hostname": b"b\n", "lib/y": os.urandom(24 << 10)}, "zstd"),
        "c": ("a", {"opt/c": b"c\n"}, "none"),
        "d": (None, {"d": os.urandom(16 << 10)}, "gzip"),
        "e": ("b", {"etc/motd": b"e\n"}, "gzip"),
    }
    blobdir.mkdir()
    for name, (parent, files, comp) in layout.items():
        b = rk.blob(_tar(files), comp)
        (blobdir / f"{name}.blob").write_bytes(b.data)
        spec = {"parent": parent, "diff_id": b.diff_id, "digest": b.digest, "size": b.size}
        (blobdir / f"{name}.json").write_text(json.dumps(spec))


def load_driver(tmp_path_factory: pytest.TempPathFactory, rk: Any) -> str:
    if rk.driver_unsupported("overlay2", tmp_path_factory.getbasetemp()) is None:
        return "overlay2"
    return "vfs"


def run_load(tmp_path: Path, driver: str, processes: int, seconds: float, rk: Any) -> dict[str, Any]:
    root = tmp_path / "store"
    LayerStore.open(root, driver).close()
    blobdir = tmp_path / "blobs"
    write_blobs(blobdir, rk)
    env = {k: v for k, v in os.environ.items() if k != "GRAPHDRIVER_FAULT"}
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(root),
                driver,
                str(seconds),
                str(seed),
                str(blobdir),
                str(tmp_path / f"out-{seed}.json"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for seed in range(processes)
    ]
    failures = []
    for p in procs:
        out, err = p.communicate(timeout=seconds * 20 + 300)
        if p.returncode != 0:
            failures.append(f"worker exit {p.returncode}:\n{out}\n{err[-3000:]}")
    wall = time.monotonic() - started
    assert failures == [], "\n\n".join(failures)
    results = [json.loads((tmp_path / f"out-{seed}.json").read_text()) for seed in range(processes)]
    errors = [e for r in results for e in r["errors"]]
    assert errors == [], "\n".join(errors[:5])

    counts = {k: sum(r["counts"][k] for r in results) for k in results[0]["counts"]}
    produced = set().union(*(r["produced"] for r in results))
    removed = set().union(*(r["removed"] for r in results))
    writes = [w for r in results for w in r["writes"]]
    with LayerStore.open(root, driver) as store:
        listed = {la.id for la in store.layers()}
        assert produced - removed - listed == set(), "lost layers"
        assert listed - produced == set(), "phantom layers"
        report = store.check(verify_content=True)
        assert report.clean, [str(p) for p in report.problems]
        layers = store.layers()
        assert all(la.mount_count == 0 for la in layers)
        assert kmount.mounts_under(root) == []
        chains = [la.chain_id for la in layers if la.chain_id]
        assert len(chains) == len(set(chains))
        assert driver_layer_ids(store) == sorted(listed)
        assert os.listdir(store.staging_root) == []
        checked = 0
        for lid in {w[0] for w in writes} & listed:
            with store.mounted(lid) as view:
                for _, name, digest in (w for w in writes if w[0] == lid):
                    assert hashlib.sha256((view / name).read_bytes()).hexdigest() == digest, (lid, name)
                    checked += 1
    ops = sum(v for k, v in counts.items() if k not in ("busy", "not-found", "already-exists"))
    window = max(r["elapsed"] for r in results)
    return {
        "driver": driver,
        "processes": processes,
        "seconds": round(window, 1),
        "wall": round(wall, 1),
        "operations": ops,
        "ops_per_second": round(ops / window, 1),
        "busy": counts["busy"],
        "not_found": counts["not-found"],
        "already_exists": counts["already-exists"],
        "errors": len(errors),
        "by_kind": {k: v for k, v in counts.items() if k not in ("busy", "not-found", "already-exists")},
        "layers_left": len(listed),
        "written_files_verified": checked,
    }


def report(request: pytest.FixtureRequest, figures: dict[str, Any]) -> None:
    request.node.user_properties.append(("load", json.dumps(figures)))
    print(f"\nload: {json.dumps(figures)}")


@pytest.mark.parametrize("processes", [2, 8, 32])
def test_load(
    processes: int,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    rk: Any,
    request: pytest.FixtureRequest,
) -> None:
    figures = run_load(tmp_path, load_driver(tmp_path_factory, rk), processes, 15, rk)
    assert figures["by_kind"]["import"] > 0 and figures["by_kind"]["mount"] > 0
    report(request, figures)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 8, 32])
def test_load_long(
    processes: int, driver_name: str, tmp_path: Path, rk: Any, request: pytest.FixtureRequest
) -> None:
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("the one-minute runs: select them with -m slow")
    figures = run_load(tmp_path, driver_name, processes, 60, rk)
    report(request, figures)
