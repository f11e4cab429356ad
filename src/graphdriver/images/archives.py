"""Image archives: oci-archive and docker-archive (``docker save``), read and written.

Forms::

    oci-archive                   a tar of an OCI image layout (oci-layout, index.json, blobs/...)
    docker-archive, legacy        manifest.json  [{"Config": "<hex>.json", "RepoTags": [...],
                                                   "Layers": ["<id>/layer.tar", ...]}]
                                  <hex>.json (the config), <id>/layer.tar, <id>/json, <id>/VERSION,
                                  repositories; skopeo writes <diff-hex>.tar and makes
                                  <id>/layer.tar a symlink to it
    docker-archive, Docker 25+    the OCI layout (blobs/sha256/<hex>, index.json, oci-layout) plus a
                                  manifest.json whose Config and Layers name blobs/sha256/<hex>

**Reading** (:class:`TarFiles`). The archive is untrusted and is parsed only with the strict
streaming reader (:func:`graphdriver.archive.tarformat.iter_entries`), never with ``tarfile``, and
it is never extracted: member names are only keys. Every member name must pass
:func:`clean_member_name` (relative, no ``..``: :class:`BreakoutError` otherwise), a regular
member may appear once, and the names a manifest refers to are looked up, following symlink and
hard-link members inside the archive's own namespace, never on the filesystem. The archive may
itself be compressed (``docker save | gzip``).

Reading takes two passes over the file. The first checks every header, records every member and
keeps the small ones (manifests, configs) in memory. The second streams the layer blobs the import
needs: a blob that comes in the order the import needs it goes straight from the archive into the
layer store; one that comes early is spooled into the store's staging directory first (and
verified like any other when its turn comes).

**Writing** (:class:`TarSink`): a deterministic ustar archive (owner 0:0, mtime 0, files 0644,
directories 0755); a blob whose digest is not known before it is written (a layer being
compressed) gets a placeholder header that is rewritten once the digest and size are known, so
nothing is spooled.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from graphdriver.archive.tarformat import EntryKind, TarEntry, iter_entries
from graphdriver.archive.types import Limits
from graphdriver.errors import (
    BreakoutError,
    CorruptStream,
    DigestMismatch,
    InvalidArchive,
    InvalidArgument,
    NotFound,
)
from graphdriver.images.manifests import (
    MAX_DOCUMENT,
    MT_DOCKER_CONFIG,
    ImageConfig,
    load_json,
    parse_config,
    parse_descriptor,
)
from graphdriver.images.references import parse_reference
from graphdriver.images.sources import LayerSpec, ResolvedImage, sha256_digest

__all__ = [
    "ARCHIVE_LIMITS",
    "TarFiles",
    "TarSink",
    "clean_member_name",
    "resolve_docker_archive",
    "ustar_header",
]

ARCHIVE_LIMITS = Limits(
    max_decompressed_bytes=1 << 50,
    max_entries=1_000_000,
    max_entry_size=1 << 42,
    max_header_size=1 << 20,
    max_path_length=4096,
)
"""bounds on the outer archive (the layers inside are bounded by the store's own limits)"""

KEEP_IN_MEMORY = 4 << 20
"""regular members up to this size are kept from the first pass (manifests, configs, small blobs)"""
MEMORY_BUDGET = 64 << 20
"""at most this much of them in total"""
_MAX_LINK_HOPS = 16
_CHUNK = 1 << 20
_BLOB_NAME = re.compile(r"blobs/(sha256|sha512)/([0-9a-f]{64}|[0-9a-f]{128})")
_LEGACY_CONFIG_NAME = re.compile(r"([0-9a-f]{64})\.json")


def clean_member_name(raw: str, label: str = "archive") -> str:
    """The normal form of an archive member name (``./a//b/`` -> ``a/b``; ``""`` for the root).

    Absolute names and names with a ``..`` component are :class:`BreakoutError`: they are never
    joined to a path, but an archive that has them is not one a real tool wrote.
    """
    if raw.startswith("/"):
        raise BreakoutError(f"{label}: absolute member name", raw)
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BreakoutError(f"{label}: member name with '..'", raw)
    return "/".join(parts)


@dataclass
class _Member:
    name: str
    kind: EntryKind
    size: int
    linkname: str
    data: bytes | None = None


class _EntryReader(io.RawIOBase):
    """The data of the current tar entry as a stream."""

    def __init__(self, entry: TarEntry) -> None:
        super().__init__()
        self._entry = entry

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return self._entry.readinto(memoryview(b).cast("B"))


def _open_ready(source: bytes | Path) -> BinaryIO:
    """A stream over a member kept in memory or spooled to a file."""
    if isinstance(source, bytes):
        return cast(BinaryIO, io.BytesIO(source))
    return open(source, "rb")


class TarFiles:
    """The members of an image archive, as :class:`~graphdriver.images.sources.Files`.

    ``spool_dir`` receives blobs that arrive before the import needs them (the store's staging
    directory, removed with it).
    """

    def __init__(self, path: Path | str, spool_dir: Path | None = None) -> None:
        self.path = Path(path)
        self.label = str(path)
        self.spool_dir = spool_dir
        self.members: dict[str, _Member] = {}
        if not self.path.exists():
            raise NotFound(f"{path}: no such file")
        if self.path.is_dir():
            raise InvalidArgument(f"{path}: is a directory, not an archive")
        self._scan()

    def _entries(self, stack: ExitStack) -> Iterator[TarEntry]:
        from graphdriver.archive.compression import open_decompressed

        f = stack.enter_context(open(self.path, "rb"))  # noqa: SIM115 - closed by the stack
        stream = stack.enter_context(open_decompressed(f, ARCHIVE_LIMITS))
        return iter_entries(stream, ARCHIVE_LIMITS)

    def _scan(self) -> None:
        kept = 0
        with ExitStack() as stack:
            for entry in self._entries(stack):
                name = clean_member_name(entry.name, self.label)
                if entry.kind is EntryKind.DIR or not name:
                    continue
                if name in self.members:
                    raise InvalidArchive(f"{self.label}: member appears twice", name)
                member = _Member(name, entry.kind, entry.size, entry.linkname)
                if (
                    entry.kind is EntryKind.REG
                    and entry.size <= KEEP_IN_MEMORY
                    and kept + entry.size <= MEMORY_BUDGET
                ):
                    member.data = entry.read()
                    kept += entry.size
                self.members[name] = member

    # -- lookups ------------------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        return name in self.members

    def resolve(self, name: str) -> _Member:
        """The regular member ``name`` stands for, following symlink and hard-link members
        (inside the archive's namespace; a link leading out of it is BreakoutError)."""
        seen = 0
        current = clean_member_name(name, self.label)
        while True:
            member = self.members.get(current)
            if member is None:
                raise NotFound(f"{self.label}: no member {current!r}")
            if member.kind is EntryKind.REG:
                return member
            if member.kind is EntryKind.SYMLINK:
                target = member.linkname
                if target.startswith("/"):
                    raise BreakoutError(f"{self.label}: member symlink with an absolute target", current)
                joined = posixpath.normpath(posixpath.join(posixpath.dirname(current), target))
                if joined == ".." or joined.startswith("../"):
                    raise BreakoutError(f"{self.label}: member symlink leading out of the archive", current)
                current = clean_member_name(joined, self.label)
            elif member.kind is EntryKind.HARDLINK:
                current = clean_member_name(member.linkname, self.label)
            else:
                raise InvalidArchive(f"{self.label}: member is not a regular file", current)
            seen += 1
            if seen > _MAX_LINK_HOPS:
                raise InvalidArchive(f"{self.label}: too many links resolving member", name)

    def size(self, name: str) -> int:
        return self.resolve(name).size

    def read(self, name: str, limit: int) -> bytes:
        member = self.resolve(name)
        if member.size > limit:
            raise InvalidArchive(f"{self.label}: member is larger than {limit} bytes", member.name)
        if member.data is not None:
            return member.data
        items = self.open_in_order([member.name])
        try:
            for _, stream in items:
                return stream.read()
        finally:
            items.close()
        raise AssertionError("unreachable")  # pragma: no cover

    def open_in_order(self, names: Sequence[str]) -> Generator[tuple[int, BinaryIO], None, None]:
        """Stream the members ``names`` (resolved) in the order given: see the module docstring."""
        resolved = [self.resolve(n) for n in names]
        wanted: dict[str, list[int]] = {}
        for i, m in enumerate(resolved):
            wanted.setdefault(m.name, []).append(i)
        ready: dict[int, bytes | Path] = {i: m.data for i, m in enumerate(resolved) if m.data is not None}
        nxt = 0
        spooled: list[Path] = []
        try:
            while nxt in ready:
                with _open_ready(ready.pop(nxt)) as stream:
                    yield nxt, stream
                nxt += 1
            if nxt < len(resolved):
                with ExitStack() as stack:
                    for entry in self._entries(stack):
                        if entry.kind is not EntryKind.REG:
                            continue
                        name = clean_member_name(entry.name, self.label)
                        idx = [i for i in wanted.get(name, ()) if i not in ready and i >= nxt]
                        if not idx:
                            continue
                        if entry.size != self.members[name].size:
                            raise CorruptStream(f"{self.label}: the archive changed while it was read", name)
                        if idx == [nxt]:
                            yield nxt, cast(BinaryIO, _EntryReader(entry))
                            nxt += 1
                        else:
                            path = self._spool(entry, len(spooled))
                            spooled.append(path)
                            for i in idx:
                                ready[i] = path
                        while nxt in ready:
                            with _open_ready(ready.pop(nxt)) as stream:
                                yield nxt, stream
                            nxt += 1
                        if nxt >= len(resolved):
                            break
            while nxt in ready:
                with _open_ready(ready.pop(nxt)) as stream:
                    yield nxt, stream
                nxt += 1
            if nxt < len(resolved):
                raise CorruptStream(
                    f"{self.label}: the archive changed while it was read", resolved[nxt].name
                )
        finally:
            for p in spooled:
                p.unlink(missing_ok=True)

    def _spool(self, entry: TarEntry, n: int) -> Path:
        if self.spool_dir is None:
            raise InvalidArgument("archive members out of order need a spool directory")
        path = self.spool_dir / f"member-{n}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            entry.copy_to_fd(fd)
        finally:
            os.close(fd)
        return path


# -- docker-archive ---------------------------------------------------------------------------------


def _select_entry(entries: list[dict[str, Any]], ref: str | None, label: str) -> dict[str, Any]:
    if ref is not None and ref.startswith("@") and ref[1:].isdigit():
        i = int(ref[1:])
        if i >= len(entries):
            raise NotFound(f"{label}: manifest.json has {len(entries)} images, no @{i}")
        return entries[i]
    if ref is not None:
        want = str(parse_reference(ref))
        for e in entries:
            for tag in e.get("RepoTags") or []:
                if isinstance(tag, str) and str(parse_reference(tag)) == want:
                    return e
        raise NotFound(f"{label}: no image {ref!r} in manifest.json")
    if len(entries) != 1:
        tags = [", ".join(e.get("RepoTags") or []) or f"@{i}" for i, e in enumerate(entries)]
        raise InvalidArgument(
            f"{label}: manifest.json holds {len(entries)} images ({'; '.join(tags)}):"
            " choose one (docker-archive:FILE:NAME:TAG or :@N)"
        )
    return entries[0]


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArchive(f"{what} must be a list of strings")
    return value


def resolve_docker_archive(files: TarFiles, *, ref: str | None = None) -> ResolvedImage:
    """Find the image in a docker-archive (legacy or Docker 25+ form) and verify its config."""
    label = files.label
    doc = load_json(files.read("manifest.json", MAX_DOCUMENT), f"{label}: manifest.json")
    if not isinstance(doc, list) or not doc or not all(isinstance(e, dict) for e in doc):
        raise InvalidArchive(f"{label}: manifest.json must be a non-empty list of objects")
    entry = _select_entry(doc, ref, label)
    config_path = entry.get("Config")
    if not isinstance(config_path, str):
        raise InvalidArchive(f"{label}: manifest.json: 'Config' must be a string")
    config_name = clean_member_name(config_path, f"{label}: manifest.json Config")
    config_bytes = files.read(config_name, MAX_DOCUMENT)
    config_digest = sha256_digest(config_bytes)
    named = _LEGACY_CONFIG_NAME.fullmatch(config_name) or _BLOB_NAME.fullmatch(config_name)
    if named is not None:
        claimed = named.group(1) if named.re is _LEGACY_CONFIG_NAME else f"{named.group(1)}:{named.group(2)}"
        if ":" not in claimed:
            claimed = f"sha256:{claimed}"
        algo = claimed.partition(":")[0]
        got = f"{algo}:{hashlib.new(algo, config_bytes).hexdigest()}"
        if got != claimed:
            raise DigestMismatch(f"{label}: config {config_name} hashes to {got}")
    config: ImageConfig = parse_config(config_bytes, f"{label}: config {config_name}")
    layer_paths = _str_list(entry.get("Layers"), f"{label}: manifest.json Layers")
    if len(layer_paths) != len(config.diff_ids):
        raise InvalidArchive(
            f"{label}: manifest.json lists {len(layer_paths)} layers but the config has"
            f" {len(config.diff_ids)} diff IDs"
        )
    sources = entry.get("LayerSources") or {}
    if not isinstance(sources, dict):
        raise InvalidArchive(f"{label}: manifest.json: 'LayerSources' must be an object")
    layers = []
    for i, path in enumerate(layer_paths):
        name = clean_member_name(path, f"{label}: manifest.json Layers[{i}]")
        member = files.resolve(name)
        digest: str | None = None
        size: int | None = None
        media_type: str | None = None
        blob = _BLOB_NAME.fullmatch(member.name) or _BLOB_NAME.fullmatch(name)
        if blob is not None:
            digest = f"{blob.group(1)}:{blob.group(2)}"
        src = sources.get(config.diff_ids[i])
        if src is not None:
            desc = parse_descriptor(src, f"{label}: manifest.json LayerSources[{config.diff_ids[i]}]")
            if digest is not None and desc.digest != digest:
                raise DigestMismatch(f"{label}: layer {name} is {digest} but LayerSources says {desc.digest}")
            digest, size, media_type = desc.digest, desc.size, desc.media_type
        layers.append(LayerSpec(member.name, digest, size, media_type))
    names = []
    for tag in _str_list(entry.get("RepoTags"), f"{label}: manifest.json RepoTags"):
        try:
            names.append(str(parse_reference(tag)))
        except InvalidArgument as exc:
            raise InvalidArchive(f"{label}: manifest.json RepoTags: {exc}") from None
    return ResolvedImage(
        config=config,
        config_digest=config_digest,
        config_media_type=MT_DOCKER_CONFIG,
        manifest=None,
        manifest_digest=None,
        manifest_media_type=None,
        layers=tuple(layers),
        names=tuple(names),
    )


# -- writing ----------------------------------------------------------------------------------------

_BLOCK = 512


def _octal(value: int, width: int) -> bytes:
    if value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    # base-256 (GNU), for sizes of 8 GiB and more
    out = bytearray(value.to_bytes(width, "big"))
    out[0] |= 0x80
    return bytes(out)


def ustar_header(
    name: str, size: int = 0, typeflag: bytes = b"0", *, mode: int = 0o644, linkname: str = ""
) -> bytes:
    """One deterministic ustar header block (owner 0:0, mtime 0)."""
    raw = name.encode("utf-8")
    link = linkname.encode("utf-8")
    if len(raw) > 100 or len(link) > 100:
        raise InvalidArgument(f"archive member name too long for ustar: {name!r}")
    h = bytearray(_BLOCK)
    h[0 : len(raw)] = raw
    h[100:108] = _octal(mode, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(0, 12)
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[157 : 157 + len(link)] = link
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[329:337] = _octal(0, 8)
    h[337:345] = _octal(0, 8)
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


class _HashCount:
    """Hashes and counts bytes written through it into ``out``."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._out.write(data)
        self._hash.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


class TarSink:
    """Writes an image archive into ``out`` (a regular file, seekable, opened by the caller).

    Blobs go to ``blobs/sha256/<hex>`` (:meth:`blob`, :meth:`blob_stream`); other members are
    named by the caller (:meth:`member_stream`, :meth:`file`). A blob written twice is kept once.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._dirs: set[str] = set()
        self.blobs: set[str] = set()

    def _dir(self, name: str) -> None:
        parent = posixpath.dirname(name)
        if not parent or parent in self._dirs:
            return
        self._dir(parent)
        self._out.write(ustar_header(parent + "/", 0, b"5", mode=0o755))
        self._dirs.add(parent)

    def _pad(self, size: int) -> None:
        pad = -size % _BLOCK
        if pad:
            self._out.write(bytes(pad))

    def file(self, name: str, data: bytes) -> None:
        self._dir(name)
        self._out.write(ustar_header(name, len(data)))
        self._out.write(data)
        self._pad(len(data))

    def symlink(self, name: str, target: str) -> None:
        self._dir(name)
        self._out.write(ustar_header(name, 0, b"2", mode=0o777, linkname=target))

    def member_stream(
        self, name: str | None, fill: Callable[[BinaryIO], None], known: tuple[str, int] | None = None
    ) -> tuple[str, int]:
        """Write a member whose data ``fill(writer)`` produces; returns its (digest, size).

        ``name`` None: a blob, named by its digest. Unless ``known`` gives the digest and size up
        front, the header is written as a placeholder and rewritten afterwards.
        """
        out = self._out
        if name is None and known is not None and known[0] in self.blobs:
            return known
        final = name if name is not None else (None if known is None else _blob_member(known[0]))
        placeholder = final or "blobs/sha256/" + "0" * 64
        self._dir(placeholder)
        start = out.tell()
        out.write(ustar_header(placeholder, 0 if known is None else known[1]))
        w = _HashCount(out)
        fill(cast(BinaryIO, w))
        if known is not None and (w.digest, w.size) != known:
            raise DigestMismatch(
                f"member {placeholder} written as {w.digest} ({w.size} bytes),"
                f" expected {known[0]} ({known[1]})"
            )
        if name is None and w.digest in self.blobs:
            out.seek(start)
            out.truncate()
            return w.digest, w.size
        real = final or _blob_member(w.digest)
        if known is None:
            end = out.tell()
            out.seek(start)
            out.write(ustar_header(real, w.size))
            out.seek(end)
        self._pad(w.size)
        if name is None:
            self.blobs.add(w.digest)
        return w.digest, w.size

    def blob_stream(
        self, fill: Callable[[BinaryIO], None], known: tuple[str, int] | None = None
    ) -> tuple[str, int]:
        return self.member_stream(None, fill, known)

    def blob(self, data: bytes) -> tuple[str, int]:
        digest = sha256_digest(data)
        if digest not in self.blobs:
            self.file(_blob_member(digest), data)
            self.blobs.add(digest)
        return digest, len(data)

    def finish(self) -> None:
        self._out.write(bytes(2 * _BLOCK))


def _blob_member(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"blobs/{algo}/{hexpart}"
