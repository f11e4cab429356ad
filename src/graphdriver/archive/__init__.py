"""The layer archive: the OCI/Docker layer tar format.

- :func:`apply_layer` applies a (possibly compressed) layer tar onto a directory, securely and
  whiteout-aware (:mod:`graphdriver.archive.apply`).
- :func:`changes_dirs`, :func:`changes_from_upper`, :func:`changes_size`, :func:`tree_size`
  detect and measure changes (:mod:`graphdriver.archive.changes`).
- :func:`export_changes`, :func:`tar_tree`, :func:`open_export` write deterministic layer tars
  (:mod:`graphdriver.archive.export`).
- :func:`open_decompressed` / :func:`open_compressed` handle gzip, zstd, bzip2 and xz
  (:mod:`graphdriver.archive.compression`).

Names are imported lazily so that ``import graphdriver.archive`` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

from graphdriver.archive.types import Change, ChangeKind, Limits, WhiteoutFormat

_LAZY = {
    "apply_layer": "graphdriver.archive.apply",
    "ApplyOptions": "graphdriver.archive.apply",
    "ApplyStats": "graphdriver.archive.apply",
    "LowerLayersNeeded": "graphdriver.archive.apply",
    "changes_dirs": "graphdriver.archive.changes",
    "changes_from_upper": "graphdriver.archive.changes",
    "changes_size": "graphdriver.archive.changes",
    "tree_size": "graphdriver.archive.changes",
    "export_changes": "graphdriver.archive.export",
    "tar_tree": "graphdriver.archive.export",
    "open_export": "graphdriver.archive.export",
    "open_decompressed": "graphdriver.archive.compression",
    "open_compressed": "graphdriver.archive.compression",
    "drain": "graphdriver.archive.compression",
    "detect_compression": "graphdriver.archive.compression",
    "Compression": "graphdriver.archive.compression",
    "DigestReader": "graphdriver.archive.compression",
}

__all__ = [
    "ApplyOptions",
    "ApplyStats",
    "Change",
    "ChangeKind",
    "Compression",
    "DigestReader",
    "Limits",
    "LowerLayersNeeded",
    "WhiteoutFormat",
    "apply_layer",
    "changes_dirs",
    "changes_from_upper",
    "changes_size",
    "detect_compression",
    "drain",
    "export_changes",
    "open_compressed",
    "open_decompressed",
    "open_export",
    "tar_tree",
    "tree_size",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'graphdriver.archive' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
