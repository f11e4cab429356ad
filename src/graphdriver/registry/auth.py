"""Registry credentials and the authentication handshake (basic, bearer tokens).

**Where credentials come from.** Docker-style JSON files with an ``auths`` map; the first file
in this order that has an entry for the registry wins (the order of containers/image)::

    an explicit path (RegistryClient(auth_file=...))
    $REGISTRY_AUTH_FILE
    $XDG_RUNTIME_DIR/containers/auth.json
    $DOCKER_CONFIG/config.json, else ~/.docker/config.json

An entry's key is ``host[:port]``, optionally with a repository path (``host/team``: the most
specific key wins) or a URL scheme (``https://host``, ``https://index.docker.io/v1/``). Its
value carries ``auth`` (base64 ``user:password``) or ``username``/``password``, and may carry an
``identitytoken`` (an OAuth2 refresh token from ``docker login``) or a ``registrytoken`` (a
bearer token sent as is). ``credHelpers``/``credsStore`` name a ``docker-credential-<name>``
program, run as ``docker-credential-<name> get`` with the server on stdin.

**The handshake** (docker/distribution docs/spec/auth/token.md). A request without
credentials gets ``401`` and ``WWW-Authenticate``:

- ``Basic realm=...``: the username and password go in every request.
- ``Bearer realm=URL,service=S,scope=...``: ask the token server at ``URL`` for a token for the
  scopes the request needs (``repository:NAME:pull[,push]``), with ``GET ?service&scope&account``
  and Basic credentials (or anonymously), or with ``POST grant_type=refresh_token`` when an
  identity token is known; send ``Authorization: Bearer <token>`` until it expires.

Tokens are cached per set of scopes; credentials are never sent to a plain-HTTP token server
unless the registry itself was reached over plain HTTP (``--insecure``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from graphdriver.errors import InvalidArgument, PermissionDenied

if TYPE_CHECKING:
    import httpx

__all__ = [
    "Authenticator",
    "Challenge",
    "Credentials",
    "auth_file_candidates",
    "find_credentials",
    "parse_challenges",
    "registry_message",
    "repository_scope",
]

CLIENT_ID = "graphdriver"
DEFAULT_TOKEN_LIFETIME_S = 60
_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Credentials:
    """What a config file holds for one registry."""

    username: str | None = None
    password: str | None = None
    identity_token: str | None = None
    registry_token: str | None = None
    source: str = ""
    """the file (or helper) they came from, for messages"""

    def basic(self) -> str | None:
        """The ``Authorization`` value for Basic auth, if there is a username and password."""
        if self.username is None or self.password is None:
            return None
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def auth_file_candidates(explicit: str | os.PathLike[str] | None = None) -> list[Path]:
    """The config files searched, in order (existing or not)."""
    out: list[Path] = []
    if explicit:
        out.append(Path(explicit))
    env = os.environ.get("REGISTRY_AUTH_FILE")
    if env:
        out.append(Path(env))
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        out.append(Path(runtime) / "containers" / "auth.json")
    docker_config = os.environ.get("DOCKER_CONFIG")
    if docker_config:
        out.append(Path(docker_config) / "config.json")
    else:
        out.append(Path.home() / ".docker" / "config.json")
    return out


def _normalize_key(key: str) -> str:
    """``https://host/v1/`` -> ``host``; ``host/path/`` -> ``host/path``."""
    if "://" in key:
        parts = urlsplit(key)
        key = parts.netloc + (parts.path if parts.path not in ("", "/", "/v1/", "/v1", "/v2/", "/v2") else "")
    return key.rstrip("/")


def _keys_for(domain: str, repository: str | None) -> list[str]:
    """Config keys that apply to ``domain/repository``, most specific first."""
    keys: list[str] = []
    if repository:
        parts = repository.split("/")
        for n in range(len(parts), 0, -1):
            keys.append(f"{domain}/{'/'.join(parts[:n])}")
    keys.append(domain)
    if domain in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        keys.extend(_normalize_key(k) for k in _HUB_KEYS)
    return keys


def _decode_entry(entry: Any, source: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    username = entry.get("username") if isinstance(entry.get("username"), str) else None
    password = entry.get("password") if isinstance(entry.get("password"), str) else None
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            user, sep, pw = base64.b64decode(encoded, validate=False).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            raise InvalidArgument(f"{source}: the 'auth' value is not base64 of user:password") from None
        if not sep:
            raise InvalidArgument(f"{source}: the 'auth' value is not base64 of user:password")
        username, password = user, pw
    identity = entry.get("identitytoken") if isinstance(entry.get("identitytoken"), str) else None
    registry_token = entry.get("registrytoken") if isinstance(entry.get("registrytoken"), str) else None
    if not (username or identity or registry_token):
        return None
    return Credentials(username, password, identity or None, registry_token or None, source)


def _from_helper(helper: str, server: str) -> Credentials | None:
    program = shutil.which(f"docker-credential-{helper}")
    if program is None:
        return None
    try:
        done = subprocess.run(
            [program, "get"], input=server.encode(), capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    try:
        doc = json.loads(done.stdout)
    except json.JSONDecodeError:
        return None
    user, secret = doc.get("Username"), doc.get("Secret")
    if not isinstance(secret, str):
        return None
    source = f"docker-credential-{helper}"
    if user == "<token>":
        return Credentials(identity_token=secret, source=source)
    return Credentials(user if isinstance(user, str) else None, secret, source=source)


def find_credentials(
    domain: str, repository: str | None = None, *, auth_file: str | os.PathLike[str] | None = None
) -> Credentials | None:
    """The credentials for ``domain`` (and ``repository``) from the first config file that has
    them, or None. A file that exists but is not valid JSON is :class:`InvalidArgument`."""
    wanted = _keys_for(domain, repository)
    for path in auth_file_candidates(auth_file):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise PermissionDenied(f"cannot read {path}: {exc.strerror}") from None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise InvalidArgument(f"{path} is not a JSON object")
        auths: dict[str, Any] = doc.get("auths") or {}
        helpers: dict[str, Any] = doc.get("credHelpers") or {}
        if not isinstance(auths, dict) or not isinstance(helpers, dict):
            raise InvalidArgument(f"{path}: 'auths' and 'credHelpers' must be JSON objects")
        by_key = {_normalize_key(k): v for k, v in auths.items()}
        for key in wanted:
            helper = helpers.get(key)
            if isinstance(helper, str) and helper:
                found = _from_helper(helper, key)
                if found is not None:
                    return found
            if key in by_key:
                found = _decode_entry(by_key[key], str(path))
                if found is not None:
                    return found
        store = doc.get("credsStore")
        if isinstance(store, str) and store:
            server = _HUB_KEYS[0] if domain == "docker.io" else domain
            found = _from_helper(store, server)
            if found is not None:
                return found
    return None


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: the scheme (lowercase) and its parameters."""

    scheme: str
    params: dict[str, str]


_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*(,|$)')
_SCHEME_RE = re.compile(r"\s*([A-Za-z][A-Za-z0-9_-]*)(?:\s+|$)")


def parse_challenges(headers: Iterable[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` values (RFC 7235; several per header are allowed)."""
    out: list[Challenge] = []
    for value in headers:
        pos = 0
        while pos < len(value):
            m = _SCHEME_RE.match(value, pos)
            if m is None:
                break
            scheme, pos = m.group(1).lower(), m.end()
            params: dict[str, str] = {}
            while pos < len(value):
                p = _PARAM_RE.match(value, pos)
                if p is None:
                    break
                raw = p.group(2)
                params[p.group(1).lower()] = (
                    re.sub(r"\\(.)", r"\1", raw) if raw is not None else (p.group(3) or "")
                )
                pos = p.end()
            out.append(Challenge(scheme, params))
            while pos < len(value) and value[pos] in ", ":
                pos += 1
    return out


def repository_scope(repository: str, actions: Sequence[str]) -> str:
    """``repository:NAME:pull,push``."""
    return f"repository:{repository}:{','.join(actions)}"


@dataclass
class _Token:
    value: str
    expires: float


class Authenticator:
    """Answers ``Authorization`` for a registry's requests; thread-safe.

    ``header(scopes)`` gives what to send (None before any challenge was seen, or when the
    registry never asked); ``challenged(response, scopes)`` learns from a 401 and returns whether
    the request is worth repeating (False: no credentials would change the answer).
    """

    def __init__(
        self,
        client: httpx.Client,
        registry: str,
        credentials: Credentials | None,
        *,
        insecure: bool,
    ) -> None:
        self._client = client
        self._registry = registry
        self.credentials = credentials
        self._insecure = insecure
        self._lock = threading.Lock()
        self._challenge: Challenge | None = None
        self._tokens: dict[frozenset[str], _Token] = {}

    def header(self, scopes: Sequence[str]) -> str | None:
        challenge = self._challenge
        if challenge is None:
            if self.credentials is not None and self.credentials.registry_token:
                return f"Bearer {self.credentials.registry_token}"
            return None
        if challenge.scheme == "basic":
            return None if self.credentials is None else self.credentials.basic()
        with self._lock:
            wanted = frozenset(scopes)
            now = time.monotonic()
            for key, tok in self._tokens.items():
                if wanted <= key and tok.expires > now:
                    return f"Bearer {tok.value}"
            token = self._fetch(challenge, scopes)
            self._tokens[wanted] = token
            return f"Bearer {token.value}"

    def challenged(self, response: httpx.Response, scopes: Sequence[str]) -> bool:
        """Learn from a 401; True when a retry with (new) credentials can succeed."""
        found = parse_challenges(response.headers.get_list("www-authenticate"))
        usable = [c for c in found if c.scheme in ("bearer", "basic")]
        if not usable:
            return False
        chosen = next((c for c in usable if c.scheme == "bearer"), usable[0])
        with self._lock:
            self._challenge = chosen
            for key in [k for k in self._tokens if frozenset(scopes) <= k]:
                del self._tokens[key]
        if chosen.scheme == "basic":
            return self.credentials is not None and self.credentials.basic() is not None
        return True

    def describe_missing(self) -> str:
        if self.credentials is None:
            searched = ", ".join(str(p) for p in auth_file_candidates())
            return f"no credentials for {self._registry} (searched {searched})"
        return f"credentials from {self.credentials.source}"

    def _fetch(self, challenge: Challenge, scopes: Sequence[str]) -> _Token:
        import httpx

        realm = challenge.params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise PermissionDenied(f"registry {self._registry}: unusable token realm {realm!r}")
        creds = self.credentials
        send_secrets = creds is not None and (parts.scheme == "https" or self._insecure)
        service = challenge.params.get("service")
        want = list(scopes) or ([challenge.params["scope"]] if challenge.params.get("scope") else [])
        try:
            if send_secrets and creds is not None and creds.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "client_id": CLIENT_ID,
                    "scope": " ".join(want),
                }
                if service:
                    form["service"] = service
                resp = self._client.post(realm, data=form)
            else:
                params: list[tuple[str, str | int | float | bool | None]] = []
                if service:
                    params.append(("service", service))
                params.extend(("scope", s) for s in want)
                headers = {}
                basic = creds.basic() if (send_secrets and creds is not None) else None
                if basic is not None and creds is not None and creds.username:
                    params.append(("account", creds.username))
                    headers["Authorization"] = basic
                resp = self._client.get(realm, params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise PermissionDenied(
                f"registry {self._registry}: token server {realm} unreachable: {exc}"
            ) from None
        if resp.status_code in (401, 403):
            raise PermissionDenied(
                f"registry {self._registry}: the token server refused"
                f" {self.describe_missing()}: {registry_message(resp)}"
            )
        if resp.status_code != 200:
            raise PermissionDenied(
                f"registry {self._registry}: token server answered {resp.status_code}:"
                f" {registry_message(resp)}"
            )
        try:
            doc = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PermissionDenied(f"registry {self._registry}: token server sent no JSON") from None
        value = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(value, str) or not value:
            raise PermissionDenied(f"registry {self._registry}: token server sent no token")
        lifetime = doc.get("expires_in")
        if not isinstance(lifetime, int) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME_S
        return _Token(value, time.monotonic() + max(1, lifetime - 5))


def registry_message(resp: httpx.Response) -> str:
    """The registry's (or token server's) own words: its ``errors`` messages, else the body."""
    try:
        body = resp.read()
    except Exception:
        return resp.reason_phrase or str(resp.status_code)
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict):
        errs = doc.get("errors")
        if isinstance(errs, list) and errs:
            parts = []
            for e in errs:
                if isinstance(e, dict):
                    code, msg = e.get("code"), e.get("message")
                    parts.append(f"{code}: {msg}" if code and msg else str(msg or code))
            if parts:
                return "; ".join(parts)
        for key in ("details", "error", "message"):
            if isinstance(doc.get(key), str):
                return str(doc[key])
    text = body[:200].decode("utf-8", "replace").strip()
    return " ".join(text.split()) or resp.reason_phrase or str(resp.status_code)

