"""What an import reads from: a set of named files (an OCI layout directory or the members of an
archive) and the image found in them.

- :class:`Files` is the reading interface both :class:`~graphdriver.images.ocilayout.DirFiles`
  and :class:`~graphdriver.images.archives.TarFiles` implement: the size of a file, a small file
  read whole, and the big ones (layer blobs) streamed in the order the import needs them.
- :class:`ResolvedImage` is what :func:`~graphdriver.images.ocilayout.resolve_layout` and
  :func:`~graphdriver.images.archives.resolve_docker_archive` find: the config (verified), the
  manifest, and one :class:`LayerSpec` per layer: which file holds its blob and what the blob's
  descriptor promises (digest, size), if anything.
- :func:`read_verified` reads a small blob and checks it against its descriptor.

Names given to :class:`Files` are always built by this package from validated digests or from
archive member names that passed :func:`~graphdriver.images.archives.clean_member_name`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from graphdriver.errors import DigestMismatch, InvalidArchive
from graphdriver.images.manifests import MAX_DOCUMENT, ImageConfig

__all__ = ["Files", "LayerSpec", "ResolvedImage", "read_verified", "sha256_digest"]


class Files(Protocol):
    """Named files of an image source."""

    label: str
    """how error messages name the source"""

    def size(self, name: str) -> int:
        """The size of file ``name``; NotFound if there is none."""
        ...

    def read(self, name: str, limit: int) -> bytes:
        """The whole content of ``name`` (InvalidArchive if larger than ``limit``)."""
        ...

    def open_in_order(self, names: Sequence[str]) -> Generator[tuple[int, BinaryIO], None, None]:
        """Yield ``(i, stream)`` for ``i`` = 0, 1, ... ``len(names) - 1``, in that order; each
        stream must be read (or abandoned) before the next item is asked for."""
        ...


@dataclass(frozen=True)
class LayerSpec:
    """Where one layer's blob is, and what its descriptor says about it."""

    name: str
    """the file holding the blob"""
    digest: str | None
    """the blob's digest, when the source states one (OCI descriptors; Docker 25+ blob names)"""
    size: int | None
    media_type: str | None


@dataclass(frozen=True)
class ResolvedImage:
    """An image found in a source, its config verified, its layers not read yet."""

    config: ImageConfig
    config_digest: str
    """``sha256:`` of the config bytes: the image id"""
    config_media_type: str
    manifest: bytes | None
    """the manifest as the source has it (None for docker-archive, which has none)"""
    manifest_digest: str | None
    manifest_media_type: str | None
    layers: tuple[LayerSpec, ...]
    names: tuple[str, ...]
    """names the source gives the image (RepoTags, ``io.containerd.image.name``), normalised"""


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_verified(files: Files, name: str, digest: str, size: int, what: str) -> bytes:
    """Read a small blob (a manifest, index or config) and check its size and digest."""
    if size > MAX_DOCUMENT:
        raise InvalidArchive(f"{files.label}: {what} {digest} is {size} bytes, more than {MAX_DOCUMENT}")
    actual = files.size(name)
    if actual != size:
        raise DigestMismatch(
            f"{files.label}: {what} {digest} is {actual} bytes, its descriptor says {size}"
            + (" (truncated)" if actual < size else "")
        )
    data = files.read(name, size)
    algo = digest.partition(":")[0]
    got = f"{algo}:{hashlib.new(algo, data).hexdigest()}"
    if got != digest:
        raise DigestMismatch(f"{files.label}: {what} {digest} has content that hashes to {got}")
    return data
