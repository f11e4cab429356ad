"""The benchmark machinery: timed processes, fresh loop-mounted filesystems, statistics, reports.

- :func:`timed` runs one command as its own process and returns its wall time (perf_counter
  around spawn and reap), user and system CPU time and peak RSS from ``os.wait4``'s rusage.
- :class:`LoopFs` makes a sparse image file, ``mkfs``, ``mount -o loop``, and always tears it
  down (everything mounted below it first, then the loop mount; the image file is deleted).
- :func:`summarize` / :func:`markdown` turn samples into median, min-max and ratio rows.

Nothing here knows about graphdriver or the peers: :mod:`operations` describes what to run.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


class StepError(RuntimeError):
    """A benchmarked or setup command exited non-zero."""


@dataclass
class Timing:
    """One process: wall seconds, CPU seconds, peak resident set size in KiB."""

    wall: float
    user: float
    sys: float
    maxrss_kb: int

    def __add__(self, other: Timing) -> Timing:
        return Timing(self.wall + other.wall, self.user + other.user, self.sys + other.sys,
                      max(self.maxrss_kb, other.maxrss_kb))


ZERO = Timing(0.0, 0.0, 0.0, 0)


def timed(argv: Sequence[str], *, env: Mapping[str, str] | None = None, stdout_path: str | None = None,
          cwd: str | None = None) -> Timing:
    """Run ``argv``, wait for it with ``os.wait4``, and return its :class:`Timing`.

    stdout goes to ``stdout_path`` (or /dev/null); stderr is kept for the error message.
    """
    out = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL  # noqa: SIM115
    with tempfile.TemporaryFile() as err:
        try:
            start = time.perf_counter()
            proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=dict(env) if env else None,
                                    cwd=cwd)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            if stdout_path:
                out.close()  # type: ignore[union-attr]
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read()[-2000:].decode(errors="replace")
            raise StepError(f"exit {proc.returncode}: {' '.join(argv)}\n{tail}")
    return Timing(wall, usage.ru_utime, usage.ru_stime, usage.ru_maxrss)


def run(argv: Sequence[str], *, env: Mapping[str, str] | None = None, capture: bool = False) -> str:
    """Run an untimed helper command; raise :class:`StepError` with its stderr on failure."""
    proc = subprocess.run(list(argv), env=dict(env) if env else None, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise StepError(f"exit {proc.returncode}: {' '.join(argv)}\n{proc.stderr[-2000:]}")
    return proc.stdout if capture else ""


def mounts_below(path: str) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    prefix = path.rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == path or point.startswith(prefix):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def unmount_below(path: str) -> None:
    for point in mounts_below(path):
        if subprocess.run(["umount", point], stderr=subprocess.DEVNULL, check=False).returncode:
            subprocess.run(["umount", "-l", point], stderr=subprocess.DEVNULL, check=False)


MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}


class LoopFs:
    """A fresh filesystem in a sparse image file under ``workdir``, mounted at ``workdir/mnt``."""

    def __init__(self, workdir: str, fstype: str = "ext4", size: str = "6G") -> None:
        self.workdir = workdir
        self.fstype = fstype
        self.size = size
        self.image = os.path.join(workdir, f"{fstype}.img")
        self.mnt = os.path.join(workdir, "mnt")

    def __enter__(self) -> LoopFs:
        os.makedirs(self.mnt, exist_ok=True)
        try:
            run(["truncate", "-s", self.size, self.image])
            run([*MKFS[self.fstype], self.image])
            run(["mount", "-o", "loop", self.image, self.mnt])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        unmount_below(self.mnt)
        if mounts_below(self.mnt):
            raise RuntimeError(f"could not unmount {self.mnt}")
        for path in (self.image,):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        try:
            os.rmdir(self.mnt)
        except OSError:
            pass


@dataclass
class Sample:
    """One run of one tool on one operation: the total and each timed step."""

    total: Timing
    steps: dict[str, Timing] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"total": asdict(self.total), "steps": {k: asdict(v) for k, v in self.steps.items()},
                "extra": self.extra}


@dataclass
class Row:
    """Summary of one (operation, tool): medians and the wall-time spread."""

    operation: str
    tool: str
    runs: int
    wall: float
    wall_min: float
    wall_max: float
    user: float
    sys: float
    maxrss_mib: float
    ratio: float | None
    baseline: str
    note: str = ""


def summarize(operation: str, baseline: str, samples: Mapping[str, list[Sample]],
              notes: Mapping[str, str]) -> list[Row]:
    """Rows for one operation, in the order of ``samples``; ratio = median wall / baseline's."""
    base = samples.get(baseline)
    base_wall = statistics.median(s.total.wall for s in base) if base else None
    rows = []
    for tool, runs in samples.items():
        if not runs:
            continue
        walls = [s.total.wall for s in runs]
        wall = statistics.median(walls)
        rows.append(Row(
            operation=operation, tool=tool, runs=len(runs), wall=wall, wall_min=min(walls),
            wall_max=max(walls), user=statistics.median(s.total.user for s in runs),
            sys=statistics.median(s.total.sys for s in runs),
            maxrss_mib=statistics.median(s.total.maxrss_kb for s in runs) / 1024,
            ratio=wall / base_wall if base_wall else None, baseline=baseline, note=notes.get(tool, ""),
        ))
    return rows


def _secs(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 0.1 else f"{x:.3f} s" if x < 10 else f"{x:.2f} s"


def markdown(rows: Sequence[Row]) -> str:
    """The results table (one line per operation and tool)."""
    lines = [
        "| operation | tool | median wall | min-max | user | sys | max RSS | ratio | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = "baseline" if r.tool == r.baseline else (f"{r.ratio:.2f}x" if r.ratio is not None else "-")
        lines.append(
            f"| {r.operation} | {r.tool} | {_secs(r.wall)} | {_secs(r.wall_min)}-{_secs(r.wall_max)} | "
            f"{_secs(r.user)} | {_secs(r.sys)} | {r.maxrss_mib:.0f} MiB | {ratio} | {r.note} |"
        )
    return "\n".join(lines)
