"""One layer-store operation in its own process, for the tests that stop or kill it half way.

``python3 store_worker.py OP ROOT DRIVER [ARG]`` prints one JSON line on stdout and exits 0; a
GraphDriverError or an OSError prints ``{"error": "<class>", "errno": N, "message": ...}`` and
exits 3 (the message as one line, as the CLI would show it). ``GRAPHDRIVER_FAULT`` in the
environment stops or kills the process at a fault point (graphdriver.layers.faults).

Operations:
    import BLOBFILE             import a layer blob (base layer); prints the layer's id
    mount-and-hold LAYER        mount the layer, print its path, then wait for stdin to close
"""

from __future__ import annotations

import json
import sys
from typing import Any

from graphdriver.errors import GraphDriverError
from graphdriver.layers.store import LayerStore


def main(argv: list[str]) -> int:
    op, root, driver, *rest = argv
    out: dict[str, Any]
    try:
        with LayerStore.open(root, driver) as store:
            if op == "import":
                with open(rest[0], "rb") as f:
                    out = {"id": store.import_layer(f).id}
            elif op == "mount-and-hold":
                path = store.mount(rest[0])
                print(json.dumps({"path": str(path)}), flush=True)
                sys.stdin.read()  # held until the test closes stdin or kills us
                return 0
            else:
                raise SystemExit(f"unknown op {op}")
    except (GraphDriverError, OSError) as exc:
        err = {"error": type(exc).__name__, "errno": getattr(exc, "errno", None), "message": str(exc)}
        print(json.dumps(err))
        return 3
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
