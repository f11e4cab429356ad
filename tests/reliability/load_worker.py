"""One process of the load test: random store operations on a shared store for a bounded time.

``python3 load_worker.py ROOT DRIVER SECONDS SEED BLOBDIR OUT.json``

Operations, drawn at random: import (a layer of the blob stacks in BLOBDIR, its diff ID known up
front or not, which races to the commit), create (a container layer on a random image layer),
mount, write (a file with unique content into a container layer, through the mount), diff (the
whole layer tar of a random layer, parsed to its end), unmount (one of this process's own
mounts), remove (any listed layer). The store is reopened (running recovery) every few
operations. Documented refusals are counted, not errors: ``Busy`` (mounted, has children, in
use), ``NotFound`` (removed by another process meanwhile), ``AlreadyExists``. Any other exception
is recorded as an error. A mount count below zero is an error.

OUT.json gets the counts, the refusals, the errors, the elapsed time, and for the test's
bookkeeping: every layer id an import or a create returned, every id a remove removed, and every
file written (layer, path, sha256).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import tarfile
import time
import traceback
from pathlib import Path
from typing import Any

from graphdriver.errors import AlreadyExists, Busy, NotFound
from graphdriver.layers.metadata import LayerKind
from graphdriver.layers.store import LayerStore

OPS = [
    *("import", "import", "create", "mount", "write", "write", "diff"),
    *("unmount", "unmount", "remove", "remove"),
]


class Worker:
    def __init__(self, root: str, driver: str, seed: int, blobdir: Path) -> None:
        self.root = root
        self.driver = driver
        self.seed = seed
        self.rng = random.Random(seed)
        self.blobdir = blobdir
        self.specs = {p.stem: json.loads(p.read_text()) for p in sorted(blobdir.glob("*.json"))}
        self.counts = dict.fromkeys([*dict.fromkeys(OPS), "busy", "not-found", "already-exists"], 0)
        self.errors: list[str] = []
        self.produced: set[str] = set()
        self.removed: set[str] = set()
        self.writes: list[tuple[str, str, str]] = []
        self.mounts: list[str] = []
        self.serial = 0

    def ensure(self, store: LayerStore, name: str, *, know_diff: bool) -> str:
        spec = self.specs[name]
        parent = None if spec["parent"] is None else self.ensure(store, spec["parent"], know_diff=True)
        with open(self.blobdir / f"{name}.blob", "rb") as f:
            layer = store.import_layer(
                f,
                parent,
                expected_diff_id=spec["diff_id"] if know_diff else None,
                expected_digest=spec["digest"],
                expected_size=spec["size"],
            )
        self.produced.add(layer.id)
        return layer.id

    def pick(self, store: LayerStore, kind: LayerKind | None = None) -> str | None:
        layers = [la for la in store.layers() if kind is None or la.kind is kind]
        return self.rng.choice(layers).id if layers else None

    def op(self, store: LayerStore, op: str) -> bool:
        """One operation; False when there was nothing to do it on."""
        rng = self.rng
        if op == "import":
            self.ensure(store, rng.choice(sorted(self.specs)), know_diff=rng.random() < 0.6)
        elif op == "create":
            parent = self.pick(store, LayerKind.IMAGE)
            if parent is None:
                return False
            self.produced.add(store.create_layer(parent).id)
        elif op == "mount":
            lid = self.pick(store)
            if lid is None:
                return False
            store.mount(lid)
            self.mounts.append(lid)
        elif op == "write":
            lid = self.pick(store, LayerKind.CONTAINER)
            if lid is None:
                return False
            self.serial += 1
            name = f"w-{self.seed}-{self.serial}"
            data = f"{name} {rng.random()}\n".encode() * rng.randint(1, 200)
            with store.mounted(lid) as view:
                (view / name).write_bytes(data)
            self.writes.append((lid, name, hashlib.sha256(data).hexdigest()))
        elif op == "diff":
            lid = self.pick(store)
            if lid is None:
                return False
            with store.diff(lid) as stream, tarfile.open(fileobj=stream, mode="r|") as tf:
                for member in tf:
                    if member.isfile():
                        f = tf.extractfile(member)
                        assert f is not None
                        while f.read(1 << 16):
                            pass
        elif op == "unmount":
            if not self.mounts:
                return False
            lid = self.mounts.pop(rng.randrange(len(self.mounts)))
            left = store.unmount(lid)
            if left < 0:
                self.errors.append(f"unmount of {lid} left a negative count {left}")
        elif op == "remove":
            lid = self.pick(store)
            if lid is None:
                return False
            store.remove(lid)
            self.removed.add(lid)
        return True

    def run(self, seconds: float) -> dict[str, Any]:
        start = time.monotonic()
        deadline = start + seconds
        while time.monotonic() < deadline:
            with LayerStore.open(self.root, self.driver) as store:
                for _ in range(self.rng.randint(3, 12)):
                    op = self.rng.choice(OPS)
                    try:
                        if self.op(store, op):
                            self.counts[op] += 1
                    except Busy:
                        self.counts["busy"] += 1
                    except NotFound:
                        self.counts["not-found"] += 1
                    except AlreadyExists:
                        self.counts["already-exists"] += 1
                    except Exception as exc:  # anything else is a failure the test reports
                        self.errors.append(f"{op}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        with LayerStore.open(self.root, self.driver) as store:
            for lid in self.mounts:
                try:
                    if store.unmount(lid) < 0:
                        self.errors.append(f"final unmount of {lid} left a negative count")
                except NotFound:  # cannot happen: a mounted layer cannot be removed
                    self.errors.append(f"layer {lid} mounted by this process was removed")
                except Exception as exc:
                    self.errors.append(f"final unmount of {lid}: {type(exc).__name__}: {exc}")
        return {
            "counts": self.counts,
            "errors": self.errors,
            "elapsed": time.monotonic() - start,
            "produced": sorted(self.produced),
            "removed": sorted(self.removed),
            "writes": self.writes,
        }


def main(argv: list[str]) -> int:
    root, driver, seconds, seed, blobdir, out = argv
    result = Worker(root, driver, int(seed), Path(blobdir)).run(float(seconds))
    Path(out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
