"""Registries: pull and push images over the OCI distribution API.

- :func:`pull` / :class:`PullOptions` / :class:`PullResult` (:mod:`.pull`): a reference into the
  layer store, layers downloaded in parallel and applied as they arrive.
- :func:`push`, :func:`push_image` / :class:`PushOptions` / :class:`PushResult` (:mod:`.push`):
  an image from the store to a registry, sending only the blobs the registry lacks.
- :class:`RegistryClient`, :class:`RetryPolicy`, :class:`RegistryError` (:mod:`.client`): the
  distribution API over httpx (auth, retries, uploads, mounts).
- :func:`parse_reference` / :class:`Reference` (:mod:`.reference`), :class:`Platform`
  (:mod:`.manifests`), :func:`find_credentials` / :class:`Credentials` (:mod:`.auth`),
  progress events (:mod:`.progress`).

Names are imported lazily: importing this package does not import httpx.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Credentials": "graphdriver.registry.auth",
    "find_credentials": "graphdriver.registry.auth",
    "RegistryClient": "graphdriver.registry.client",
    "RegistryError": "graphdriver.registry.client",
    "RetryPolicy": "graphdriver.registry.client",
    "Platform": "graphdriver.registry.manifests",
    "Event": "graphdriver.registry.progress",
    "PullOptions": "graphdriver.registry.pull",
    "PullResult": "graphdriver.registry.pull",
    "pull": "graphdriver.registry.pull",
    "PushOptions": "graphdriver.registry.push",
    "PushResult": "graphdriver.registry.push",
    "push": "graphdriver.registry.push",
    "push_image": "graphdriver.registry.push",
    "Reference": "graphdriver.registry.reference",
    "parse_reference": "graphdriver.registry.reference",
}

__all__ = [
    "Credentials",
    "Event",
    "Platform",
    "PullOptions",
    "PullResult",
    "PushOptions",
    "PushResult",
    "Reference",
    "RegistryClient",
    "RegistryError",
    "RetryPolicy",
    "find_credentials",
    "parse_reference",
    "pull",
    "push",
    "push_image",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'graphdriver.registry' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
