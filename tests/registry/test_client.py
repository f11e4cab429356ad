"""The distribution API client: references, credentials, challenges, uploads, mounts, and auth
against the real ``docker-registry`` (Basic via htpasswd; bearer tokens from our own issuer,
which the real registry verifies)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from graphdriver.errors import InvalidArgument, NotFound, PermissionDenied
from graphdriver.registry.auth import Credentials, find_credentials, parse_challenges
from graphdriver.registry.client import RegistryClient, RegistryError, RetryPolicy
from graphdriver.registry.pull import PullOptions, pull
from graphdriver.registry.push import PushOptions, push_image
from graphdriver.registry.reference import api_host, parse_reference, target
from graphdriver.testing.registry_server import (
    Fault,
    FaultProxy,
    RegistryServer,
    TokenIssuer,
    registry_server,
)
from graphdriver.testing.tarbuild import TarBuilder

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)


def small_layer(text: bytes = b"hello\n") -> bytes:
    return TarBuilder().dir(".", mtime=1_700_000_000).file("f", text, mtime=1_700_000_000).build()


# -- references and credentials -------------------------------------------------------------------


def test_references_map_to_api_hosts() -> None:
    hub = parse_reference("busybox")
    assert (str(hub), api_host(hub), target(hub)) == (
        "docker.io/library/busybox:latest",
        "registry-1.docker.io",
        "latest",
    )
    local = parse_reference("127.0.0.1:5000/team/app@sha256:" + "a" * 64)
    assert (api_host(local), local.path, target(local)) == (
        "127.0.0.1:5000",
        "team/app",
        "sha256:" + "a" * 64,
    )
    assert api_host(parse_reference("localhost/x:1")) == "localhost"


def write_config(directory: Path, doc: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(doc))
    return path


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_credentials_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docker = write_config(
        tmp_path / "docker",
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": b64("hubuser:hubpw")},
                "reg.example.com": {"auth": b64("alice:pw:with:colons")},
                "reg.example.com/team": {"username": "team", "password": "tpw"},
                "http://127.0.0.1:5000": {"identitytoken": "refresh-me", "auth": b64("bob:x")},
                "tok.example.com": {"registrytoken": "raw-bearer"},
            }
        },
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(docker.parent))
    assert find_credentials("docker.io") == Credentials("hubuser", "hubpw", source=str(docker))
    assert find_credentials("reg.example.com", "other/app") == Credentials(
        "alice", "pw:with:colons", source=str(docker)
    )
    assert find_credentials("reg.example.com", "team/app") == Credentials("team", "tpw", source=str(docker))
    assert find_credentials("127.0.0.1:5000") == Credentials("bob", "x", "refresh-me", source=str(docker))
    assert find_credentials("tok.example.com") == Credentials(registry_token="raw-bearer", source=str(docker))
    assert find_credentials("nowhere.example.com") is None
    # $REGISTRY_AUTH_FILE comes first, an explicit file before that
    first = write_config(tmp_path / "env", {"auths": {"reg.example.com": {"auth": b64("env:1")}}})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(first))
    assert find_credentials("reg.example.com").username == "env"  # type: ignore[union-attr]
    explicit = write_config(tmp_path / "explicit", {"auths": {"reg.example.com": {"auth": b64("cli:2")}}})
    assert find_credentials("reg.example.com", auth_file=explicit).username == "cli"  # type: ignore[union-attr]
    # broken files are errors, not silence
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidArgument, match=r"bad\.json is not valid JSON"):
        find_credentials("reg.example.com", auth_file=bad)
    write_config(tmp_path / "b64", {"auths": {"x.io": {"auth": b64("no-colon")}}})
    with pytest.raises(InvalidArgument, match="not base64 of user:password"):
        find_credentials("x.io", auth_file=tmp_path / "b64" / "config.json")


def test_challenges_parse() -> None:
    got = parse_challenges(
        [
            'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
            'scope="repository:a/b:pull,push"',
            'Basic realm="x\\"y", Bearer realm=http://t/tok',
        ]
    )
    assert [(c.scheme, c.params) for c in got] == [
        (
            "bearer",
            {
                "realm": "https://auth.example.com/token",
                "service": "registry.example.com",
                "scope": "repository:a/b:pull,push",
            },
        ),
        ("basic", {"realm": 'x"y'}),
        ("bearer", {"realm": "http://t/tok"}),
    ]


# -- the API against the real server --------------------------------------------------------------


def test_uploads_monolithic_and_chunked_ranges_and_mounts(registry: RegistryServer, kit: Any) -> None:
    a, b = kit.repo(), kit.repo()
    data = os.urandom(700_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with RegistryClient(registry.host, insecure=True, retry=FAST) as client:
        client.ping()
        assert client.blob_size(a, digest) is None
        client.upload_blob(
            a, digest, len(data), lambda: io.BytesIO(data), monolithic_limit=100_000, chunk_size=300_000
        )
        assert client.blob_size(a, digest) == len(data)
        with client.open_blob(a, digest, offset=650_000) as blob:
            assert b"".join(blob.chunks()) == data[650_000:]
        small = b"small blob"
        small_digest = "sha256:" + hashlib.sha256(small).hexdigest()
        client.upload_blob(a, small_digest, len(small), lambda: io.BytesIO(small))
        assert client.fetch_blob(a, small_digest, len(small)) == small
        # cross-repository mount
        assert client.mount_blob(b, digest, a) == (True, None)
        assert client.blob_size(b, digest) == len(data)
        # a mount the registry cannot do opens an upload session instead, which can be used
        other = os.urandom(1000)
        other_digest = "sha256:" + hashlib.sha256(other).hexdigest()
        mounted, session = client.mount_blob(b, other_digest, a)
        assert not mounted and session is not None
        client.upload_blob(b, other_digest, len(other), lambda: io.BytesIO(other), location=session)
        assert client.blob_size(b, other_digest) == len(other)
        # a wrong digest is refused by the registry, and nothing is stored under it
        wrong = "sha256:" + "0" * 64
        with pytest.raises(RegistryError, match=r"answered HTTP 400: DIGEST_INVALID"):
            client.upload_blob(b, wrong, len(other), lambda: io.BytesIO(other))
        assert client.blob_size(b, wrong) is None
        with pytest.raises(NotFound, match="MANIFEST_UNKNOWN"):
            client.get_manifest(a, "nope")


# -- Basic auth (htpasswd) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with registry_server(tmp_path_factory.mktemp("basic"), htpasswd={"alice": "s3cret"}) as server:
        yield server


def test_basic_auth_from_config_json(basic_registry: RegistryServer, kit: Any, tmp_path: Path) -> None:
    src = kit.store("src")
    img = kit.image(src, [small_layer()])
    ref = f"{basic_registry.host}/{kit.repo()}:1"
    with pytest.raises(PermissionDenied, match=r"requires authentication \(no credentials for "):
        push_image(src, ref, config=img.config, layers=img.layers, options=PushOptions(insecure=True))
    good = write_config(tmp_path / "good", {"auths": {basic_registry.host: {"auth": b64("alice:s3cret")}}})
    bad = write_config(tmp_path / "bad", {"auths": {basic_registry.host: {"auth": b64("alice:wrong")}}})
    push_image(
        src,
        ref,
        config=img.config,
        layers=img.layers,
        options=PushOptions(insecure=True, auth_file=str(good)),
    )
    dst = kit.store("dst")
    with pytest.raises(PermissionDenied, match=f"credentials from {bad}"):
        pull(dst, ref, PullOptions(insecure=True, auth_file=str(bad), retry=FAST))
    got = pull(dst, ref, PullOptions(insecure=True, auth_file=str(good)))
    assert got.layers[0].chain_id == img.chain_ids[0]
    assert not dst.check().problems


def test_blob_redirect_drops_the_registry_credentials(
    basic_registry: RegistryServer, kit: Any, tmp_path: Path
) -> None:
    src = kit.store("src")
    img = kit.image(src, [small_layer(b"redirected\n")])
    good = write_config(tmp_path / "good", {"auths": {basic_registry.host: {"auth": b64("alice:s3cret")}}})
    name = f"{kit.repo()}:1"
    push_image(
        src,
        f"{basic_registry.host}/{name}",
        config=img.config,
        layers=img.layers,
        options=PushOptions(insecure=True, auth_file=str(good)),
    )
    with FaultProxy(basic_registry.host) as proxy:
        proxy.storage_token = "Basic " + b64("alice:s3cret")  # the storage's own credentials
        proxy.add(Fault("redirect", path=r"/blobs/sha256:", times=-1))
        creds = write_config(tmp_path / "proxy", {"auths": {proxy.host: {"auth": b64("alice:s3cret")}}})
        dst = kit.store("dst")
        got = pull(dst, f"{proxy.host}/{name}", PullOptions(insecure=True, auth_file=str(creds)))
        assert got.layers[0].chain_id == img.chain_ids[0]
        blob_gets = proxy.requests("GET", r"/blobs/sha256:")
        storage = proxy.requests("STORAGE")
    assert blob_gets and all(r.authorization for r in blob_gets)
    assert storage and not any(r.authorization for r in storage)


# -- bearer tokens (our issuer, verified by the real registry) ------------------------------------


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot sign registry tokens")
    with (
        TokenIssuer(
            tmp_path_factory.mktemp("issuer"), {"alice": "s3cret"}, refresh_tokens={"identity-abc": "alice"}
        ) as issuer,
        registry_server(tmp_path_factory.mktemp("tokenreg"), token=issuer) as server,
    ):
        yield server, issuer


def test_bearer_token_flow(token_registry: Any, kit: Any, tmp_path: Path) -> None:
    server, issuer = token_registry
    src = kit.store("src")
    img = kit.image(src, [small_layer(b"token\n")])
    repo = kit.repo()
    ref = f"{server.host}/{repo}:1"
    password = write_config(tmp_path / "pw", {"auths": {server.host: {"auth": b64("alice:s3cret")}}})
    push_image(
        src,
        ref,
        config=img.config,
        layers=img.layers,
        options=PushOptions(insecure=True, auth_file=str(password)),
    )
    granted = [r for r in issuer.requests if r["subject"] == "alice"]
    assert granted and all(r["method"] == "GET" for r in granted)
    assert f"repository:{repo}:pull,push" in {s for r in granted for s in r["scopes"]}
    # an identity token (docker login's refresh token) goes as an OAuth2 refresh grant
    identity = write_config(tmp_path / "id", {"auths": {server.host: {"identitytoken": "identity-abc"}}})
    issuer.requests.clear()
    dst = kit.store("dst")
    got = pull(dst, ref, PullOptions(insecure=True, auth_file=str(identity)))
    assert got.layers[0].chain_id == img.chain_ids[0]
    assert {(r["method"], r["subject"]) for r in issuer.requests} == {("POST", "alice")}
    assert {s for r in issuer.requests for s in r["scopes"]} == {f"repository:{repo}:pull"}
    # anonymous: the issuer grants nothing, the registry refuses
    other = kit.store("other")
    with pytest.raises(PermissionDenied, match="UNAUTHORIZED"):
        pull(other, ref, PullOptions(insecure=True, retry=FAST))
    wrong = write_config(tmp_path / "wrong", {"auths": {server.host: {"auth": b64("alice:nope")}}})
    with pytest.raises(PermissionDenied, match=r"token server refused credentials from .*incorrect username"):
        pull(other, ref, PullOptions(insecure=True, auth_file=str(wrong), retry=FAST))
    assert not other.check().problems and other.layers() == []


def test_progress_renderers() -> None:
    from graphdriver.registry.progress import Event, JsonLines, TerminalProgress

    d = "sha256:" + "ab" * 32
    events = [
        Event("message", message="resolved"),
        Event("status", d, "downloading", 0, 2 << 20),
        Event("progress", d, "downloading", 1 << 20, 2 << 20),
        Event("status", d, "applied", size=2 << 20),
    ]
    out = io.StringIO()
    sink = JsonLines(out)
    for e in events:
        sink(e)
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [
        {"event": "message", "message": "resolved"},
        {"event": "status", "digest": d, "status": "downloading", "current": 0, "size": 2 << 20},
        {"event": "progress", "digest": d, "status": "downloading", "current": 1 << 20, "size": 2 << 20},
        {"event": "status", "digest": d, "status": "applied", "size": 2 << 20},
    ]
    term = io.StringIO()
    tp = TerminalProgress(term)
    tp.interval = 0.0
    for e in events:
        tp(e)
    tp.close()
    frames = term.getvalue().split("\x1b[2F")
    assert frames[-1] == "\x1b[2Kresolved\n\x1b[2Kabababababab: applied      2.0 MiB\n"
    assert any("[===============>" in f and "1.0 MiB/2.0 MiB" in f for f in frames)
