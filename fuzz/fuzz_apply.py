#!/usr/bin/env python3
"""Fuzz apply_layer, and through it the tar reader and the decompressors, plus the store's import.

Every input is a layer blob (tar, gzip, zstd, bzip2 or xz). It is applied with
:func:`graphdriver.archive.apply.apply_layer` onto a fresh directory (OCI or overlay whiteouts,
chosen by the input's last byte), and every ``--store-every``-th input is also imported through a
:class:`~graphdriver.layers.store.LayerStore` on vfs (and removed again when it imports). The only
exceptions allowed are the documented typed errors, subclasses of
:class:`~graphdriver.errors.GraphDriverError`; anything else is a crash. After every batch of
``--batch`` inputs the oracle runs: the sentinel tree next to the roots is unchanged byte for byte
and stat for stat and no copy of its bytes is in a root
(:class:`~graphdriver.testing.sentinel.Sentinel`), and the store holds no layer, nothing in
``staging/``, and ``check()`` is clean.

Engines::

    fuzz_apply.py [HARNESS OPTIONS] -- [libFuzzer options] [CORPUS_DIR...]     atheris (coverage-guided)
    fuzz_apply.py --engine hypothesis --seconds 30 [--seed N]                  hypothesis (no atheris)
    fuzz_apply.py --engine replay FILE_OR_DIR...                              each input once

Both fuzzing engines mutate with :func:`mutate`: byte-level changes, and tar-aware ones that
decompress an input, change a header field to an interesting value (names with ``..``, whiteouts,
negative or huge numbers, unknown type flags...) or a PAX record, drop, duplicate or reorder
members, fix the checksum so the change reaches the code behind it, and compress again.

Safety: as root the harness first enters its own mount namespace in which everything is
read-only except the work directory (``--work``; also the first corpus directory and the
artifact directory when atheris writes there), and the roots it applies into are tmpfs mounts
with ``nodev,nosuid``: device nodes an input creates cannot be opened. The sentinel lives in
``<work>/base`` beside them (``--base`` to use one a caller planted and watches too).
"""

from __future__ import annotations

import argparse
import bz2
import ctypes
import gzip
import hashlib
import io
import lzma
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
MAX_INPUT = 128 << 10
"""inputs are cut to this size (libFuzzer's -max_len, the hypothesis mutator's bound)"""

# set by _load(), after atheris has had a chance to instrument the imports
_mods: dict[str, Any] = {}


def _load(instrument: bool) -> None:
    """Import the code under test (instrumented for coverage when ``instrument``)."""
    if instrument:
        import atheris  # type: ignore[import-not-found, import-untyped, unused-ignore]

        with atheris.instrument_imports(include=["graphdriver"]):
            _import_targets()
    else:
        _import_targets()


def _import_targets() -> None:
    from graphdriver.archive import apply, compression, tarformat  # noqa: F401
    from graphdriver.archive.apply import ApplyOptions, apply_layer
    from graphdriver.archive.types import Limits, WhiteoutFormat
    from graphdriver.errors import GraphDriverError
    from graphdriver.fs.remove import remove_tree
    from graphdriver.layers.store import LayerStore
    from graphdriver.testing.sentinel import Sentinel

    _mods.update(
        ApplyOptions=ApplyOptions,
        apply_layer=apply_layer,
        Limits=Limits,
        WhiteoutFormat=WhiteoutFormat,
        GraphDriverError=GraphDriverError,
        remove_tree=remove_tree,
        LayerStore=LayerStore,
        Sentinel=Sentinel,
    )


# -- the sandbox -----------------------------------------------------------------------------------

MS_NOSUID = 0x2
MS_NODEV = 0x4


def _mount_tmpfs(target: Path, size: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    data = f"size={size},mode=0755".encode()
    if libc.mount(b"tmpfs", str(target).encode(), b"tmpfs", ctypes.c_ulong(MS_NOSUID | MS_NODEV), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs on {target}: {os.strerror(err)}")


def enter_sandbox(writable: Iterable[Path], roots: Iterable[Path]) -> None:
    """Own mount namespace: only ``writable`` stays writable; each of ``roots`` becomes a private
    nodev,nosuid tmpfs. Root only (and single-threaded: call before the engine starts)."""
    from graphdriver.testing.sandbox import enter_readonly_sandbox

    enter_readonly_sandbox([str(p) for p in writable])
    for root in roots:
        _mount_tmpfs(root, "512m")


# -- the harness -----------------------------------------------------------------------------------


class Harness:
    """Applies inputs and runs the oracle; see the module docstring."""

    def __init__(self, base: Path, *, store_every: int, batch: int, adopt: bool) -> None:
        m = _mods
        self.base = base
        self.dest = base / "dest"
        self.store_root = base / "store"
        self.sentinel = m["Sentinel"](base, exclude=("dest", "store"), plant=not adopt)
        self.sentinel.arm()
        self.limits = m["Limits"](
            max_decompressed_bytes=16 << 20,
            max_entries=4096,
            max_entry_size=8 << 20,
            max_header_size=64 << 10,
            max_path_depth=64,
            max_path_length=4096,
        )
        self.store = m["LayerStore"].open(self.store_root, "vfs")
        self.store_every = store_every
        self.batch = batch
        self.count = 0
        self.stats = {"inputs": 0, "applied": 0, "refused": 0, "store-imports": 0, "store-refused": 0}
        self.errors: dict[str, int] = {}

    def _fresh_dest(self) -> None:
        if self.dest.is_dir() and not self.dest.is_symlink():
            # empty the tmpfs root in place (it is a mount point: the root itself stays)
            for name in os.listdir(self.dest):
                _mods["remove_tree"](self.dest / name)
        else:
            self.dest.mkdir()

    def one(self, data: bytes) -> None:
        """Apply one input; raise anything that is not a documented typed error."""
        m = _mods
        data = data[:MAX_INPUT]
        self.stats["inputs"] += 1
        fmt = m["WhiteoutFormat"].OVERLAY if data and data[-1] & 1 else m["WhiteoutFormat"].OCI
        self._fresh_dest()
        try:
            m["apply_layer"](self.dest, io.BytesIO(data), whiteout_format=fmt, limits=self.limits)
            self.stats["applied"] += 1
        except m["GraphDriverError"] as exc:
            self.stats["refused"] += 1
            key = type(exc).__name__
            self.errors[key] = self.errors.get(key, 0) + 1
        self.count += 1
        if self.store_every and self.count % self.store_every == 0:
            self._through_store(data)
        if self.count % self.batch == 0:
            self.check()

    def _through_store(self, data: bytes) -> None:
        m = _mods
        store = self.store
        self.stats["store-imports"] += 1
        try:
            layer = store.import_layer(io.BytesIO(data), limits=self.limits)
        except m["GraphDriverError"]:
            self.stats["store-refused"] += 1
            layers = store.layers()
            assert layers == [], f"a refused import left layers: {[la.id for la in layers]}"
            assert os.listdir(store.staging_root) == [], "a refused import left staging/ entries"
            return
        store.remove(layer.id)
        assert store.layers() == [], "a removed layer is still listed"

    def check(self) -> None:
        """The batch oracle."""
        self.sentinel.assert_intact(scan=[self.dest, self.store_root])
        report = self.store.check()
        assert report.clean, [str(p) for p in report.problems]
        assert self.store.layers() == []
        assert os.listdir(self.store.staging_root) == []

    def summary(self) -> str:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items()))
        return f"fuzz_apply: {self.stats} errors: {errors}"


# -- mutation ----------------------------------------------------------------------------------------

_FIELDS = (
    ("name", 0, 100),
    ("mode", 100, 8),
    ("uid", 108, 8),
    ("gid", 116, 8),
    ("size", 124, 12),
    ("mtime", 136, 12),
    ("typeflag", 156, 1),
    ("linkname", 157, 100),
    ("magic", 257, 8),
    ("devmajor", 329, 8),
    ("devminor", 337, 8),
    ("prefix", 345, 155),
)
_NAMES = [
    b"..",
    b".",
    b"/",
    b"./",
    b"../x",
    b"a/../../x",
    b"/../../etc/passwd",
    b".wh..",
    b".wh...",
    b".wh.",
    b"a/.wh..wh..opq",
    b".wh..wh..opq",
    b".wh.etc",
    b"etc/.wh.passwd",
    b".wh..wh.plnk/1",
    b"etc",
    b"etc/passwd",
    b"etc/passwd/x",
    b"link/x",
    b"l",
    b"x" * 99,
    b"a\0b",
    b"dev/null",
    b"\xff\xfe",
]
_LINKS = [b"/", b"..", b"../../..", b"/etc", b"etc/passwd", b"/etc/passwd", b"l", b"x/../../y", b"", b"."]
_NUMBERS = [
    b"0000000\0",
    b"0000001\0",
    b"0000777\0",
    b"0007777\0",
    b"7777777\0",
    b"\xff" * 8,
    b"\x80" + b"\0" * 6 + b"\x01",
    b"\x80\xff\xff\xff\xff\xff\xff\xff",
    b"8888888\0",
    b"       \0",
    b"\0" * 8,
    b"-000001\0",
]
_TYPES = b"0123456712KLxgSDVMNAZ\0 "
_PAX = [
    b"path=../../x",
    b"path=/etc/x",
    b"path=a\0b",
    b"linkpath=/",
    b"linkpath=../..",
    b"size=-1",
    b"size=99999999999999999999",
    b"uid=4294967296",
    b"mtime=-1.5",
    b"mtime=1e99",
    b"SCHILY.xattr.trusted.overlay.opaque=y",
    b"SCHILY.xattr.user.x=1",
    b"SCHILY.xattr.security.capability=\x01\x00\x00\x02",
    b"LIBARCHIVE.xattr.user.y=eA==",
    b"GNU.sparse.realsize=17179869184",
    b"GNU.sparse.major=1",
    b"comment=" + b"c" * 200,
    b"bogus",
    b"=",
]


def _pax_record(body: bytes) -> bytes:
    n = len(body) + 3
    while len(str(n)) + 2 + len(body) != n:
        n = len(str(n)) + 2 + len(body)
    return str(n).encode() + b" " + body + b"\n"


def _parse_number(field: bytes) -> int | None:
    if field and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        return None


def split_members(tar: bytes) -> tuple[list[tuple[bytearray, bytes]], bytes]:
    """``tar`` as (header, data) members as far as they parse, and the unparsed rest."""
    members: list[tuple[bytearray, bytes]] = []
    off = 0
    while off + 512 <= len(tar):
        header = bytearray(tar[off : off + 512])
        if not any(header):
            break
        size = _parse_number(bytes(header[124:136]))
        if size is None or size < 0 or size > len(tar):
            break
        end = off + 512 + size
        members.append((header, tar[off + 512 : end]))
        off = end + (-size % 512)
    return members, tar[off:]


def _fix(header: bytearray, data: bytes, *, size: bool) -> None:
    if size:
        header[124:136] = f"{len(data):011o}\0".encode()
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()


def join_members(members: list[tuple[bytearray, bytes]], rest: bytes) -> bytes:
    out = bytearray()
    for header, data in members:
        out += header + data + bytes(-len(data) % 512)
    return bytes(out + rest)


def _codec(data: bytes) -> str:
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if data[:3] == b"BZh":
        return "bzip2"
    if data[:6] == b"\xfd7zXZ\0":
        return "xz"
    return "none"


def _unwrap(data: bytes) -> tuple[str, bytes] | None:
    codec = _codec(data)
    try:
        if codec == "gzip":
            return codec, gzip.decompress(data)[:MAX_INPUT * 8]
        if codec == "zstd":
            import zstandard

            return codec, zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_INPUT * 8)
        if codec == "bzip2":
            return codec, bz2.decompress(data)[:MAX_INPUT * 8]
        if codec == "xz":
            return codec, lzma.decompress(data)[:MAX_INPUT * 8]
    except Exception:  # whatever the decompressor says: not an input to mutate structurally
        return None
    return codec, data


def _wrap(codec: str, tar: bytes) -> bytes:
    from graphdriver.testing.tarbuild import compress

    return compress(tar, codec)  # type: ignore[arg-type]  # one of _codec's names


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Plain byte-level changes (flip, set, insert, delete, truncate, repeat)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:
            out[min(pos, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            out[min(pos, len(out) - 1)] = rng.choice((0, 0xFF, 0x30, 0x37, 0x2F, 0x2E, 0x80))
        elif op == 2:
            out[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 3:
            del out[pos : pos + rng.randint(1, 64)]
        elif op == 4:
            del out[pos:]
        else:
            chunk = out[pos : pos + rng.randint(1, 512)]
            out[pos:pos] = chunk * rng.randint(1, 4)
    return bytes(out[:MAX_INPUT])


def mutate_tar(data: bytes, rng: random.Random, others: list[bytes] | None = None) -> bytes:
    """Structure-aware changes with the checksum fixed; see the module docstring."""
    unwrapped = _unwrap(data)
    if unwrapped is None:
        return mutate_bytes(data, rng)
    codec, tar = unwrapped
    members, rest = split_members(tar)
    if not members:
        return mutate_bytes(data, rng)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(members))
        header, body = members[i]
        op = rng.randrange(9)
        fix_size = False
        if op == 0:  # a field to an interesting value
            name, off, width = rng.choice(_FIELDS)
            if name in ("name", "prefix"):
                value = rng.choice(_NAMES)
            elif name == "linkname":
                value = rng.choice(_LINKS + _NAMES)
            elif name == "typeflag":
                value = bytes([rng.choice(_TYPES)])
            elif name == "magic":
                value = rng.choice([b"ustar\x0000", b"ustar  \0", b"\0" * 8, b"garbage!"])
            else:
                value = rng.choice(_NUMBERS)
            header[off : off + width] = value[:width].ljust(width, b"\0")
        elif op == 1:  # a PAX header with hostile records before this member
            records = b"".join(_pax_record(rng.choice(_PAX)) for _ in range(rng.randint(1, 3)))
            pax = bytearray(512)
            pax[0:9] = b"PaxHeader"
            pax[156:157] = rng.choice([b"x", b"g"])
            pax[257:265] = b"ustar\x0000"
            _fix(pax, records, size=True)
            members.insert(i, (pax, records))
            continue
        elif op == 2 and bytes(header[156:157]) in (b"x", b"g", b"L", b"K"):  # rewrite a meta header's body
            body = b"".join(_pax_record(rng.choice(_PAX)) for _ in range(rng.randint(1, 3)))
            fix_size = True
        elif op == 3:
            del members[i]
            if not members:
                break
            continue
        elif op == 4:
            members.insert(rng.randrange(len(members) + 1), (bytearray(header), body))
            continue
        elif op == 5:
            j = rng.randrange(len(members))
            members[i], members[j] = members[j], members[i]
            continue
        elif op == 6 and others:  # splice a member of another input
            other = _unwrap(rng.choice(others))
            if other is not None:
                theirs, _ = split_members(other[1])
                if theirs:
                    h, b = rng.choice(theirs)
                    members.insert(i, (bytearray(h), b))
            continue
        elif op == 7:  # the data
            body = mutate_bytes(body, rng) if body else rng.randbytes(rng.randint(1, 64))
            fix_size = rng.random() < 0.8
        else:  # a hostile name with a matching type
            header[0:100] = rng.choice(_NAMES).ljust(100, b"\0")[:100]
            header[156:157] = bytes([rng.choice(b"0125346")])
            header[157:257] = rng.choice(_LINKS).ljust(100, b"\0")[:100]
        _fix(header, body, size=fix_size)
        members[i] = (header, body)
    if rng.random() < 0.1:
        rest = rest[: rng.randrange(len(rest) + 1)]
    new = join_members(members, rest)
    if rng.random() < 0.15:
        codec = rng.choice(["none", "gzip", "zstd", "bzip2", "xz"])
    return _wrap(codec, new)[:MAX_INPUT]


def mutate(data: bytes, rng: random.Random, others: list[bytes] | None = None) -> bytes:
    if rng.random() < 0.65:
        return mutate_tar(data, rng, others)
    return mutate_bytes(data, rng)


def corpus_files(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith(".")))
        elif p.is_file():
            out.append(p)
    return out


# -- engines -----------------------------------------------------------------------------------------


def _save_crash(artifacts: Path, data: bytes) -> Path:
    artifacts.mkdir(parents=True, exist_ok=True)
    path = artifacts / f"crash-{hashlib.sha1(data).hexdigest()}"
    path.write_bytes(data)
    return path


def run_atheris(harness: Harness, libfuzzer_args: list[str]) -> None:
    import atheris  # type: ignore[import-not-found, import-untyped, unused-ignore]

    seen: list[bytes] = []

    def test_one(data: bytes) -> None:
        harness.one(data)

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if len(seen) < 64 and data:
            seen.append(bytes(data))
        elif data and rng.random() < 0.05:
            seen[rng.randrange(len(seen))] = bytes(data)
        out = atheris.Mutate(data, max_size) if rng.random() < 0.4 else mutate(bytes(data), rng, seen)
        return bytes(out[:max_size])

    atheris.Setup([sys.argv[0], *libfuzzer_args], test_one, custom_mutator=custom_mutator)
    atheris.Fuzz()


def run_hypothesis(harness: Harness, seconds: float, seed: int, seeds: list[bytes], artifacts: Path) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    @st.composite
    def inputs(draw: Any) -> bytes:
        data: bytes = draw(st.sampled_from(seeds))
        rng = random.Random(draw(st.integers(0, 2**32 - 1)))
        for _ in range(draw(st.integers(1, 4))):
            data = mutate(data, rng, seeds)
        return data

    deadline = time.monotonic() + seconds
    round_ = 0
    while time.monotonic() < deadline:
        round_ += 1

        @hseed(seed * 1_000_003 + round_)
        @settings(
            max_examples=100,
            deadline=None,
            database=None,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        @given(inputs())
        def one(data: bytes) -> None:
            try:
                harness.one(data)
            except BaseException:
                print(f"fuzz_apply: crashing input saved to {_save_crash(artifacts, data)}", file=sys.stderr)
                raise

        one()
    harness.check()


def run_replay(harness: Harness, files: list[Path]) -> None:
    for path in files:
        data = path.read_bytes()
        try:
            harness.one(data)
        except BaseException:
            print(f"fuzz_apply: {path} crashes", file=sys.stderr)
            raise
    harness.check()


def main(argv: list[str]) -> int:
    if "--" in argv:
        cut = argv.index("--")
        own, rest = argv[:cut], argv[cut + 1 :]
    else:
        own, rest = argv, []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=["atheris", "hypothesis", "replay"], default="atheris")
    ap.add_argument("--work", type=Path, help="scratch directory (default: a new one under /tmp)")
    ap.add_argument("--base", type=Path, help="a directory holding a sentinel tree planted by the caller")
    ap.add_argument("--seconds", type=float, default=30.0, help="hypothesis: how long to run")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis: the seed of the run")
    ap.add_argument("--batch", type=int, default=64, help="inputs between two oracle runs")
    ap.add_argument(
        "--store-every", type=int, default=16, help="import every Nth input through a store (0: never)"
    )
    ap.add_argument("--no-sandbox", action="store_true", help="do not enter a private read-only namespace")
    ap.add_argument("paths", nargs="*", type=Path, help="replay: inputs; hypothesis: seed corpus dirs")
    args = ap.parse_args(own)

    work = (args.work or Path(tempfile.mkdtemp(prefix="gd-fuzz-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = (args.base or work / "base").resolve()
    base.mkdir(parents=True, exist_ok=True)
    for name in ("dest", "store"):
        (base / name).mkdir(exist_ok=True)
    artifacts = work / "artifacts"
    artifacts.mkdir(exist_ok=True)
    if os.geteuid() == 0 and not args.no_sandbox:
        writable = [work, base]
        dirs = [Path(a) for a in rest if not a.startswith("-")]
        if dirs:
            writable.append(dirs[0].resolve())  # libFuzzer adds new inputs to the first corpus dir
        prefixes = [a.split("=", 1)[1] for a in rest if a.startswith("-artifact_prefix=")]
        writable += [Path(p).resolve().parent for p in prefixes]
        enter_sandbox([p for p in writable if p.is_dir()], [base / "dest", base / "store"])
    if args.engine == "atheris" and not any(a.startswith("-artifact_prefix=") for a in rest):
        rest.append(f"-artifact_prefix={artifacts}/")

    _load(instrument=args.engine == "atheris")
    harness = Harness(base, store_every=args.store_every, batch=args.batch, adopt=args.base is not None)
    try:
        if args.engine == "atheris":
            run_atheris(harness, rest)
        elif args.engine == "hypothesis":
            seeds = [p.read_bytes() for p in corpus_files(args.paths or [CORPUS])]
            run_hypothesis(harness, args.seconds, args.seed, seeds, artifacts)
        else:
            run_replay(harness, corpus_files(args.paths or [CORPUS]))
    finally:
        print(harness.summary(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
