"""The layer store: content-addressed layers over one driver, crash-safe, for many processes.

- :class:`LayerStore` (:mod:`~graphdriver.layers.store`): import, create, mount, diff, remove.
- :class:`Layer`, :class:`LayerKind`, :class:`LayerState` (:mod:`~graphdriver.layers.metadata`):
  the records, kept in SQLite.
- :func:`chain_id`, :func:`chain_ids` (:mod:`~graphdriver.layers.digests`): OCI chain IDs.
- :class:`CheckReport` (:mod:`~graphdriver.layers.check`) and :class:`RecoveryReport`
  (:mod:`~graphdriver.layers.recovery`): consistency checks and crash recovery.
- :mod:`~graphdriver.layers.locks` and :mod:`~graphdriver.layers.faults`: the fcntl locks and
  the named fault points the crash tests use.
"""

from __future__ import annotations

import importlib
from typing import Any

from graphdriver.layers.digests import chain_id, chain_ids
from graphdriver.layers.metadata import Layer, LayerKind, LayerState

_LAZY = {
    "LayerStore": "graphdriver.layers.store",
    "DiskUsage": "graphdriver.layers.store",
    "CheckReport": "graphdriver.layers.check",
    "Problem": "graphdriver.layers.check",
    "ProblemKind": "graphdriver.layers.check",
    "RecoveryReport": "graphdriver.layers.recovery",
}

__all__ = [
    "CheckReport",
    "DiskUsage",
    "Layer",
    "LayerKind",
    "LayerState",
    "LayerStore",
    "Problem",
    "ProblemKind",
    "RecoveryReport",
    "chain_id",
    "chain_ids",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'graphdriver.layers' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
