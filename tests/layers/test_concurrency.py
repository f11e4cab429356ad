"""Many processes, one store, no daemon: 8 processes import, mount, unmount and remove at random.

Some import the same layers (with the chain ID known up front, which goes through the chain
lock, or unknown, which races to the commit), parents are removed under children being imported,
mounts are counted in one process and the store reopened (with recovery) all the time. The run
must end with no error other than the documented refusals (``Busy``: mounted, has children, in
use; ``NotFound``: removed by another process meanwhile), ``check()`` clean, every mount count 0
and nothing mounted, and one layer per chain ID.

The default run lasts ~20 s; ``-m slow`` adds the one-minute run.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from graphdriver import mount as kmount
from graphdriver.layers.check import driver_layer_ids
from graphdriver.layers.store import LayerStore

WORKERS = 8


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _blobs(blobdir: Path, kit: Any) -> dict[str, dict[str, Any]]:
    """Two stacks: a <- b <- e, a <- c, and d alone; mixed compressions."""
    layout: dict[str, tuple[str | None, dict[str, bytes], str]] = {
        "a": (None, {"etc/hostname": b"a\n", "bin/x": os.urandom(64 << 10)}, "gzip"),
        "b": ("a", {"etc/hostname": b"b\n", "lib/y": os.urandom(32 << 10)}, "zstd"),
        "c": ("a", {"opt/c": b"c\n"}, "none"),
        "d": (None, {"d": os.urandom(16 << 10)}, "gzip"),
        "e": ("b", {"etc/motd": b"e\n"}, "gzip"),
    }
    specs = {}
    blobdir.mkdir()
    for name, (parent, files, comp) in layout.items():
        b = kit.blob(_tar(files), comp)
        b.write(blobdir / f"{name}.blob")
        spec = {"parent": parent, "diff_id": b.diff_id, "digest": b.digest, "size": b.size}
        (blobdir / f"{name}.json").write_text(json.dumps(spec))
        specs[name] = spec
    return specs


@pytest.mark.parametrize(
    "seconds", [pytest.param(20, id="20s"), pytest.param(60, id="60s", marks=pytest.mark.slow)]
)
def test_eight_processes(
    tmp_path: Path, driver_name: str, kit: Any, seconds: int, request: pytest.FixtureRequest
) -> None:
    if seconds > 20 and "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("the one-minute run: select it with -m slow")
    root = tmp_path / "store"
    LayerStore.open(root, driver_name).close()
    specs = _blobs(tmp_path / "blobs", kit)
    env = dict(os.environ)
    env.pop("GRAPHDRIVER_FAULT", None)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(kit.worker),
                "stress",
                str(root),
                driver_name,
                str(seconds),
                str(seed),
                str(tmp_path / "blobs"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for seed in range(WORKERS)
    ]
    results = []
    failures = []
    for p in procs:
        out, err = p.communicate(timeout=seconds * 10 + 120)
        if p.returncode != 0:
            failures.append(f"worker exit {p.returncode}:\n{out}\n{err[-3000:]}")
        else:
            results.append(json.loads(out))
    assert failures == [], "\n\n".join(failures)
    # only the documented refusals happened
    assert {r for res in results for r in res["refusals"]} <= {"Busy", "NotFound"}
    totals = {k: sum(res["counts"][k] for res in results) for k in results[0]["counts"]}
    # the run did real work of every kind
    assert totals["import"] > 0 and totals["mount"] > 0 and totals["unmount"] > 0 and totals["remove"] > 0, (
        totals
    )

    with LayerStore.open(root, driver_name) as store:
        report = store.check(verify_content=False)
        assert report.clean, [str(p) for p in report.problems]
        layers = store.layers()
        chains = [la.chain_id for la in layers]
        assert len(chains) == len(set(chains)), chains
        assert all(la.mount_count == 0 for la in layers)
        assert driver_layer_ids(store) == sorted(la.id for la in layers)
        assert [m.mount_point for m in kmount.mounts_under(root)] == []
        # and the store still works: the deepest stack imports (or is found) and shows its content
        parent = None
        for name in ("a", "b", "e"):
            spec = specs[name]
            with open(tmp_path / "blobs" / f"{name}.blob", "rb") as f:
                parent = store.import_layer(f, parent, expected_diff_id=spec["diff_id"]).id
        assert parent is not None
        with store.mounted(parent) as top:
            assert (top / "etc/hostname").read_bytes() == b"b\n"
            assert (top / "etc/motd").read_bytes() == b"e\n"
        leftovers = sorted(p.name for p in (root / "locks").iterdir() if not p.name.startswith("layer-"))
        assert leftovers == ["store.lock"], leftovers
