"""Validation of layer ids before they touch a path.

An id becomes a directory name under a driver's home, so it must never contain a separator, be
``.`` or ``..``, or carry characters that break overlay mount options (``:`` and ``,``). This is
the check for CVE-2014-9358 ("validate image IDs").
"""

from __future__ import annotations

import re

from graphdriver.errors import InvalidArgument

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+=-]{0,127}")


def validate_id(layer_id: str) -> str:
    """Return ``layer_id`` if it is a safe layer id, else raise :class:`InvalidArgument`."""
    if not isinstance(layer_id, str) or not _ID_RE.fullmatch(layer_id) or layer_id in {".", ".."}:
        raise InvalidArgument(
            f"invalid layer id {layer_id!r}: use 1-128 of [A-Za-z0-9_.@+=-], starting with a letter or digit"
        )
    return layer_id


def validate_parent(parent: str | None) -> str | None:
    """Normalise a parent id: ``None`` or ``""`` mean no parent; anything else must be a valid id."""
    if parent is None or parent == "":
        return None
    return validate_id(parent)
