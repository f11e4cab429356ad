"""Real registries for tests: the ``docker-registry`` server, a fault proxy, a token issuer.

- :func:`registry_server` starts Debian's ``docker-registry`` (the distribution project's
  registry, ``/usr/bin/docker-registry``) on ``127.0.0.1`` with a free port, a temporary
  ``config.yml`` and storage directory; it returns once the server listens and answers
  ``/v2/``, and always stops it (SIGTERM, then SIGKILL). ``htpasswd={"user": "password"}``
  turns on Basic auth (bcrypt hashes made with :mod:`crypt`); ``token=TokenIssuer(...)`` turns
  on the bearer-token scheme with our issuer as the realm.
- :class:`FaultProxy` is an HTTP proxy of ours in front of a registry that can, per request
  matching a method and a path pattern, answer a status (``500``, ``429`` with ``Retry-After``),
  flip one byte of the body, cut the body short (the full ``Content-Length`` is announced, then
  the connection is closed), stall before the body, or redirect a blob ``GET`` to a "blob
  storage" URL it serves itself (without the registry's credentials, as S3 would). Every
  request is logged (method, path, whether it carried ``Authorization``).
- :class:`TokenIssuer` is a token server of ours (the registry trusts its certificate): it
  checks Basic credentials or an OAuth2 refresh token and signs an RS256 JWT granting the
  requested scopes (distribution's docs/spec/auth/jwt.md), signing with ``openssl``.

Nothing here is a mock: the registry is the real server, and the proxy forwards real requests.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "REGISTRY_BINARY",
    "Fault",
    "FaultProxy",
    "Logged",
    "RegistryServer",
    "TokenIssuer",
    "registry_server",
    "registry_unavailable_reason",
]

REGISTRY_BINARY = "/usr/bin/docker-registry"
START_TIMEOUT_S = 30.0


def registry_unavailable_reason() -> str | None:
    """Why :func:`registry_server` cannot run here (None when it can)."""
    binary = shutil.which("docker-registry") or (REGISTRY_BINARY if os.path.exists(REGISTRY_BINARY) else None)
    if binary is None:
        return "docker-registry is not installed (Debian package docker-registry)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RegistryServer:
    """A running ``docker-registry``."""

    host: str
    """``127.0.0.1:PORT``"""
    root: Path
    storage: Path
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _bcrypt(password: str) -> str:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
    if not hashed or not hashed.startswith("$2"):
        raise RuntimeError("this libc's crypt() cannot make bcrypt hashes for htpasswd")
    return hashed


def _config(storage: Path, port: int, auth: str) -> str:
    return f"""version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: {secrets.token_hex(16)}
{auth}"""


def _drain(pipe: Any, log: Path, ready: threading.Event) -> None:
    with open(log, "ab") as out:
        for line in iter(pipe.readline, b""):
            out.write(line)
            out.flush()
            if b"listening on" in line:
                ready.set()
    ready.set()


@contextlib.contextmanager
def registry_server(
    workdir: Path,
    *,
    htpasswd: dict[str, str] | None = None,
    token: TokenIssuer | None = None,
) -> Iterator[RegistryServer]:
    """Run ``docker-registry`` for the ``with`` block (see the module docstring)."""
    reason = registry_unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    binary = shutil.which("docker-registry") or REGISTRY_BINARY
    root = workdir
    root.mkdir(parents=True, exist_ok=True)
    storage = root / "storage"
    storage.mkdir(exist_ok=True)
    auth = ""
    if htpasswd is not None:
        (root / "htpasswd").write_text("".join(f"{u}:{_bcrypt(p)}\n" for u, p in htpasswd.items()))
        auth = f"auth:\n  htpasswd:\n    realm: graphdriver-test\n    path: {root / 'htpasswd'}\n"
    elif token is not None:
        auth = (
            f"auth:\n  token:\n    realm: {token.url}/token\n    service: {token.service}\n"
            f"    issuer: {token.issuer}\n    rootcertbundle: {token.cert}\n"
        )
    last_error = ""
    for _ in range(5):
        port = free_port()
        config = root / "config.yml"
        config.write_text(_config(storage, port, auth))
        log = root / "registry.log"
        proc = subprocess.Popen(
            [binary, "serve", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        server = RegistryServer(f"127.0.0.1:{port}", root, storage, log, proc)
        try:
            ready = threading.Event()
            threading.Thread(target=_drain, args=(proc.stdout, log, ready), daemon=True).start()
            if not ready.wait(START_TIMEOUT_S) or proc.poll() is not None:
                last_error = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                server.stop()
                continue
            if not _answers(server.host):
                last_error = "the registry does not answer /v2/"
                server.stop()
                continue
            try:
                yield server
            finally:
                server.stop()
            return
        except BaseException:
            server.stop()
            raise
    raise RuntimeError(f"docker-registry did not start: {last_error}")


def _answers(host: str) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(host, timeout=5)
        try:
            conn.request("GET", "/v2/")
            status = conn.getresponse().status
            return status in (200, 401)
        except OSError:
            time.sleep(0.05)
        finally:
            conn.close()
    return False


# -- the fault proxy ------------------------------------------------------------------------------


@dataclass
class Fault:
    """One fault, applied to requests whose method and path match, ``times`` times (-1: always).

    ``action``: ``status`` (answer ``status`` with ``headers``, not forwarded), ``corrupt`` (flip
    the byte at ``offset`` of the response body), ``truncate`` (send ``offset`` bytes of the body,
    then close), ``stall`` (send ``offset`` bytes of the body, then wait ``delay`` seconds, or
    until the proxy closes, before the rest), ``redirect`` (307 to the proxy's own blob-storage
    URL on ``localhost``: another origin), ``drop`` (close the connection without an answer).
    """

    action: str
    method: str = "GET"
    path: str = r".*"
    times: int = 1
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    offset: int = 0
    delay: float = 0.0
    release: threading.Event | None = None
    """ends a ``stall`` early when set (a test sets it once what it waits for happened)"""
    hits: int = 0
    timed_out: bool = False
    """a ``stall`` ran its full ``delay`` (``release`` was not set in time)"""

    def matches(self, method: str, path: str) -> bool:
        if self.times == 0 or method != self.method or not re.search(self.path, path):
            return False
        if self.times > 0:
            self.times -= 1
        self.hits += 1
        return True


@dataclass(frozen=True)
class Logged:
    """One request the proxy saw (``method`` is ``STORAGE`` for the fake blob storage)."""

    method: str
    path: str
    authorization: bool
    range: str | None


_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization"}


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` (``host:port``) that injects faults."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults: list[Fault] = []
        self.log: list[Logged] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self)

            def do_HEAD(self) -> None:
                proxy._handle(self)

            def do_POST(self) -> None:
                proxy._handle(self)

            def do_PUT(self) -> None:
                proxy._handle(self)

            def do_PATCH(self) -> None:
                proxy._handle(self)

            def do_DELETE(self) -> None:
                proxy._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.log.clear()

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def requests(self, method: str, pattern: str = ".*") -> list[Logged]:
        """The logged requests with this method whose path matches ``pattern``."""
        with self._lock:
            return [x for x in self.log if x.method == method and re.search(pattern, x.path)]

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.matches(method, path):
                    return f
        return None

    @staticmethod
    def _body(h: BaseHTTPRequestHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += h.rfile.read(size)
                h.rfile.readline()
        length = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(length) if length else b""

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        method, path = h.command, h.path
        body = self._body(h)
        if path.startswith("/_storage/"):
            self._serve_storage(h, path)
            return
        with self._lock:
            self.log.append(Logged(method, path, "Authorization" in h.headers, h.headers.get("Range")))
        fault = self._fault(method, path)
        if fault is not None and fault.action == "drop":
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None and fault.action == "status":
            error = {"code": "INJECTED", "message": f"injected {fault.status}"}
            payload = json.dumps({"errors": [error]}).encode()
            h.send_response(fault.status)
            for k, v in fault.headers.items():
                h.send_header(k, v)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            if method != "HEAD":
                h.wfile.write(payload)
            return
        if fault is not None and fault.action == "redirect":
            token = secrets.token_hex(8)
            h.send_response(307)
            port = self.host.rpartition(":")[2]
            h.send_header("Location", f"http://localhost:{port}/_storage/{token}{path}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        self._forward(h, method=method, path=path, headers=headers, body=body, fault=fault)

    def _forward(
        self,
        h: BaseHTTPRequestHandler,
        *,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        fault: Fault | None,
        drop_auth: bool = False,
    ) -> None:
        if drop_auth:
            headers.pop("Authorization", None)
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if fault is not None and fault.action == "corrupt" and len(data) > fault.offset:
            data = data[: fault.offset] + bytes([data[fault.offset] ^ 0xFF]) + data[fault.offset + 1 :]
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and k.lower() != "content-length":
                h.send_header(k, v)
        h.send_header("Content-Length", resp.getheader("Content-Length") or str(len(data)))
        h.end_headers()
        if method == "HEAD":
            return
        if fault is not None and fault.action == "stall":
            h.wfile.write(data[: fault.offset])
            h.wfile.flush()
            data = data[fault.offset :]
            deadline = time.monotonic() + fault.delay
            while not (fault.release is not None and fault.release.is_set()):
                left = deadline - time.monotonic()
                if left <= 0:
                    fault.timed_out = True
                    break
                if self._closing.wait(min(left, 0.05)):
                    h.close_connection = True
                    return
        if fault is not None and fault.action == "truncate":
            h.wfile.write(data[: fault.offset])
            h.wfile.flush()
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(data)

    def _serve_storage(self, h: BaseHTTPRequestHandler, path: str) -> None:
        real = "/" + path.split("/", 3)[3]
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        with self._lock:
            self.log.append(Logged("STORAGE", real, "Authorization" in h.headers, h.headers.get("Range")))
        # blob storage serves with its own (URL) credentials: fetch upstream as the registry would
        token = self.storage_token
        if token:
            headers["Authorization"] = token
        self._forward(
            h, method=h.command, path=real, headers=headers, body=b"", fault=None, drop_auth=not token
        )

    storage_token: str | None = None
    """the Authorization the fake blob storage uses upstream (set by tests with auth)"""


# -- the token issuer -----------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenIssuer:
    """A token server for ``docker-registry``'s ``auth: token`` (our own, for tests).

    ``users`` maps names to passwords; ``refresh_tokens`` maps identity tokens to names. A
    request without valid credentials gets a token with no access (anonymous), as Docker Hub
    does; wrong credentials get 401. Signs with ``openssl`` (needs the ``openssl`` program).
    """

    def __init__(
        self, workdir: Path, users: dict[str, str], *, refresh_tokens: dict[str, str] | None = None
    ) -> None:
        if shutil.which("openssl") is None:
            raise RuntimeError("openssl is not installed")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.key = workdir / "issuer.key"
        self.cert = workdir / "issuer.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
             "-out", str(self.cert), "-days", "2", "-subj", "/CN=graphdriver-test-issuer"],
            check=True, capture_output=True,
        )
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True, capture_output=True
        ).stdout
        self._x5c = base64.b64encode(der).decode("ascii")
        self.users = users
        self.refresh_tokens = refresh_tokens or {}
        self.service = "graphdriver-test-registry"
        self.issuer = "graphdriver-test-issuer"
        self.requests: list[dict[str, Any]] = []
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                issuer._handle(self)

            def do_POST(self) -> None:
                issuer._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> TokenIssuer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sign(self, subject: str, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + 300, "nbf": now - 10,
            "iat": now, "jti": secrets.token_hex(8), "access": access,
        }
        signing_input = _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        sig = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(), check=True, capture_output=True,
        ).stdout
        return signing_input + "." + _b64url(sig)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        params = parse_qs(url.query)
        if h.command == "POST":
            length = int(h.headers.get("Content-Length") or 0)
            params = parse_qs(h.rfile.read(length).decode())
        scopes: list[str] = []
        for s in params.get("scope", []):
            scopes.extend(s.split(" "))
        subject = ""
        status = 200
        if h.command == "POST" and params.get("grant_type") == ["refresh_token"]:
            subject = self.refresh_tokens.get((params.get("refresh_token") or [""])[0], "")
            status = 200 if subject else 401
        elif h.headers.get("Authorization", "").startswith("Basic "):
            raw = base64.b64decode(h.headers["Authorization"][6:]).decode(errors="replace")
            user, _, pw = raw.partition(":")
            if self.users.get(user) == pw:
                subject = user
            else:
                status = 401
        self.requests.append({"method": h.command, "scopes": scopes, "subject": subject, "status": status})
        if status != 200:
            payload = json.dumps({"details": "incorrect username or password"}).encode()
        else:
            access = []
            if subject:
                for scope in scopes:
                    kind, _, rest = scope.partition(":")
                    name, _, actions = rest.rpartition(":")
                    access.append({"type": kind, "name": name, "actions": actions.split(",")})
            token = self.sign(subject, access)
            payload = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)
