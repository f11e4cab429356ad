"""The OCI (and Docker v2) JSON documents of an image: descriptors, indexes, manifests, configs.

Everything read here comes from an untrusted image, so parsing is strict and every failure is an
:class:`~graphdriver.errors.InvalidArchive` naming the document and the field:

- a *descriptor* (OCI descriptor.md) needs a media type string, a digest that
  :func:`~graphdriver.images.references.parse_digest` accepts and a non-negative integer size;
- an *index* (image-index.md; Docker's manifest list) lists manifest descriptors, each with an
  optional platform (os, architecture, variant);
- a *manifest* (manifest.md; Docker's schema 2) has one config descriptor and the layer
  descriptors, bottom layer first;
- a *config* (config.md) has ``rootfs.type == "layers"`` and ``rootfs.diff_ids``, one per layer.

JSON documents are limited in size (:data:`MAX_DOCUMENT`) before they are read, and read with
duplicate keys refused (a parser differential: Go keeps the last, some tools the first).
:func:`canonical_json` writes the documents this package makes: compact, keys sorted, so the
same content always has the same digest.
"""

from __future__ import annotations

import json
import platform as _platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from graphdriver.errors import InvalidArchive, InvalidArgument
from graphdriver.images.references import parse_digest

__all__ = [
    "ANNOTATION_IMAGE_NAME",
    "ANNOTATION_REF_NAME",
    "CONFIG_TYPES",
    "INDEX_TYPES",
    "LAYER_TYPES",
    "MANIFEST_TYPES",
    "MAX_DOCUMENT",
    "MT_DOCKER_CONFIG",
    "MT_DOCKER_LAYER",
    "MT_DOCKER_LAYER_GZIP",
    "MT_DOCKER_LIST",
    "MT_DOCKER_MANIFEST",
    "MT_OCI_CONFIG",
    "MT_OCI_INDEX",
    "MT_OCI_LAYER",
    "MT_OCI_LAYER_GZIP",
    "MT_OCI_LAYER_ZSTD",
    "MT_OCI_MANIFEST",
    "Descriptor",
    "ImageConfig",
    "Index",
    "Manifest",
    "Platform",
    "canonical_json",
    "host_platform",
    "load_json",
    "parse_config",
    "parse_descriptor",
    "parse_index",
    "parse_manifest",
]

MAX_DOCUMENT = 8 << 20
"""the largest manifest, index or config read into memory (bytes)"""

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MT_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_TYPES = frozenset({MT_OCI_INDEX, MT_DOCKER_LIST})
MANIFEST_TYPES = frozenset({MT_OCI_MANIFEST, MT_DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({MT_OCI_CONFIG, MT_DOCKER_CONFIG})
LAYER_TYPES = frozenset(
    {
        MT_OCI_LAYER,
        MT_OCI_LAYER_GZIP,
        MT_OCI_LAYER_ZSTD,
        MT_DOCKER_LAYER,
        MT_DOCKER_LAYER_GZIP,
        # non-distributable / foreign layers: the same tar formats, only their distribution differs
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"

_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "armv7l": "arm",
    "armv6l": "arm",
}


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def load_json(data: bytes, what: str) -> Any:
    """Parse ``data`` (UTF-8 JSON, duplicate keys refused); InvalidArchive naming ``what``."""
    if len(data) > MAX_DOCUMENT:
        raise InvalidArchive(f"{what} is larger than {MAX_DOCUMENT} bytes")
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidArchive(f"{what} is not valid JSON: {exc}") from None


def canonical_json(value: Any) -> bytes:
    """Compact JSON with sorted keys (the bytes of documents this package writes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArchive(f"{what} must be a JSON object")
    return value


def _string(doc: Mapping[str, Any], key: str, what: str, *, required: bool = True) -> str | None:
    value = doc.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise InvalidArchive(f"{what}: {key!r} must be a string")
    return value


@dataclass(frozen=True)
class Platform:
    """An OCI platform: os, architecture and an optional variant (``linux/arm64/v8``)."""

    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``os/arch[/variant]`` (``linux/amd64``, ``linux/arm/v7``)."""
        parts = text.split("/") if isinstance(text, str) else []
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidArgument(f"invalid platform {text!r}: use os/arch[/variant], e.g. linux/amd64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, other: Platform | None) -> bool:
        """Whether an image for ``other`` runs here (``self`` is the wanted platform). A missing
        variant matches any; arm64's ``v8`` is its default."""
        if other is None:
            return False
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        mine, theirs = self.variant, other.variant
        if self.architecture == "arm64":
            mine, theirs = mine or "v8", theirs or "v8"
        return mine is None or theirs is None or mine == theirs


def host_platform() -> Platform:
    """This machine's platform, in Go's names (``linux/amd64``)."""
    machine = _platform.machine().lower()
    arch = _GOARCH.get(machine, machine)
    variant = None
    if machine.startswith("armv7"):
        variant = "v7"
    elif machine.startswith("armv6"):
        variant = "v6"
    return Platform("linux", arch, variant)


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)
    urls: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform is not None:
            plat: dict[str, Any] = {"architecture": self.platform.architecture, "os": self.platform.os}
            if self.platform.variant:
                plat["variant"] = self.platform.variant
            out["platform"] = plat
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @property
    def ref_name(self) -> str | None:
        return self.annotations.get(ANNOTATION_REF_NAME)


def _platform_of(value: Any, what: str) -> Platform | None:
    if value is None:
        return None
    doc = _object(value, f"{what}: platform")
    os_ = _string(doc, "os", f"{what}: platform")
    arch = _string(doc, "architecture", f"{what}: platform")
    variant = _string(doc, "variant", f"{what}: platform", required=False)
    assert os_ is not None and arch is not None
    return Platform(os_, arch, variant or None)


def parse_descriptor(value: Any, what: str, *, default_media_type: str | None = None) -> Descriptor:
    """A descriptor object, strictly validated (digest before anything uses it)."""
    doc = _object(value, what)
    media_type = doc.get("mediaType", default_media_type)
    if not isinstance(media_type, str) or not media_type:
        raise InvalidArchive(f"{what}: 'mediaType' must be a non-empty string")
    try:
        digest = parse_digest(doc.get("digest"), f"digest in {what}")
    except InvalidArgument as exc:
        raise InvalidArchive(str(exc)) from None
    size = doc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArchive(f"{what}: 'size' must be a non-negative integer")
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise InvalidArchive(f"{what}: 'annotations' must map strings to strings")
    urls = doc.get("urls") or []
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise InvalidArchive(f"{what}: 'urls' must be a list of strings")
    return Descriptor(
        media_type=media_type,
        digest=digest,
        size=size,
        platform=_platform_of(doc.get("platform"), what),
        annotations=dict(annotations),
        urls=tuple(urls),
    )


def _schema2(doc: Mapping[str, Any], what: str) -> None:
    version = doc.get("schemaVersion")
    if version != 2 or isinstance(version, bool):
        raise InvalidArchive(f"{what}: schemaVersion {version!r} is not supported (only 2)")


@dataclass(frozen=True)
class Index:
    """An image index (or Docker manifest list)."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)


def parse_index(data: bytes, what: str = "index") -> Index:
    doc = _object(load_json(data, what), what)
    _schema2(doc, what)
    media_type = doc.get("mediaType", MT_OCI_INDEX)
    if media_type not in INDEX_TYPES:
        raise InvalidArchive(f"{what}: media type {media_type!r} is not an image index")
    items = doc.get("manifests")
    if not isinstance(items, list):
        raise InvalidArchive(f"{what}: 'manifests' must be a list")
    manifests = tuple(parse_descriptor(m, f"{what}: manifests[{i}]") for i, m in enumerate(items))
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise InvalidArchive(f"{what}: 'annotations' must be an object")
    return Index(media_type, manifests, annotations)


@dataclass(frozen=True)
class Manifest:
    """An image manifest: the config and the layers, bottom first."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


def document_kind(data: bytes, what: str) -> str:
    """``"index"`` or ``"manifest"``, by media type, else by shape (media types are optional)."""
    doc = _object(load_json(data, what), what)
    media_type = doc.get("mediaType")
    if media_type in INDEX_TYPES:
        return "index"
    if media_type in MANIFEST_TYPES:
        return "manifest"
    if media_type is not None:
        raise InvalidArchive(f"{what}: media type {media_type!r} is neither an image index nor a manifest")
    if "manifests" in doc:
        return "index"
    if "config" in doc and "layers" in doc:
        return "manifest"
    raise InvalidArchive(f"{what}: neither an image index nor an image manifest")


def parse_manifest(data: bytes, what: str = "manifest") -> Manifest:
    doc = _object(load_json(data, what), what)
    _schema2(doc, what)
    media_type = doc.get("mediaType", MT_OCI_MANIFEST)
    if media_type not in MANIFEST_TYPES:
        raise InvalidArchive(f"{what}: media type {media_type!r} is not an image manifest")
    config = parse_descriptor(doc.get("config"), f"{what}: config")
    if config.media_type not in CONFIG_TYPES:
        raise InvalidArchive(
            f"{what}: config media type {config.media_type!r} is not an image config"
            " (an artifact, not a container image)"
        )
    items = doc.get("layers")
    if not isinstance(items, list):
        raise InvalidArchive(f"{what}: 'layers' must be a list")
    layers = tuple(parse_descriptor(la, f"{what}: layers[{i}]") for i, la in enumerate(items))
    for i, la in enumerate(layers):
        if la.media_type not in LAYER_TYPES:
            raise InvalidArchive(f"{what}: layers[{i}] has media type {la.media_type!r}, not a layer tar")
    return Manifest(media_type, config, layers)


@dataclass(frozen=True)
class ImageConfig:
    """An image config: the parsed document and the fields the store relies on."""

    raw: bytes
    doc: Mapping[str, Any]
    diff_ids: tuple[str, ...]

    @property
    def platform(self) -> Platform | None:
        os_, arch = self.doc.get("os"), self.doc.get("architecture")
        if isinstance(os_, str) and isinstance(arch, str):
            variant = self.doc.get("variant")
            return Platform(os_, arch, variant if isinstance(variant, str) and variant else None)
        return None

    @property
    def created(self) -> str | None:
        value = self.doc.get("created")
        return value if isinstance(value, str) else None


def parse_config(data: bytes, what: str = "image config") -> ImageConfig:
    doc = _object(load_json(data, what), what)
    rootfs = _object(doc.get("rootfs"), f"{what}: rootfs")
    if rootfs.get("type") != "layers":
        raise InvalidArchive(f"{what}: rootfs.type must be 'layers', not {rootfs.get('type')!r}")
    items = rootfs.get("diff_ids")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise InvalidArchive(f"{what}: rootfs.diff_ids must be a list")
    diff_ids = []
    for i, d in enumerate(items):
        try:
            diff_ids.append(parse_digest(d, f"{what}: rootfs.diff_ids[{i}]"))
        except InvalidArgument as exc:
            raise InvalidArchive(str(exc)) from None
    return ImageConfig(data, doc, tuple(diff_ids))
