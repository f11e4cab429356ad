#!/usr/bin/env python3
"""The library side of the benchmark: one process doing one operation through graphdriver's API,
timing itself.

  gd_lib.py --root DIR --driver NAME [--opt KEY=VALUE]... COMMAND ARGS

The last line on stdout is ``GDBENCH-INNER <seconds>``: the time spent in the library call alone
(``time.perf_counter`` around it, after the imports), so the report can show the library's cost
apart from the interpreter's start-up. Commands (driver layer ids ``l1``.. as the CLI rows use):

- ``apply L1.tar [L2.tar ...]``: ``create`` + ``apply_diff`` of ``l1``..``lN``, each on the previous;
- ``store-import L1.tar ...``: ``LayerStore.import_layer`` of each on the previous (digests,
  tar-split, ``syncfs``), as an image import does;
- ``store-import-stack L1.tar ...``: ``LayerStore.import_layers`` of them all at once (on overlay2
  the layers are applied in parallel processes); their diff IDs are computed first, untimed;
- ``import-oci SOURCE [serial]``: ``ImageStore.import_image(SOURCE)`` (``oci:DIR:REF``); prints the
  image id; ``serial``: with ``parallel_apply=False`` (the layers one after the other);
- ``rmi REF``: ``ImageStore.rmi`` (the image and its now unused layers);
- ``create-mount PARENT ID``: ``create(ID, PARENT)`` + ``get(ID)``; prints the path (left mounted);
- ``changes ID PARENT`` / ``diff-size ID PARENT`` / ``diff ID PARENT OUT``: the driver's methods
  (``diff`` streams the tar to OUT).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

INNER = "GDBENCH-INNER"


def _timed(fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    print(f"{INNER} {time.perf_counter() - start:.6f}", flush=True)
    return result


def _diff_id(path: str) -> str:
    """sha256 of the uncompressed tar (gzip or plain), as an image config lists it."""
    import gzip
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as raw:
        f = gzip.GzipFile(fileobj=raw) if raw.read(2) == b"\x1f\x8b" else raw
        raw.seek(0)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="gd_lib.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--root", required=True)
    ap.add_argument("--driver", required=True)
    ap.add_argument("--opt", action="append", default=[], help="storage option KEY=VALUE")
    ap.add_argument("command")
    ap.add_argument("args", nargs="*")
    a = ap.parse_args(argv)
    options = dict(o.split("=", 1) for o in a.opt)
    args = a.args

    if a.command in ("import-oci", "rmi"):
        from graphdriver.images import ImageStore

        with ImageStore.open(a.root, a.driver, options) as images:
            if a.command == "import-oci":
                parallel = False if args[1:] == ["serial"] else None
                image = _timed(lambda: images.import_image(args[0], parallel_apply=parallel))
                print(image.id)
            else:
                _timed(lambda: images.rmi(args[0]))
        return 0
    if a.command == "store-import-stack":
        from graphdriver.layers.store import LayerBlob, LayerStore

        diff_ids = [_diff_id(path) for path in args]
        with LayerStore.open(a.root, a.driver, options) as store:
            files = [open(path, "rb") for path in args]  # noqa: SIM115 - closed below
            try:
                _timed(
                    lambda: store.import_layers(
                        [LayerBlob(f, d) for f, d in zip(files, diff_ids, strict=True)]
                    )
                )
            finally:
                for f in files:
                    f.close()
        return 0
    if a.command == "store-import":
        from graphdriver.layers.store import LayerStore

        with LayerStore.open(a.root, a.driver, options) as store:

            def chain() -> None:
                parent = None
                for path in args:
                    with open(path, "rb") as blob:
                        parent = store.import_layer(blob, parent).id

            _timed(chain)
        return 0

    from graphdriver.drivers import open_driver

    driver = open_driver(a.root, a.driver, options)
    if a.command == "apply":

        def apply() -> None:
            parent: str | None = None
            for i, path in enumerate(args, 1):
                layer = f"l{i}"
                driver.create(layer, parent)
                with open(path, "rb") as tar:
                    driver.apply_diff(layer, parent, tar)
                parent = layer

        _timed(apply)
    elif a.command == "create-mount":
        parent, layer = args

        def create_mount() -> Any:
            driver.create(layer, parent)
            return driver.get(layer)

        print(_timed(create_mount))
    elif a.command == "changes":
        _timed(lambda: driver.changes(args[0], args[1] or None))
    elif a.command == "diff-size":
        _timed(lambda: driver.diff_size(args[0], args[1] or None))
    elif a.command == "diff":

        def diff() -> None:
            with driver.diff(args[0], args[1] or None) as stream, open(args[2], "wb") as out:
                shutil.copyfileobj(stream, out, 1 << 20)

        _timed(diff)
    else:
        ap.error(f"unknown command {a.command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
