"""Images over the layer store: OCI layout / oci-archive / docker-archive import and export,
names and tags, containers and commit.

- :class:`ImageStore` (:mod:`~graphdriver.images.imagestore`): open one over a storage root;
  ``import_image``, ``images``, ``get``, ``tag``, ``rmi``, ``prune``, ``export_image``,
  ``create_container``, ``mount_container``, ``commit``, ``df``, ``tree``, ``check``.
- :mod:`~graphdriver.images.references`: ``name:tag`` / digest parsing and normalising.
- :mod:`~graphdriver.images.manifests`: the OCI JSON documents, parsed strictly.
- :mod:`~graphdriver.images.ocilayout` and :mod:`~graphdriver.images.archives`: the layout
  directory and the archive formats, read as untrusted input and written deterministically.
- :mod:`~graphdriver.images.importer`, :mod:`~graphdriver.images.exporter`,
  :mod:`~graphdriver.images.containers`, :mod:`~graphdriver.images.checking`: the operations.
- :mod:`~graphdriver.images.records`: their rows in the layer store's database.

Names are imported lazily, so ``import graphdriver.images`` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ImageStore": "graphdriver.images.imagestore",
    "Image": "graphdriver.images.imagestore",
    "Container": "graphdriver.images.imagestore",
    "ImageCheckReport": "graphdriver.images.imagestore",
    "ImageDiskUsage": "graphdriver.images.imagestore",
    "GcResult": "graphdriver.images.imagestore",
    "RemoveReport": "graphdriver.images.imagestore",
    "Reference": "graphdriver.images.references",
    "parse_reference": "graphdriver.images.references",
    "parse_digest": "graphdriver.images.references",
    "Platform": "graphdriver.images.manifests",
    "ImportProgress": "graphdriver.images.importer",
    "import_image": "graphdriver.images.importer",
    "ExportProgress": "graphdriver.images.exporter",
    "ExportResult": "graphdriver.images.exporter",
    "export_image": "graphdriver.images.exporter",
}

__all__ = [
    "Container",
    "ExportProgress",
    "ExportResult",
    "GcResult",
    "Image",
    "ImageCheckReport",
    "ImageDiskUsage",
    "ImageStore",
    "ImportProgress",
    "Platform",
    "Reference",
    "RemoveReport",
    "export_image",
    "import_image",
    "parse_digest",
    "parse_reference",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'graphdriver.images' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
