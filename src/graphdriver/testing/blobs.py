"""Layer blobs for tests: a layer tar with its blob and the digests a manifest gives them, and a
tree packed the two reference ways (GNU tar, graphdriver's own export).

Shared by the layer-store, image and reliability suites (and usable by out-of-tree drivers'
tests): :func:`blob` makes a :class:`Blob` from a tar and a compression; :func:`gnu_tar` and
:func:`library_tar` pack a directory.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from graphdriver.testing.tarbuild import compress

__all__ = ["MEDIA_TYPES", "Blob", "blob", "gnu_tar", "library_tar", "sha256"]

Compression = Literal["none", "gzip", "zstd", "bzip2", "xz"]

MEDIA_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
"""OCI layer media types by compression."""


def sha256(data: bytes) -> str:
    """``data``'s digest, ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """A layer as a registry hands it out: the blob (``data``) and its descriptor, plus the
    uncompressed ``tar`` whose digest is the diff ID."""

    data: bytes
    tar: bytes
    compression: str = "none"

    @property
    def digest(self) -> str:
        return sha256(self.data)

    @property
    def diff_id(self) -> str:
        return sha256(self.tar)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.compression]

    def descriptor(self) -> dict[str, Any]:
        """The OCI descriptor of the blob."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    def write(self, path: Path) -> Path:
        """Write the blob to ``path``; return ``path``."""
        path.write_bytes(self.data)
        return path


def blob(tar: bytes, compression: str = "none") -> Blob:
    """The layer ``tar`` compressed as ``compression`` (none, gzip, zstd, bzip2, xz;
    reproducible bytes)."""
    return Blob(compress(tar, cast(Compression, compression)), tar, compression)


def gnu_tar(src: Path) -> bytes:
    """``src``'s content as GNU tar writes it (pax format, numeric owners, xattrs, sorted)."""
    return subprocess.run(
        [
            "tar",
            "--format=pax",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--sort=name",
            "-C",
            str(src),
            "-cf",
            "-",
            ".",
        ],
        check=True,
        capture_output=True,
    ).stdout


def library_tar(src: Path) -> bytes:
    """``src``'s content as graphdriver exports a whole tree (deterministic)."""
    from graphdriver.archive.export import tar_tree

    out = io.BytesIO()
    tar_tree(src, out)
    return out.getvalue()
