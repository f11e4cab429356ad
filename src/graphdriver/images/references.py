"""Image references (``name:tag``, ``name@digest``) and digests: parsing, validation, normalising.

Names follow the grammar of the distribution reference library that docker, podman and skopeo
share, and are normalised the same way, so ``alpine``, ``library/alpine:latest`` and
``docker.io/library/alpine:latest`` are one name:

- a first component that contains ``.`` or ``:`` or is ``localhost`` is a registry domain;
  otherwise the domain is ``docker.io`` (``index.docker.io`` is the same registry);
- on ``docker.io`` a one-component path gets ``library/`` in front;
- a name without a tag or digest gets the tag ``latest``.

Path components are lowercase ``[a-z0-9]`` runs joined by ``.``, ``_``, ``__`` or dashes; a tag
is ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``; the whole name is at most 255 characters.

Digests (:func:`parse_digest`) are strict: ``sha256:`` and 64 lowercase hex digits, or
``sha512:`` and 128, and nothing else. Every digest read from an image is checked with it before it
is used to build a path (CVE-2014-9358).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from graphdriver.errors import InvalidArgument

__all__ = [
    "DEFAULT_DOMAIN",
    "DEFAULT_TAG",
    "Reference",
    "digest_hex",
    "is_digest",
    "parse_digest",
    "parse_reference",
    "try_parse_reference",
]

DEFAULT_DOMAIN = "docker.io"
DEFAULT_TAG = "latest"
_LEGACY_DOMAIN = "index.docker.io"
_OFFICIAL_PREFIX = "library/"
_MAX_NAME = 255

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST_RE = re.compile(r"(sha256|sha512):([0-9a-f]+)")
_HEX_LEN = {"sha256": 64, "sha512": 128}
_PATH_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_DOMAIN_RE = re.compile(_DOMAIN)
_TAG_RE = re.compile(_TAG, re.ASCII)


def is_digest(text: str) -> bool:
    """Whether ``text`` is a well-formed sha256/sha512 digest."""
    m = _DIGEST_RE.fullmatch(text) if isinstance(text, str) else None
    return m is not None and len(m.group(2)) == _HEX_LEN[m.group(1)]


def parse_digest(text: object, what: str = "digest") -> str:
    """Return ``text`` if it is a well-formed digest, else raise :class:`InvalidArgument`."""
    if not isinstance(text, str) or not is_digest(text):
        shown = text if isinstance(text, str) else type(text).__name__
        raise InvalidArgument(f"invalid {what} {shown!r}: expected sha256:<64 hex> or sha512:<128 hex>")
    return text


def digest_hex(digest: str) -> str:
    """The hex part of a valid digest."""
    return parse_digest(digest).partition(":")[2]


@dataclass(frozen=True)
class Reference:
    """A normalised reference: ``domain/path[:tag][@digest]``."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``domain/path``: the repository."""
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        out = self.name
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out

    @property
    def familiar(self) -> str:
        """The short form docker prints (``alpine:latest`` for ``docker.io/library/alpine:latest``)."""
        name = self.name
        if self.domain == DEFAULT_DOMAIN:
            name = self.path.removeprefix(_OFFICIAL_PREFIX)
        if self.tag is not None:
            name += f":{self.tag}"
        if self.digest is not None:
            name += f"@{self.digest}"
        return name

    def with_tag(self, tag: str) -> Reference:
        if not _TAG_RE.fullmatch(tag):
            raise InvalidArgument(f"invalid tag {tag!r}: use [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")
        return Reference(self.domain, self.path, tag, None)


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        return first, rest
    return DEFAULT_DOMAIN, name


def parse_reference(text: str, *, default_tag: bool = True) -> Reference:
    """Parse and normalise ``text`` (see the module docstring); :class:`InvalidArgument` if bad.

    With ``default_tag`` a reference with neither tag nor digest gets the tag ``latest``.
    """
    if not isinstance(text, str) or not text or text != text.strip():
        raise InvalidArgument(f"invalid image reference {text!r}")
    rest = text
    digest: str | None = None
    if "@" in rest:
        rest, _, digest_text = rest.rpartition("@")
        digest = parse_digest(digest_text, "digest in reference")
    tag: str | None = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise InvalidArgument(f"invalid tag {tag!r} in image reference {text!r}")
    domain, path = _split_domain(rest)
    if not _DOMAIN_RE.fullmatch(domain):
        raise InvalidArgument(f"invalid registry {domain!r} in image reference {text!r}")
    if path != path.lower() and _PATH_RE.fullmatch(path.lower()):
        raise InvalidArgument(f"invalid image reference {text!r}: repository names must be lowercase")
    if not _PATH_RE.fullmatch(path):
        raise InvalidArgument(f"invalid image reference {text!r}")
    if domain == _LEGACY_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = _OFFICIAL_PREFIX + path
    if len(domain) + 1 + len(path) > _MAX_NAME:
        raise InvalidArgument(f"image name longer than {_MAX_NAME} characters: {text[:80]!r}...")
    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest)


def try_parse_reference(text: str, *, default_tag: bool = True) -> Reference | None:
    """:func:`parse_reference`, or None when ``text`` is not a reference."""
    try:
        return parse_reference(text, default_tag=default_tag)
    except InvalidArgument:
        return None
