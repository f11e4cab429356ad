#!/usr/bin/env python3
"""Inodes and disk used by the three-layer bench image under overlay, overlay2 and vfs.

Why the seed's overlay driver was superseded, in figures: for each driver, on a fresh
loop-mounted ext4 (a sparse image file, ``mkfs.ext4``, a loop device, all torn down afterwards by
:func:`graphdriver.testing.loopfs.loop_filesystem`), import ``layer1.tar``..``layer3.tar`` of the
bench image (``create`` + ``apply_diff`` per layer), then create containers the way the daemon
does (``<c>-init`` on the image, the init files that ``SetupInitLayer`` writes, ``<c>`` on the
init layer). Reported, from ``statvfs`` deltas after a
``syncfs``: inodes and bytes used by the import and per container, the highest link count of a
file in the driver's home, and the wall time of the import.

Usage (root)::

    python3 bench/overlay_footprint.py [--image /var/tmp/gd-bench/image] [--drivers overlay,overlay2,vfs]
        [--containers 3] [--size 8G] [--json /var/tmp/gd-bench/results/overlay_footprint.json]

It runs in a private, read-only mount namespace (only the scratch dirs stay writable), so its
mounts die with the process even if it is killed. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import stat
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from graphdriver.drivers.base import Driver
from graphdriver.drivers.registry import driver_class
from graphdriver.errors import GraphDriverError
from graphdriver.testing.loopfs import loop_filesystem, loop_unavailable_reason

DEFAULT_IMAGE = Path("/var/tmp/gd-bench/image")
DEFAULT_JSON = Path("/var/tmp/gd-bench/results/overlay_footprint.json")

# graph.SetupInitLayer at the seed's commit: path -> kind (symlink target for "symlink")
INIT_LAYER = {
    "/dev/pts": ("dir", ""),
    "/dev/shm": ("dir", ""),
    "/proc": ("dir", ""),
    "/sys": ("dir", ""),
    "/.dockerinit": ("file", ""),
    "/.dockerenv": ("file", ""),
    "/etc/resolv.conf": ("file", ""),
    "/etc/hosts": ("file", ""),
    "/etc/hostname": ("file", ""),
    "/dev/console": ("file", ""),
    "/etc/mtab": ("symlink", "/proc/mounts"),
}


@dataclass
class Usage:
    inodes: int
    bytes: int


@dataclass
class Result:
    driver: str
    available: bool
    reason: str = ""
    import_inodes: int = 0
    import_bytes: int = 0
    import_seconds: float = 0.0
    max_links: int = 0
    layer_inodes: list[int] = field(default_factory=list)
    layer_bytes: list[int] = field(default_factory=list)
    container_inodes: float = 0.0
    container_bytes: float = 0.0
    containers: int = 0


def _syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), f"syncfs {path}")
    finally:
        os.close(fd)


def usage(mnt: Path) -> Usage:
    _syncfs(mnt)
    st = os.statvfs(mnt)
    return Usage(st.f_files - st.f_ffree, (st.f_blocks - st.f_bfree) * st.f_frsize)


def max_links(home: Path) -> int:
    """The highest link count of a regular file under ``home`` (symlinks not followed)."""
    best = 0
    for dirpath, _dirs, files in os.walk(home):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                best = max(best, st.st_nlink)
    return best


def setup_init_layer(root: Path) -> None:
    """What graph.SetupInitLayer did to a container's -init layer (2014)."""
    for pth, (kind, target) in sorted(INIT_LAYER.items()):
        parts = pth.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            try:
                os.unlink(root.joinpath(*parts[:i]))  # non-directories only; dirs fail, as in Go
            except OSError:
                pass
        path = root.joinpath(*parts)
        if os.path.lexists(path):
            continue
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if kind == "dir":
            path.mkdir(mode=0o755, parents=True, exist_ok=True)
        elif kind == "file":
            path.touch(mode=0o755)
        else:
            os.symlink(target, path)


def measure(name: str, image: Path, containers: int, size: str, scratch_base: Path) -> Result:
    try:
        cls = driver_class(name)
    except GraphDriverError as exc:
        return Result(name, False, str(exc))
    with loop_filesystem("ext4", size, directory=scratch_base) as fs:
        try:
            driver: Driver = cls(fs.path / name)
        except GraphDriverError as exc:
            return Result(name, False, str(exc))
        try:
            return _measure(driver, image, containers, fs.path)
        finally:
            driver.cleanup()


def _measure(driver: Driver, image: Path, containers: int, mnt: Path) -> Result:
    before = usage(mnt)
    parent: str | None = None
    layer_inodes, layer_bytes = [], []
    seconds = 0.0
    prev = before
    for i in (1, 2, 3):
        layer = f"layer{i}"
        start = time.perf_counter()
        driver.create(layer, parent)
        with open(image / f"layer{i}.tar", "rb") as tar:
            driver.apply_diff(layer, parent, tar)
        seconds += time.perf_counter() - start
        now = usage(mnt)
        layer_inodes.append(now.inodes - prev.inodes)
        layer_bytes.append(now.bytes - prev.bytes)
        parent, prev = layer, now
    after = prev
    links = max_links(driver.home)
    for c in range(containers):
        cid = f"c{c}"
        driver.create(f"{cid}-init", parent)
        with driver.mounted(f"{cid}-init") as root:
            setup_init_layer(root)
        driver.create(cid, f"{cid}-init")
    with_containers = usage(mnt)
    n = max(containers, 1)
    return Result(
        driver.name,
        True,
        import_inodes=after.inodes - before.inodes,
        import_bytes=after.bytes - before.bytes,
        import_seconds=round(seconds, 2),
        max_links=links,
        layer_inodes=layer_inodes,
        layer_bytes=layer_bytes,
        container_inodes=(with_containers.inodes - after.inodes) / n,
        container_bytes=(with_containers.bytes - after.bytes) / n,
        containers=containers,
    )


def table(results: list[Result]) -> str:
    rows = [
        "| driver | image: inodes | inodes per layer (1 / 2 / 3) | image: disk MiB | layer 3: disk KiB "
        "| max link count | per container: inodes | per container: disk KiB | import s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if not r.available:
            rows.append(f"| {r.driver} | not available: {r.reason} | | | | | | | |")
            continue
        per_layer = " / ".join(f"{n:,}" for n in r.layer_inodes)
        rows.append(
            f"| {r.driver} | {r.import_inodes:,} | {per_layer} | {r.import_bytes / 2**20:,.1f} | "
            f"{r.layer_bytes[-1] / 1024:,.0f} | {r.max_links} | {r.container_inodes:,.0f} | "
            f"{r.container_bytes / 1024:,.0f} | {r.import_seconds:.1f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="dir with layer{1,2,3}.tar")
    ap.add_argument("--drivers", default="overlay,overlay2,vfs")
    ap.add_argument("--containers", type=int, default=3, help="containers created on the image")
    ap.add_argument("--size", default="8G", help="size of the sparse ext4 image")
    ap.add_argument("--scratch", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("overlay_footprint: needs root (loop mounts, overlay)", file=sys.stderr)
        return 2
    reason = loop_unavailable_reason("ext4")
    if reason is not None:
        print(f"overlay_footprint: no loop ext4: {reason}", file=sys.stderr)
        return 2
    missing = [f"layer{i}.tar" for i in (1, 2, 3) if not (args.image / f"layer{i}.tar").is_file()]
    if missing:
        lacks = ", ".join(missing)
        print(f"overlay_footprint: {args.image} lacks {lacks} (run make-image.sh)", file=sys.stderr)
        return 2
    from graphdriver.testing.sandbox import enter_readonly_sandbox

    args.json.parent.mkdir(parents=True, exist_ok=True)
    enter_readonly_sandbox([str(args.scratch), str(args.json.parent), "/tmp", "/dev/shm", "/run"])
    results = []
    for name in [n.strip() for n in args.drivers.split(",") if n.strip()]:
        print(f"... {name}", file=sys.stderr, flush=True)
        results.append(measure(name, args.image, args.containers, args.size, args.scratch))
    print(table(results))
    meta = {
        "kernel": os.uname().release,
        "image": str(args.image),
        "filesystem": f"ext4 {args.size} (loop, mkfs.ext4 defaults)",
    }
    args.json.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1) + "\n")
    print(f"\nJSON: {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
