"""Where a reference lives: the distribution API host of a registry domain.

References are parsed and normalised by :mod:`graphdriver.images.references` (Docker's grammar:
``busybox`` is ``docker.io/library/busybox:latest``); this module adds what only a registry
client needs: the host that serves a domain's API (``docker.io`` is served by
``registry-1.docker.io``) and what to ask it for (the digest if there is one, else the tag).
"""

from __future__ import annotations

from graphdriver.images.references import DEFAULT_DOMAIN, DEFAULT_TAG, Reference, parse_reference

__all__ = ["DOCKER_HUB_API", "Reference", "api_host", "credentials_domain", "parse_reference", "target"]

DOCKER_HUB_API = "registry-1.docker.io"
"""the host that serves Docker Hub's distribution API"""


def api_host(ref: Reference) -> str:
    """``host[:port]`` of the distribution API for ``ref``."""
    return DOCKER_HUB_API if ref.domain == DEFAULT_DOMAIN else ref.domain


def credentials_domain(host: str) -> str:
    """The key credentials are stored under for an API host (Docker Hub's is ``docker.io``)."""
    return DEFAULT_DOMAIN if host == DOCKER_HUB_API else host


def target(ref: Reference) -> str:
    """What to ask the registry for: the digest when the reference has one, else the tag."""
    return ref.digest or ref.tag or DEFAULT_TAG
