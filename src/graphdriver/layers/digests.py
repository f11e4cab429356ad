"""Digests, chain IDs and layer ids: the identities of the layer store.

- A *digest* is ``<algorithm>:<lowercase hex>`` (OCI image spec, descriptor.md); the store
  accepts sha256 and sha512.
- A layer's *diff ID* is the digest of its uncompressed tar; the *chain ID* names the whole
  stack below and including it (OCI image spec, config.md, "Layer ChainID")::

      ChainID(L0)     = DiffID(L0)
      ChainID(L0..Ln) = sha256( ChainID(L0..Ln-1) + " " + DiffID(Ln) )   (hex digest, "sha256:")

  so importing the same stack twice finds the same chain IDs and stores nothing twice.
- A *store id* is 64 random hex digits; it is also the layer's id in the driver.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable

from graphdriver.errors import InvalidArgument

_HEX_LEN = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"(sha256|sha512):([0-9a-f]+)")


def validate_digest(digest: str) -> str:
    """Return ``digest`` if it is a well-formed sha256/sha512 digest, else raise InvalidArgument."""
    m = _DIGEST_RE.fullmatch(digest) if isinstance(digest, str) else None
    if m is None or len(m.group(2)) != _HEX_LEN[m.group(1)]:
        raise InvalidArgument(f"invalid digest {digest!r}: expected sha256:<64 hex> or sha512:<128 hex>")
    return digest


def algorithm(digest: str) -> str:
    """The algorithm part of a valid digest (``"sha256"``)."""
    return validate_digest(digest).partition(":")[0]


def chain_id(parent_chain_id: str | None, diff_id: str) -> str:
    """The chain ID of a layer with ``diff_id`` on a stack whose chain ID is ``parent_chain_id``."""
    validate_digest(diff_id)
    if parent_chain_id is None:
        return diff_id
    validate_digest(parent_chain_id)
    return "sha256:" + hashlib.sha256(f"{parent_chain_id} {diff_id}".encode("ascii")).hexdigest()


def chain_ids(diff_ids: Iterable[str]) -> list[str]:
    """The chain ID of every prefix of ``diff_ids`` (bottom layer first)."""
    out: list[str] = []
    for d in diff_ids:
        out.append(chain_id(out[-1] if out else None, d))
    return out


def new_layer_id() -> str:
    """A fresh random store id: 64 lowercase hex digits."""
    return secrets.token_hex(32)
