"""A client of the OCI distribution API (one registry host), over httpx.

Endpoints used (OCI distribution spec; ``<name>`` is the repository)::

    GET  /v2/                                         ping (learns the auth challenge)
    GET  /v2/<name>/manifests/<tag|digest>            manifest or index (Accept: all four types)
    PUT  /v2/<name>/manifests/<tag|digest>            push a manifest
    HEAD /v2/<name>/blobs/<digest>                    does the registry have the blob?
    GET  /v2/<name>/blobs/<digest>                    download (Range: bytes=N- to resume);
                                                      may redirect to blob storage
    POST /v2/<name>/blobs/uploads/?mount=<d>&from=<other>   cross-repository mount
                                                      (201: mounted; 202: a new upload session)
    POST /v2/<name>/blobs/uploads/                    open an upload session (202 + Location)
    PUT  <location>?digest=<d>                        monolithic: the whole blob in one request
    PATCH <location>  Content-Range: a-b              chunked: one chunk (202 + Location + Range)
    PUT  <location>?digest=<d>                        chunked: close the session
    GET  <location>                                   an upload's offset (after a failed chunk)

Behaviour shared by every request:

- one ``httpx.Client`` per registry (connection reuse), explicit timeouts, redirects followed
  (httpx drops ``Authorization`` when a redirect leaves the registry's origin, so blob-storage
  URLs never see the registry's credentials);
- 401 runs the auth handshake once (:mod:`graphdriver.registry.auth`) and repeats the request;
- 429 and 500/502/503/504 are retried with exponential backoff (``Retry-After`` honoured, up to
  :attr:`RetryPolicy.max_retry_after`), as are resets and timeouts of idempotent requests, at most
  :attr:`RetryPolicy.attempts` times in all; then :class:`RegistryError` says what happened;
- 401/403 become :class:`PermissionDenied`, 404 :class:`NotFound`, each with the registry's own
  message (its ``errors`` array); connection refused and TLS failures are one clear line.
"""

from __future__ import annotations

import hashlib
import random
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import BinaryIO

import httpx

from graphdriver import __version__
from graphdriver.errors import (
    DigestMismatch,
    GraphDriverError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RegistryError,
)
from graphdriver.images.manifests import MAX_DOCUMENT
from graphdriver.registry.auth import Authenticator, Credentials, find_credentials, registry_message
from graphdriver.registry.manifests import MANIFEST_ACCEPT
from graphdriver.registry.reference import credentials_domain

__all__ = ["BlobStream", "RegistryClient", "RegistryError", "RetryPolicy"]

USER_AGENT = f"graphdriver/{__version__}"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MONOLITHIC_LIMIT = 32 << 20
"""blobs up to this size are uploaded in one PUT; bigger ones in chunks"""
CHUNK_SIZE = 16 << 20
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``attempts`` tries per request in all, waiting ``base_delay * 2**n``
    (plus jitter, at most ``max_delay``) between them; a server's ``Retry-After`` is obeyed up
    to ``max_retry_after`` seconds."""

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 10.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return float(min(max(retry_after, 0.0), self.max_retry_after))
        backoff = min(self.max_delay, self.base_delay * (2.0 ** (attempt - 1)))
        return float(backoff * (0.75 + 0.5 * random.random()))


DEFAULT_TIMEOUT = httpx.Timeout(connect=15.0, read=60.0, write=60.0, pool=60.0)

Body = Callable[[], bytes | Iterator[bytes]]
"""a request body that can be produced again for a retry"""


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _connect_message(host: str, exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError) or "SSL" in type(cause).__name__:
            return (
                f"TLS handshake with registry {host} failed ({text});"
                " if it serves plain HTTP, use --insecure"
            )
        if isinstance(cause, ConnectionRefusedError) or "refused" in str(cause).lower():
            return f"cannot connect to registry {host}: connection refused"
        cause = cause.__cause__ or cause.__context__
    if "ssl" in text.lower() or "certificate" in text.lower():
        return f"TLS handshake with registry {host} failed ({text}); if it serves plain HTTP, use --insecure"
    return f"cannot connect to registry {host}: {text}"


@dataclass
class BlobStream:
    """An open blob download: iterate :meth:`chunks`; ``skip`` bytes of it were asked not to
    be sent (a server that ignored ``Range``) and are dropped by :meth:`chunks`."""

    response: httpx.Response
    skip: int
    total: int | None

    def chunks(self) -> Iterator[bytes]:
        """The body as it arrives (never buffered up: what arrived before a dropped connection
        is handed out before the error)."""
        skip = self.skip
        for raw in self.response.iter_raw():
            if skip >= len(raw):
                skip -= len(raw)
                continue
            yield raw[skip:] if skip else raw
            skip = 0


class RegistryClient:
    """The distribution API of one registry. Thread-safe; use as a context manager to close.

    ``credentials``: None looks them up in the config files (:func:`find_credentials`, by
    ``repository`` when given); pass :class:`Credentials` to use those. ``insecure`` speaks plain
    HTTP. ``transport`` is for tests that need an httpx transport of their own.
    """

    def __init__(
        self,
        host: str,
        *,
        insecure: bool = False,
        credentials: Credentials | None = None,
        repository: str | None = None,
        auth_file: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: httpx.Timeout | float | None = None,
        transport: httpx.BaseTransport | None = None,
        max_connections: int = 8,
    ) -> None:
        self.host = host
        self.insecure = insecure
        self.base = f"{'http' if insecure else 'https'}://{host}"
        self.retry = retry or RetryPolicy()
        self._client = httpx.Client(
            timeout=timeout if timeout is not None else DEFAULT_TIMEOUT,
            follow_redirects=True,
            max_redirects=5,
            headers={"User-Agent": USER_AGENT},
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
            trust_env=False,
        )
        if credentials is None:
            credentials = find_credentials(credentials_domain(host), repository, auth_file=auth_file)
        self.auth = Authenticator(self._client, host, credentials, insecure=insecure)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the request loop -------------------------------------------------------------------------

    def request(
        self,
        method: str,
        url: str | httpx.URL,
        *,
        scopes: Sequence[str] = (),
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        body: Body | None = None,
        stream: bool = False,
        idempotent: bool | None = None,
        what: str = "",
    ) -> httpx.Response:
        """Send one request with auth, retries and backoff; the response may be any status
        that is not retried (the caller checks it; a streamed one must be closed)."""
        if idempotent is None:
            idempotent = method in ("GET", "HEAD", "PUT", "DELETE")
        if isinstance(url, httpx.URL):
            target = url
        else:
            target = httpx.URL(self.base + url if url.startswith("/") else url)
        attempt = 0
        auth_retried = False
        while True:
            attempt += 1
            send_headers = dict(headers or {})
            authorization = self.auth.header(scopes)
            if authorization is not None:
                send_headers["Authorization"] = authorization
            request = self._client.build_request(
                method, target, headers=send_headers, params=params, content=body() if body else None
            )
            try:
                resp = self._client.send(request, stream=stream)
            except httpx.ConnectError as exc:
                message = _connect_message(self.host, exc)
                if "refused" in message or "TLS" in message or attempt >= self.retry.attempts:
                    raise RegistryError(message) from None
                time.sleep(self.retry.delay(attempt))
                continue
            except httpx.TooManyRedirects:
                raise RegistryError(
                    f"registry {self.host}: too many redirects for {what or target}"
                ) from None
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                if not idempotent or attempt >= self.retry.attempts:
                    raise RegistryError(
                        f"registry {self.host}: {what or method + ' ' + str(target)} failed after"
                        f" {attempt} attempt(s): {type(exc).__name__}: {exc or 'no detail'}"
                    ) from None
                time.sleep(self.retry.delay(attempt))
                continue
            if resp.status_code == 401 and not auth_retried:
                auth_retried = True
                if self.auth.challenged(resp, scopes):
                    resp.close()
                    attempt -= 1
                    continue
            if resp.status_code in RETRY_STATUSES and attempt < self.retry.attempts:
                wait = self.retry.delay(attempt, _retry_after(resp))
                resp.close()
                time.sleep(wait)
                continue
            if resp.status_code in RETRY_STATUSES:
                message = registry_message(resp)
                resp.close()
                raise RegistryError(
                    f"registry {self.host}: {what or method + ' ' + str(target)}: HTTP {resp.status_code}"
                    f" {message} (gave up after {attempt} attempts)"
                )
            return resp

    def fail(self, resp: httpx.Response, what: str) -> GraphDriverError:
        """The error for an unexpected answer (the response is closed)."""
        message = registry_message(resp)
        resp.close()
        if resp.status_code == 401:
            hint = self.auth.describe_missing()
            return PermissionDenied(
                f"{what}: registry {self.host} requires authentication ({hint}): {message}"
            )
        if resp.status_code == 403:
            return PermissionDenied(f"{what}: registry {self.host} denied access: {message}")
        if resp.status_code == 404:
            return NotFound(f"{what}: not found in registry {self.host}: {message}")
        return RegistryError(f"{what}: registry {self.host} answered HTTP {resp.status_code}: {message}")

    # -- API --------------------------------------------------------------------------------------

    def ping(self) -> None:
        """``GET /v2/``: the registry speaks the API (a 401 is fine: it names the auth scheme)."""
        resp = self.request("GET", "/v2/", what="ping")
        resp.close()
        if resp.status_code not in (200, 401):
            raise self.fail(resp, "ping")

    def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        """The manifest or index at ``reference`` (tag or digest): (bytes, media type, digest).

        By digest, the bytes are checked against it; by tag, against the registry's
        ``Docker-Content-Digest`` when it sends one. Either mismatch is DigestMismatch.
        """
        sep = "@" if ":" in reference else ":"
        what = f"manifest {repository}{sep}{reference}"
        resp = self.request(
            "GET",
            f"/v2/{repository}/manifests/{reference}",
            scopes=(pull_scope(repository),),
            headers={"Accept": MANIFEST_ACCEPT},
            stream=True,
            what=what,
        )
        if resp.status_code != 200:
            raise self.fail(resp, what)
        data = self._read_capped(resp, MAX_DOCUMENT, what)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha") and ":" in reference:
            _verify(data, reference, what)
            digest = reference
        else:
            claimed = resp.headers.get("docker-content-digest")
            if claimed and claimed.startswith("sha256:") and claimed != digest:
                raise DigestMismatch(f"{what}: the registry says {claimed} but the content is {digest}")
        media_type = resp.headers.get("content-type", "").split(";")[0].strip()
        return data, media_type, digest

    def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> str:
        """Upload a manifest under a tag or its digest; returns its digest."""
        what = f"pushing manifest {repository}:{reference}"
        resp = self.request(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            scopes=(push_scope(repository),),
            headers={"Content-Type": media_type, "Content-Length": str(len(data))},
            body=lambda: data,
            what=what,
        )
        if resp.status_code not in (200, 201, 202):
            raise self.fail(resp, what)
        resp.close()
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def blob_size(self, repository: str, digest: str) -> int | None:
        """``HEAD`` a blob: its size when the registry has it in ``repository``, else None."""
        resp = self.request(
            "HEAD", f"/v2/{repository}/blobs/{digest}", scopes=(pull_scope(repository),),
            what=f"checking blob {digest}",
        )
        resp.close()
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self.fail(resp, f"checking blob {digest} in {repository}")
        length = resp.headers.get("content-length")
        return int(length) if length and length.isdigit() else 0

    @contextmanager
    def open_blob(self, repository: str, digest: str, offset: int = 0) -> Iterator[BlobStream]:
        """Stream a blob from ``offset`` (a ``Range`` request; a server that ignores it sends
        everything and the first ``offset`` bytes are dropped)."""
        what = f"blob {digest} of {repository}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self.request(
            "GET", f"/v2/{repository}/blobs/{digest}", scopes=(pull_scope(repository),),
            headers=headers, stream=True, what=what,
        )
        try:
            if resp.status_code == 206 and offset:
                skip = 0
            elif resp.status_code == 200:
                skip = offset
            elif resp.status_code == 416 and offset:
                skip = 0
            else:
                raise self.fail(resp, what)
            length = resp.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
            yield BlobStream(resp, skip, total)
        finally:
            resp.close()

    def fetch_blob(self, repository: str, digest: str, size: int, *, limit: int = MAX_DOCUMENT) -> bytes:
        """A small blob (a config) in memory, checked against its digest and size."""
        what = f"blob {digest}"
        if size > limit:
            raise InvalidArgument(f"{what} is {size} bytes; more than the {limit} allowed for a config")
        for attempt in range(1, self.retry.attempts + 1):
            try:
                with self.open_blob(repository, digest) as blob:
                    data = self._read_capped(blob.response, size, what)
                break
            except RegistryError:
                raise
            except httpx.HTTPError as exc:
                if attempt >= self.retry.attempts:
                    raise RegistryError(f"registry {self.host}: reading {what} failed: {exc}") from None
                time.sleep(self.retry.delay(attempt))
        if len(data) != size:
            raise DigestMismatch(f"{what}: expected {size} bytes, the registry sent {len(data)}")
        _verify(data, digest, what)
        return data

    def mount_blob(self, repository: str, digest: str, source: str) -> tuple[bool, httpx.URL | None]:
        """Ask for ``digest`` of ``source`` to be mounted into ``repository``. Returns (True,
        None) when it was, else (False, the upload location the registry opened instead)."""
        what = f"mounting blob {digest} from {source}"
        resp = self.request(
            "POST", f"/v2/{repository}/blobs/uploads/", scopes=(push_scope(repository), pull_scope(source)),
            params={"mount": digest, "from": source}, idempotent=True, what=what,
        )
        resp.close()
        if resp.status_code == 201:
            return True, None
        if resp.status_code == 202:
            return False, self._location(resp)
        if resp.status_code in (401, 403, 404):
            return False, None
        raise self.fail(resp, what)

    def start_upload(self, repository: str) -> httpx.URL:
        what = f"starting an upload to {repository}"
        resp = self.request(
            "POST", f"/v2/{repository}/blobs/uploads/", scopes=(push_scope(repository),),
            idempotent=True, what=what,
        )
        resp.close()
        if resp.status_code != 202:
            raise self.fail(resp, what)
        return self._location(resp)

    def upload_blob(
        self,
        repository: str,
        digest: str,
        size: int,
        open_body: Callable[[], BinaryIO],
        *,
        location: httpx.URL | None = None,
        monolithic_limit: int = MONOLITHIC_LIMIT,
        chunk_size: int = CHUNK_SIZE,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Upload a blob whose bytes ``open_body()`` gives from the start: in one ``PUT`` when
        it is at most ``monolithic_limit`` bytes, else in ``PATCH`` chunks of ``chunk_size``.
        A failed attempt starts over with a new session (at most ``retry.attempts`` times)."""
        for attempt in range(1, self.retry.attempts + 1):
            try:
                where = location or self.start_upload(repository)
                location = None
                if size <= monolithic_limit:
                    self._put_whole(
                        repository=repository, where=where, digest=digest, size=size,
                        open_body=open_body, progress=progress,
                    )
                else:
                    self._put_chunks(
                        repository=repository, where=where, digest=digest, size=size,
                        open_body=open_body, chunk_size=chunk_size, progress=progress,
                    )
                return
            except RegistryError:
                if attempt >= self.retry.attempts:
                    raise
                time.sleep(self.retry.delay(attempt))

    # -- helpers ----------------------------------------------------------------------------------

    def _location(self, resp: httpx.Response) -> httpx.URL:
        value = resp.headers.get("location")
        if not value:
            raise RegistryError(f"registry {self.host} opened an upload without a Location")
        return resp.request.url.join(value)

    def _read_capped(self, resp: httpx.Response, cap: int, what: str) -> bytes:
        buf = bytearray()
        try:
            for chunk in resp.iter_raw(_READ_CHUNK):
                buf += chunk
                if len(buf) > cap:
                    raise DigestMismatch(f"{what}: the registry sent more than {cap} bytes")
        except httpx.HTTPError as exc:
            raise RegistryError(f"registry {self.host}: reading {what} failed: {exc}") from None
        finally:
            resp.close()
        return bytes(buf)

    def _finish(self, digest: str, what: str, resp: httpx.Response) -> None:
        if resp.status_code not in (201, 204):
            raise self.fail(resp, what)
        resp.close()
        claimed = resp.headers.get("docker-content-digest")
        if claimed and claimed != digest:
            raise DigestMismatch(f"{what}: the registry stored {claimed}, not {digest}")

    def _put_whole(
        self,
        *,
        repository: str,
        where: httpx.URL,
        digest: str,
        size: int,
        open_body: Callable[[], BinaryIO],
        progress: Callable[[int], None] | None,
    ) -> None:
        what = f"uploading blob {digest}"
        resp = self.request(
            "PUT", where.copy_merge_params({"digest": digest}), scopes=(push_scope(repository),),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            body=lambda: _file_chunks(open_body, 0, size, progress), idempotent=False, what=what,
        )
        self._finish(digest, what, resp)

    def _put_chunks(
        self,
        *,
        repository: str,
        where: httpx.URL,
        digest: str,
        size: int,
        open_body: Callable[[], BinaryIO],
        chunk_size: int,
        progress: Callable[[int], None] | None,
    ) -> None:
        what = f"uploading blob {digest}"
        offset = 0
        while offset < size:
            end = min(size, offset + chunk_size)
            start = offset
            resp = self.request(
                "PATCH", where, scopes=(push_scope(repository),),
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{start}-{end - 1}",
                    "Content-Length": str(end - start),
                },
                body=lambda start=start, end=end: _file_chunks(open_body, start, end, progress),  # type: ignore[misc]
                idempotent=False, what=what,
            )
            if resp.status_code == 416:
                resp.close()
                offset, where = self._upload_offset(repository, where)
                continue
            if resp.status_code != 202:
                raise self.fail(resp, what)
            resp.close()
            where = self._location(resp) if resp.headers.get("location") else where
            offset = _range_end(resp.headers.get("range"), end)
        resp = self.request(
            "PUT", where.copy_merge_params({"digest": digest}), scopes=(push_scope(repository),),
            headers={"Content-Length": "0"}, idempotent=False, what=what,
        )
        self._finish(digest, what, resp)

    def _upload_offset(self, repository: str, where: httpx.URL) -> tuple[int, httpx.URL]:
        resp = self.request("GET", where, scopes=(push_scope(repository),), what="upload status")
        resp.close()
        if resp.status_code not in (200, 204):
            raise self.fail(resp, "upload status")
        loc = self._location(resp) if resp.headers.get("location") else where
        return _range_end(resp.headers.get("range"), 0), loc


def _range_end(value: str | None, default: int) -> int:
    """``Range: 0-1234`` (what the registry has) -> the next offset, 1235."""
    if not value:
        return default
    _, _, last = value.removeprefix("bytes=").partition("-")
    return int(last) + 1 if last.strip().isdigit() else default


def _file_chunks(
    open_body: Callable[[], BinaryIO], start: int, end: int, progress: Callable[[int], None] | None
) -> Iterator[bytes]:
    with open_body() as f:
        f.seek(start)
        left = end - start
        while left > 0:
            chunk = f.read(min(_READ_CHUNK, left))
            if not chunk:
                raise InvalidArgument("the blob being uploaded is shorter than its descriptor says")
            left -= len(chunk)
            if progress is not None:
                progress(len(chunk))
            yield chunk


def _verify(data: bytes, digest: str, what: str) -> None:
    algo, _, _ = digest.partition(":")
    got = f"{algo}:{hashlib.new(algo, data).hexdigest()}"
    if got != digest:
        raise DigestMismatch(f"{what}: content hashes to {got}")


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def push_scope(repository: str) -> str:
    return f"repository:{repository}:pull,push"

