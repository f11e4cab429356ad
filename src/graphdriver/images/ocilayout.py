"""OCI image layout directories: read one (:class:`DirFiles`, :func:`resolve_layout`), write one
(:class:`LayoutDirSink`).

An image layout (OCI image-spec, image-layout.md) is::

    <dir>/
        oci-layout           {"imageLayoutVersion": "1.0.0"}
        index.json           an image index: the entry points, named by the
                             org.opencontainers.image.ref.name annotation
        blobs/<alg>/<hex>    content-addressed blobs: manifests, configs, layers

The same layout inside a tar is an oci-archive (:mod:`graphdriver.images.archives`), so
:func:`resolve_layout` works on any :class:`~graphdriver.images.sources.Files`.

**Reading a directory** (:class:`DirFiles`): only the names ``oci-layout``, ``index.json`` and
``blobs/<alg>/<hex>`` (built from validated digests) are ever opened, one component at a time
relative to the layout's directory fd with ``O_NOFOLLOW``; a symlink or anything but a regular
file where a blob should be is refused, so a layout cannot make the import read a file outside it.

**Choosing the image** (:func:`select_manifest`): ``ref`` matches a ref name annotation or a
manifest digest; among several candidates, the one for ``platform`` (default: this machine's)
is taken; nested indexes (multi-platform images) are followed, four levels at most. Anything
still ambiguous is an error that lists the choices.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import BinaryIO, cast

from graphdriver.errors import DigestMismatch, InvalidArchive, InvalidArgument, NotFound
from graphdriver.images.manifests import (
    ANNOTATION_IMAGE_NAME,
    ANNOTATION_REF_NAME,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_DOCUMENT,
    Descriptor,
    Platform,
    document_kind,
    host_platform,
    load_json,
    parse_config,
    parse_index,
    parse_manifest,
)
from graphdriver.images.references import digest_hex, is_digest, parse_digest, try_parse_reference
from graphdriver.images.sources import Files, LayerSpec, ResolvedImage, read_verified, sha256_digest

__all__ = [
    "LAYOUT_FILE",
    "LAYOUT_VERSION",
    "DirFiles",
    "LayoutDirSink",
    "blob_name",
    "names_from_annotations",
    "resolve_layout",
    "select_manifest",
]

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = "1.0.0"
_MAX_NESTING = 4
_NAME_RE = re.compile(r"oci-layout|index\.json|blobs/(?:sha256|sha512)/[0-9a-f]{64,128}")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_CHUNK = 1 << 20


def blob_name(digest: str) -> str:
    """``blobs/<alg>/<hex>`` for a digest, validated first (CVE-2014-9358)."""
    algo = parse_digest(digest).partition(":")[0]
    return f"blobs/{algo}/{digest_hex(digest)}"


class DirFiles:
    """The files of an OCI layout directory, opened without following any symlink."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.label = str(root)
        try:
            self._fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"{root}: no such directory") from None
        except NotADirectoryError:
            raise InvalidArgument(f"{root}: not a directory") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DirFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, name: str) -> int:
        if not _NAME_RE.fullmatch(name):
            raise InvalidArgument(f"not a file of an OCI layout: {name!r}")
        parts = name.split("/")
        fd = self._fd
        opened: list[int] = []
        try:
            for part in parts[:-1]:
                fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                opened.append(fd)
            fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise NotFound(f"{self.label}: {name} is missing") from None
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                raise InvalidArchive(
                    f"{self.label}: {name} is not a regular file (a symlink?): refused"
                ) from None
            raise
        finally:
            for d in opened:
                os.close(d)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidArchive(f"{self.label}: {name} is not a regular file")
        os.set_blocking(fd, True)
        return fd

    def open(self, name: str) -> BinaryIO:
        """The file ``name`` of the layout (e.g. ``blobs/sha256/<hex>``), opened for reading
        without following a symlink; :class:`InvalidArchive` if it is not a regular file."""
        return cast(BinaryIO, os.fdopen(self._open(name), "rb"))

    def size(self, name: str) -> int:
        fd = self._open(name)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def read(self, name: str, limit: int) -> bytes:
        fd = self._open(name)
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise InvalidArchive(f"{self.label}: {name} is larger than {limit} bytes")
        return data

    def open_in_order(self, names: Sequence[str]) -> Generator[tuple[int, BinaryIO], None, None]:
        for i, name in enumerate(names):
            with os.fdopen(self._open(name), "rb", buffering=0) as f:
                yield i, cast(BinaryIO, f)


# -- choosing the image -----------------------------------------------------------------------------


def _describe(d: Descriptor) -> str:
    parts = [d.ref_name or d.digest[:19]]
    if d.platform is not None:
        parts.append(str(d.platform))
    return " ".join(parts)


def _candidates(
    manifests: Sequence[Descriptor], platform: Platform | None, what: str, label: str
) -> Descriptor:
    wanted = platform or host_platform()
    cands = list(manifests)
    if not cands:
        raise NotFound(f"{label}: {what} lists no image")
    if platform is not None:
        cands = [d for d in cands if d.platform is None or wanted.matches(d.platform)]
        if not cands:
            have = ", ".join(sorted({str(d.platform) for d in manifests}))
            raise NotFound(f"{label}: no image for platform {platform} (there are: {have})")
    elif len(cands) > 1:
        matching = [d for d in cands if wanted.matches(d.platform)]
        if matching:
            cands = matching
        elif all(d.platform is not None for d in cands):
            have = ", ".join(sorted({str(d.platform) for d in cands}))
            raise NotFound(f"{label}: no image for this machine's platform {wanted} (there are: {have})")
    if len(cands) > 1:
        listed = "; ".join(_describe(d) for d in cands)
        raise InvalidArgument(
            f"{label}: {what} holds {len(cands)} images ({listed}): choose one by ref name or digest"
            " (oci:DIR:REF) or with a platform"
        )
    return cands[0]


def select_manifest(
    files: Files, index_manifests: Sequence[Descriptor], *, ref: str | None, platform: Platform | None
) -> tuple[Descriptor, bytes, Descriptor]:
    """The manifest to import: ``(its descriptor, its bytes (verified), the top-level descriptor
    that led to it)``; see the module docstring for the rules."""
    cands = list(index_manifests)
    if ref is not None:
        if is_digest(ref):
            cands = [d for d in cands if d.digest == ref]
        else:
            cands = [d for d in cands if d.ref_name == ref]
        if not cands:
            refs = sorted({d.ref_name for d in index_manifests if d.ref_name})
            raise NotFound(
                f"{files.label}: no image {ref!r} in index.json"
                + (f" (ref names: {', '.join(refs)})" if refs else " (it has no ref names)")
            )
    what = "index.json"
    top = chosen = _candidates(cands, platform, what, files.label)
    for _ in range(_MAX_NESTING + 1):
        data = read_verified(files, blob_name(chosen.digest), chosen.digest, chosen.size, "manifest")
        if chosen.media_type in INDEX_TYPES:
            kind = "index"
        elif chosen.media_type in MANIFEST_TYPES:
            kind = "manifest"
        else:
            kind = document_kind(data, f"blob {chosen.digest}")
        if kind == "manifest":
            return chosen, data, top
        what = f"index {chosen.digest}"
        nested = parse_index(data, what)
        chosen = _candidates(nested.manifests, platform, what, files.label)
    raise InvalidArchive(f"{files.label}: image indexes nested deeper than {_MAX_NESTING} levels")


def names_from_annotations(desc: Descriptor) -> tuple[str, ...]:
    """The image name a layout's index gives: ``io.containerd.image.name``, else a ref name that
    is a full reference (with a ``/`` or a ``:``; a bare ref name like ``latest`` is a tag)."""
    for key in (ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME):
        value = desc.annotations.get(key)
        if not value:
            continue
        if key == ANNOTATION_REF_NAME and "/" not in value and ":" not in value:
            continue
        ref = try_parse_reference(value)
        if ref is not None and ref.digest is None:
            return (str(ref),)
    return ()


def resolve_layout(
    files: Files, *, ref: str | None = None, platform: Platform | None = None
) -> ResolvedImage:
    """Find the image in an OCI layout (directory or archive) and verify its manifest and config."""
    try:
        layout = load_json(files.read(LAYOUT_FILE, 64 << 10), LAYOUT_FILE)
    except NotFound:
        raise InvalidArchive(f"{files.label}: not an OCI image layout (no {LAYOUT_FILE} file)") from None
    version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
    if not isinstance(version, str) or not version.startswith("1."):
        raise InvalidArchive(f"{files.label}: unsupported imageLayoutVersion {version!r}")
    index = parse_index(files.read(INDEX_FILE, MAX_DOCUMENT), INDEX_FILE)
    desc, manifest_bytes, top = select_manifest(files, index.manifests, ref=ref, platform=platform)
    manifest = parse_manifest(manifest_bytes, f"manifest {desc.digest}")
    config_bytes = read_verified(
        files, blob_name(manifest.config.digest), manifest.config.digest, manifest.config.size, "config"
    )
    config = parse_config(config_bytes, f"config {manifest.config.digest}")
    if len(config.diff_ids) != len(manifest.layers):
        raise InvalidArchive(
            f"{files.label}: manifest {desc.digest} has {len(manifest.layers)} layers"
            f" but its config lists {len(config.diff_ids)} diff IDs"
        )
    layers = tuple(
        LayerSpec(blob_name(la.digest), la.digest, la.size, la.media_type) for la in manifest.layers
    )
    return ResolvedImage(
        config=config,
        config_digest=sha256_digest(config_bytes),
        config_media_type=manifest.config.media_type,
        manifest=manifest_bytes,
        manifest_digest=desc.digest,
        manifest_media_type=manifest.media_type,
        layers=layers,
        names=names_from_annotations(top),
    )


# -- writing a directory --------------------------------------------------------------------------


class _HashingWriter:
    """Counts and hashes what is written through it."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._out.write(data)
        self._hash.update(data)
        n = len(data)
        self.size += n
        return n

    def flush(self) -> None:
        self._out.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LayoutDirSink:
    """Writes an OCI layout into ``root`` (a new, empty directory made by the caller)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, mode=0o755)
        self._tmp = 0

    def blob_stream(
        self, fill: Callable[[BinaryIO], None], known: tuple[str, int] | None = None
    ) -> tuple[str, int]:
        """Write a blob produced by ``fill(writer)``; returns (digest, size). ``known``: what
        the digest and size must be (DigestMismatch otherwise)."""
        self._tmp += 1
        tmp = self.blobs / f".tmp-{self._tmp}"
        with open(tmp, "xb") as f:
            w = _HashingWriter(f)
            fill(w)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        if known is not None and (w.digest, w.size) != known:
            tmp.unlink()
            raise DigestMismatch(
                f"blob written as {w.digest} ({w.size} bytes), expected {known[0]} ({known[1]})"
            )
        os.replace(tmp, self.blobs / digest_hex(w.digest))
        return w.digest, w.size

    def blob(self, data: bytes) -> tuple[str, int]:
        def fill(w: BinaryIO) -> None:
            w.write(data)

        return self.blob_stream(fill)

    def file(self, name: str, data: bytes) -> None:
        with open(self.root / name, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        _fsync_dir(self.blobs)
        _fsync_dir(self.blobs.parent)
        _fsync_dir(self.root)
