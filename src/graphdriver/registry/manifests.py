"""What a registry adds to the image documents: content negotiation, platform choice, push's manifest.

A registry answers a reference with one of four documents (parsed strictly by
:mod:`graphdriver.images.manifests`)::

    image index / manifest list      {"manifests": [descriptor + "platform", ...]}
        -> image manifest            {"config": descriptor, "layers": [descriptor, ...]}
              -> config blob         {"architecture", "os", "rootfs": {"diff_ids": [...]}, ...}
              -> layer blobs         tar, tar+gzip, tar+zstd

This module says what to accept (:data:`MANIFEST_ACCEPT`), reads whichever came
(:func:`parse_document`; Docker schema 1 is :class:`NotSupported`), picks a platform out of an
index (:func:`select_platform`) and builds the OCI manifest that push uploads
(:func:`build_manifest`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from graphdriver.errors import NotFound, NotSupported
from graphdriver.images.manifests import (
    MANIFEST_TYPES,
    MT_DOCKER_LAYER,
    MT_DOCKER_LAYER_GZIP,
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
    MT_OCI_INDEX,
    MT_OCI_LAYER,
    MT_OCI_LAYER_GZIP,
    MT_OCI_LAYER_ZSTD,
    MT_OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    document_kind,
    load_json,
    parse_index,
    parse_manifest,
)

__all__ = [
    "COMPRESSION_LAYER_TYPE",
    "MANIFEST_ACCEPT",
    "build_manifest",
    "oci_layer_type",
    "parse_document",
    "select_platform",
]

MANIFEST_ACCEPT = ", ".join((MT_OCI_INDEX, MT_OCI_MANIFEST, MT_DOCKER_LIST, MT_DOCKER_MANIFEST))
"""the Accept header of a manifest request: everything pull can read"""

COMPRESSION_LAYER_TYPE = {"none": MT_OCI_LAYER, "gzip": MT_OCI_LAYER_GZIP, "zstd": MT_OCI_LAYER_ZSTD}
"""the OCI layer media type of each compression push can write"""

_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)


def parse_document(data: bytes, content_type: str = "", what: str = "manifest") -> Manifest | Index:
    """Parse a manifest or an index, whichever ``data`` is."""
    if content_type.split(";", maxsplit=1)[0].strip() in _SCHEMA1:
        raise NotSupported(f"{what} is a Docker schema 1 manifest; only schema 2 and OCI are supported")
    doc = load_json(data, what)
    if isinstance(doc, dict) and doc.get("schemaVersion") == 1:
        raise NotSupported(f"{what} is a Docker schema 1 manifest; only schema 2 and OCI are supported")
    if document_kind(data, what) == "index":
        return parse_index(data, what)
    return parse_manifest(data, what)


def select_platform(index: Index, wanted: Platform) -> Descriptor:
    """The first image manifest of ``index`` for ``wanted``; NotFound lists what it offers."""
    for d in index.manifests:
        if d.media_type in MANIFEST_TYPES and wanted.matches(d.platform):
            return d
    offered = sorted({str(d.platform) for d in index.manifests if d.platform is not None})
    raise NotFound(
        f"no image for platform {wanted} in the index (it has: {', '.join(offered) or 'none'});"
        " choose one with --platform"
    )


def oci_layer_type(media_type: str) -> str:
    """The OCI name of a layer media type (Docker's gzip and plain layers have OCI twins)."""
    twins = {MT_DOCKER_LAYER_GZIP: MT_OCI_LAYER_GZIP, MT_DOCKER_LAYER: MT_OCI_LAYER}
    return twins.get(media_type, media_type)


def build_manifest(config: Descriptor, layers: Sequence[Descriptor]) -> bytes:
    """The OCI image manifest push uploads (compact JSON, fields in the spec's order)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [d.to_json() for d in layers],
    }
    return json.dumps(doc, separators=(",", ":")).encode()

