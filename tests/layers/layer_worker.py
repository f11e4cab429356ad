"""A small process that runs one layer-store operation, for the crash and concurrency tests.

Run as ``python3 layer_worker.py OP ROOT DRIVER [options]``; prints one JSON object on stdout.
A graphdriver error prints ``{"error": "<class>", "message": ...}`` and exits 3. The crash tests
set ``GRAPHDRIVER_FAULT`` so that the process dies (SIGKILL) or stops (SIGSTOP) at a fault point.

Operations:
    import BLOB [--parent ID] [--diff-id D] [--digest D] [--size N] [--name N]   (BLOB "-": stdin)
    create [--parent ID] [--id ID]
    remove ID
    mount ID
    unmount ID
    open                    open the store (runs recovery) and print what recovery did
    stress SECONDS SEED BLOBDIR   random imports, mounts, unmounts, removes (concurrency test)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from graphdriver.errors import Busy, GraphDriverError, NotFound
from graphdriver.layers.store import LayerStore


def _layer(layer: Any) -> dict[str, Any]:
    return dict(layer.to_json())


def _stress(store_root: str, driver: str, seconds: float, seed: int, blobdir: Path) -> dict[str, Any]:
    """Random operations for ``seconds``. Blobs in ``blobdir``: ``<n>.blob`` with ``<n>.json``
    ({"parent": <n or null>, "diff_id", "digest", "size"}); a parent is imported before its child."""
    rng = random.Random(seed)
    specs = {p.stem: json.loads(p.read_text()) for p in sorted(blobdir.glob("*.json"))}
    counts = {"import": 0, "import-unknown": 0, "mount": 0, "unmount": 0, "remove": 0, "busy": 0, "gone": 0}
    refusals: list[str] = []
    my_mounts: list[str] = []
    deadline = time.monotonic() + seconds

    def ensure(store: LayerStore, name: str, *, know_diff: bool) -> str:
        spec = specs[name]
        parent = None if spec["parent"] is None else ensure(store, spec["parent"], know_diff=True)
        with open(blobdir / f"{name}.blob", "rb") as f:
            layer = store.import_layer(
                f,
                parent,
                expected_diff_id=spec["diff_id"] if know_diff else None,
                expected_digest=spec["digest"],
                expected_size=spec["size"],
            )
        return layer.id

    while time.monotonic() < deadline:
        with LayerStore.open(store_root, driver) as store:
            for _ in range(rng.randint(1, 6)):
                op = rng.choice(["import", "import", "mount", "unmount", "unmount", "remove", "remove"])
                try:
                    if op == "import":
                        know = rng.random() < 0.6
                        ensure(store, rng.choice(sorted(specs)), know_diff=know)
                        counts["import" if know else "import-unknown"] += 1
                    elif op == "mount":
                        layers = store.layers()
                        if layers:
                            lid = rng.choice(layers).id
                            store.mount(lid)
                            my_mounts.append(lid)
                            counts["mount"] += 1
                    elif op == "unmount" and my_mounts:
                        lid = my_mounts.pop(rng.randrange(len(my_mounts)))
                        left = store.unmount(lid)
                        if left < 0:
                            raise AssertionError(f"negative mount count {left}")
                        counts["unmount"] += 1
                    elif op == "remove":
                        layers = store.layers()
                        if layers:
                            store.remove(rng.choice(layers).id)
                            counts["remove"] += 1
                except Busy as exc:
                    counts["busy"] += 1
                    refusals.append(f"Busy: {exc}")
                except NotFound as exc:
                    # the layer (or the parent being imported onto) was removed by another worker
                    counts["gone"] += 1
                    refusals.append(f"NotFound: {exc}")
    with LayerStore.open(store_root, driver) as store:
        for lid in my_mounts:
            store.unmount(lid)
            counts["unmount"] += 1
    return {"counts": counts, "refusals": sorted(set(r.split(":")[0] for r in refusals))}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("op")
    ap.add_argument("root")
    ap.add_argument("driver")
    ap.add_argument("args", nargs="*")
    ap.add_argument("--parent")
    ap.add_argument("--diff-id")
    ap.add_argument("--digest")
    ap.add_argument("--size", type=int)
    ap.add_argument("--name", action="append", default=[])
    ap.add_argument("--id")
    a = ap.parse_args(argv)
    out: dict[str, Any]
    try:
        if a.op == "stress":
            out = _stress(a.root, a.driver, float(a.args[0]), int(a.args[1]), Path(a.args[2]))
        else:
            with LayerStore.open(a.root, a.driver) as store:
                if a.op == "open":
                    out = {"layers": [la.id for la in store.layers()]}
                elif a.op == "import":
                    src = sys.stdin.buffer if a.args[0] == "-" else open(a.args[0], "rb")  # noqa: SIM115
                    with src:
                        layer = store.import_layer(
                            src,
                            a.parent,
                            expected_diff_id=a.diff_id,
                            expected_digest=a.digest,
                            expected_size=a.size,
                            names=a.name,
                        )
                    out = _layer(layer)
                elif a.op == "create":
                    out = _layer(store.create_layer(a.parent, id=a.id, names=a.name))
                elif a.op == "remove":
                    store.remove(a.args[0])
                    out = {"removed": a.args[0]}
                elif a.op == "mount":
                    out = {"path": str(store.mount(a.args[0]))}
                elif a.op == "unmount":
                    out = {"count": store.unmount(a.args[0])}
                else:
                    raise SystemExit(f"unknown op {a.op}")
    except GraphDriverError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        return 3
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
