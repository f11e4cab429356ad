"""Image references and digests: parsing, normalising, and refusing what is malformed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from graphdriver.errors import InvalidArchive, InvalidArgument
from graphdriver.images.manifests import Platform, parse_config, parse_descriptor, parse_index, parse_manifest
from graphdriver.images.references import Reference, is_digest, parse_digest, parse_reference

HEX = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("text", "normal", "familiar"),
    [
        ("alpine", "docker.io/library/alpine:latest", "alpine:latest"),
        ("alpine:3.19", "docker.io/library/alpine:3.19", "alpine:3.19"),
        ("library/alpine", "docker.io/library/alpine:latest", "alpine:latest"),
        ("docker.io/alpine", "docker.io/library/alpine:latest", "alpine:latest"),
        ("index.docker.io/library/alpine:edge", "docker.io/library/alpine:edge", "alpine:edge"),
        ("user/app:v1", "docker.io/user/app:v1", "user/app:v1"),
        ("localhost/app", "localhost/app:latest", "localhost/app:latest"),
        ("localhost:5000/app:1", "localhost:5000/app:1", "localhost:5000/app:1"),
        ("quay.io/org/sub/app:1.2_3-x", "quay.io/org/sub/app:1.2_3-x", "quay.io/org/sub/app:1.2_3-x"),
        (
            "Registry.Example.com/a__b/c-d.e",
            "Registry.Example.com/a__b/c-d.e:latest",
            "Registry.Example.com/a__b/c-d.e:latest",
        ),
        (f"app@sha256:{HEX}", f"docker.io/library/app@sha256:{HEX}", f"app@sha256:{HEX}"),
        (f"app:1@sha256:{HEX}", f"docker.io/library/app:1@sha256:{HEX}", f"app:1@sha256:{HEX}"),
        ("[::1]:5000/app:1", "[::1]:5000/app:1", "[::1]:5000/app:1"),
    ],
)
def test_normalise(text: str, normal: str, familiar: str) -> None:
    ref = parse_reference(text)
    assert str(ref) == normal
    assert ref.familiar == familiar
    assert parse_reference(str(ref)) == ref


def test_no_default_tag() -> None:
    assert parse_reference("app", default_tag=False) == Reference("docker.io", "library/app")
    assert parse_reference("app", default_tag=False).with_tag("2").tag == "2"


@pytest.mark.parametrize(
    "text",
    [
        "",
        " app",
        "app ",
        "App",
        "user/App:1",
        "app:",
        "app:-x",
        "app:" + "x" * 129,
        "a//b",
        "a/-b",
        "a/b_",
        "app@sha256:short",
        f"app@sha256:{HEX.upper()}",
        f"app@md5:{HEX}",
        "../app",
        "app/../x",
        "app:1:2",
        "a" * 256,
        "exa_mple.com:5000/app",
        "app@",
        "/app",
    ],
)
def test_invalid_references(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_reference(text)


@pytest.mark.parametrize(
    "text",
    [f"sha256:{HEX}", "sha512:" + HEX * 2],
)
def test_valid_digests(text: str) -> None:
    assert is_digest(text) and parse_digest(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "sha256:../../x",
        "sha256:" + HEX[:-1],
        "sha256:" + HEX + "0",
        "sha256:" + HEX.upper(),
        "SHA256:" + HEX,
        "sha512:" + HEX,
        "md5:" + HEX[:32],
        HEX,
        f" sha256:{HEX}",
        f"sha256:{HEX}\n",
        f"sha256:{HEX[:-1]}/",
        "sha256:" + HEX[:-1] + "g",
    ],
)
def test_invalid_digests(text: str) -> None:
    assert not is_digest(text)
    with pytest.raises(InvalidArgument, match="expected sha256:<64 hex>"):
        parse_digest(text)


@given(st.text(max_size=80))
def test_digest_validation_never_admits_a_path(text: str) -> None:
    if is_digest(text):
        assert "/" not in text and ".." not in text and "\0" not in text


def test_platforms() -> None:
    assert str(Platform.parse("linux/arm/v7")) == "linux/arm/v7"
    assert Platform.parse("linux/arm64").matches(Platform("linux", "arm64", "v8"))
    assert not Platform.parse("linux/arm/v7").matches(Platform("linux", "arm", "v6"))
    assert Platform.parse("linux/amd64").matches(Platform("linux", "amd64"))
    assert not Platform.parse("linux/amd64").matches(None)
    for bad in ("linux", "linux/", "a/b/c/d"):
        with pytest.raises(InvalidArgument):
            Platform.parse(bad)


def test_documents_are_parsed_strictly() -> None:
    good = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": f"sha256:{HEX}", "size": 3}
    assert parse_descriptor(good, "d").size == 3
    for bad, message in (
        ({**good, "size": -1}, "non-negative"),
        ({**good, "size": True}, "non-negative"),
        ({**good, "size": "3"}, "non-negative"),
        ({**good, "digest": "sha256:../x"}, "invalid digest"),
        ({**good, "mediaType": 7}, "mediaType"),
        ({**good, "annotations": {"a": 1}}, "annotations"),
        ([], "must be a JSON object"),
    ):
        with pytest.raises(InvalidArchive, match=message):
            parse_descriptor(bad, "d")
    with pytest.raises(InvalidArchive, match="schemaVersion 1"):
        parse_manifest(b'{"schemaVersion": 1}')
    with pytest.raises(InvalidArchive, match="not valid JSON"):
        parse_index(b"\xff")
    with pytest.raises(InvalidArchive, match="an artifact"):
        parse_manifest(
            b'{"schemaVersion": 2, "config": {"mediaType": "application/x-thing", "digest": "sha256:'
            + HEX.encode()
            + b'", "size": 1}, "layers": []}'
        )
    with pytest.raises(InvalidArchive, match=r"rootfs\.type"):
        parse_config(b'{"rootfs": {"type": "other", "diff_ids": []}}')
    with pytest.raises(InvalidArchive, match=r"diff_ids\[0\]"):
        parse_config(b'{"rootfs": {"type": "layers", "diff_ids": ["sha256:x"]}}')
    with pytest.raises(InvalidArchive, match="larger than"):
        parse_config(b" " * (9 << 20))
