"""Plain data types shared by the archive modules and the drivers.

- :class:`Change` / :class:`ChangeKind`: one entry of a change list, as the seed's
  ``archive.Change`` (``C /path``, ``A /path``, ``D /path``).
- :class:`WhiteoutFormat`: how deletions are represented on disk.
- :class:`Limits`: bounds on what one layer may make the applier do.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ChangeKind(enum.IntEnum):
    """The kind of a change; the values are the seed's (Modify=0, Add=1, Delete=2)."""

    MODIFY = 0
    ADD = 1
    DELETE = 2

    @property
    def letter(self) -> str:
        return "CAD"[self.value]


@dataclass(frozen=True, order=True)
class Change:
    """One change: an absolute path inside the layer ("/etc/passwd") and its kind."""

    path: str
    kind: ChangeKind

    def __str__(self) -> str:
        return f"{self.kind.letter} {self.path}"


class WhiteoutFormat(enum.Enum):
    """How a layer directory represents deletions.

    ``OCI``: the tree is a full, flat root filesystem; a ``.wh.x`` entry deletes ``x`` and an
    opaque marker empties the directory of lower content. Nothing of the whiteout remains.

    ``OVERLAY``: the tree is an overlay upper dir on top of lower dirs; a deletion is a 0/0 char
    device and an opaque directory carries ``trusted.overlay.opaque=y`` (``user.overlay.opaque``
    with ``userxattr``). Whiteouts are materialised whether or not the target exists here.
    """

    OCI = "oci"
    OVERLAY = "overlay"


@dataclass(frozen=True)
class Limits:
    """Bounds on one layer, checked while streaming; passing one raises LimitExceeded.

    The defaults are generous for real images and stop bombs: 64 GiB decompressed, 4 million
    entries, 16 GiB per entry (apparent size for sparse files), 1 MiB per header (PAX/GNU long
    names), path depth 512 components, path length 16 KiB.
    """

    max_decompressed_bytes: int = 64 << 30
    max_entries: int = 4_000_000
    max_entry_size: int = 16 << 30
    max_header_size: int = 1 << 20
    max_path_depth: int = 512
    max_path_length: int = 16 << 10
