#!/usr/bin/env python3
"""A small library entry for the benchmark: one process doing what several CLI calls would.

  gd_apply.py --root DIR --driver NAME apply LAYER.tar[.gz] ...

``apply`` creates layers ``l1`` .. ``lN``, each on the previous one, and applies the given layer
tars to them in order with ``Driver.apply_diff``: the cost of the library without the
interpreter start-up of one CLI invocation per step.
"""

from __future__ import annotations

import argparse
import sys


def apply_chain(root: str, driver_name: str, layers: list[str]) -> None:
    from graphdriver.drivers import open_driver

    driver = open_driver(root, driver_name)
    parent: str | None = None
    for i, path in enumerate(layers, 1):
        layer_id = f"l{i}"
        driver.create(layer_id, parent)
        with open(path, "rb") as tar:
            driver.apply_diff(layer_id, parent, tar)
        parent = layer_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gd_apply.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--driver", required=True)
    sub = parser.add_subparsers(dest="command", required=True)
    apply = sub.add_parser("apply", help="create l1..lN and apply the layer tars in order")
    apply.add_argument("layers", nargs="+")
    args = parser.parse_args(argv)
    apply_chain(args.root, args.driver, args.layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
