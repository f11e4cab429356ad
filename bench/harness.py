"""The benchmark machinery: timed processes, fresh loop-mounted filesystems, statistics, reports.

- :func:`timed` runs one command as its own process and returns its wall time (perf_counter
  around spawn and reap), user and system CPU time from ``os.wait4``'s rusage and its peak RSS
  from GNU time (-1 KiB where ``/usr/bin/time`` is missing).
- :class:`LoopFs` makes a sparse image file, ``mkfs``, ``mount -o loop``, and always tears it
  down (everything mounted below it first, then the loop mount; the image file is deleted).
- :func:`summarize` / :func:`markdown` turn samples into median, min-max and ratio rows.
- :func:`fs_usage` reads a filesystem's used bytes and inodes (``statvfs``), for footprints.

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

INNER = "GDBENCH-INNER"
GNU_TIME = "/usr/bin/time"


class StepError(RuntimeError):
    """A benchmarked or setup command exited non-zero."""


@dataclass
class Timing:
    """One process: wall seconds, CPU seconds, peak resident set size in KiB; ``inner`` is the
    time the process reported for its library call (``GDBENCH-INNER``), when it does."""

    wall: float
    user: float
    sys: float
    maxrss_kb: int
    inner: float | None = None

    def __add__(self, other: Timing) -> Timing:
        inner = (
            None if self.inner is None and other.inner is None else (self.inner or 0.0) + (other.inner or 0.0)
        )
        return Timing(
            self.wall + other.wall,
            self.user + other.user,
            self.sys + other.sys,
            max(self.maxrss_kb, other.maxrss_kb),
            inner,
        )

    @property
    def value(self) -> float:
        """What a row reports: the inner time when the process gave one, else the wall time."""
        return self.inner if self.inner is not None else self.wall


ZERO = Timing(0.0, 0.0, 0.0, 0)


def timed(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdout_path: str | None = None,
    cwd: str | None = None,
) -> Timing:
    """Run ``argv``, wait for it with ``os.wait4``, and return its :class:`Timing`.

    stdout goes to ``stdout_path`` (or a temp file); stderr is kept for the error message. A
    ``GDBENCH-INNER <seconds>`` line on stdout becomes :attr:`Timing.inner`.

    CPU times come from ``wait4`` (they include the command's own children). The peak RSS comes
    from GNU time (``/usr/bin/time -f %M``) run in between: the ``ru_maxrss`` that ``wait4``
    reports for a child of this (large) Python process keeps the high-water mark of the address
    space it was forked from, so every command would show this process's size.
    """
    out = open(stdout_path, "w+b") if stdout_path else tempfile.TemporaryFile()  # noqa: SIM115
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as rss:
        wrapped = (
            [GNU_TIME, "-f", "%M", "-o", rss.name, *argv] if os.access(GNU_TIME, os.X_OK) else list(argv)
        )
        try:
            start = time.perf_counter()
            proc = subprocess.Popen(wrapped, stdout=out, stderr=err, env=dict(env) if env else None, cwd=cwd)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            inner = None
            for line in out.read().decode(errors="replace").splitlines():
                if line.startswith(INNER):
                    inner = float(line.split()[1])
        finally:
            out.close()
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read()[-2000:].decode(errors="replace")
            raise StepError(f"exit {proc.returncode}: {' '.join(argv)}\n{tail}")
        lines = [ln for ln in rss.read().split() if ln.isdigit()]
        maxrss = int(lines[-1]) if wrapped[0] == GNU_TIME and lines else -1
    return Timing(wall, usage.ru_utime, usage.ru_stime, maxrss, inner)


def run(argv: Sequence[str], *, env: Mapping[str, str] | None = None, capture: bool = False) -> str:
    """Run an untimed helper command; raise :class:`StepError` with its stderr on failure."""
    proc = subprocess.run(
        list(argv), env=dict(env) if env else None, capture_output=True, text=True, check=False
    )
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
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}


class LoopFs:
    """A fresh filesystem in a sparse image file under ``workdir``, mounted at ``workdir/mnt``."""

    def __init__(self, workdir: str, fstype: str = "ext4", size: str = "8G") -> None:
        self.workdir = workdir
        self.fstype = fstype
        self.size = size
        self.image = os.path.join(workdir, f"{fstype}.img")
        self.mnt = os.path.join(workdir, "mnt")
        self.fresh: tuple[int, int] = (0, 0)
        """(bytes, inodes) in use right after mkfs: footprints are measured from there."""

    def __enter__(self) -> LoopFs:
        os.makedirs(self.mnt, exist_ok=True)
        try:
            run(["truncate", "-s", self.size, self.image])
            run([*MKFS[self.fstype], self.image])
            run(["mount", "-o", "loop", self.image, self.mnt])
            self.fresh = fs_usage(self.mnt)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def used(self) -> tuple[int, int]:
        """(bytes, inodes) used since mkfs (after a ``syncfs``, so delayed allocation is counted)."""
        subprocess.run(["sync", "-f", self.mnt], check=False)
        b, i = fs_usage(self.mnt)
        return b - self.fresh[0], i - self.fresh[1]

    def close(self) -> None:
        unmount_below(self.mnt)
        if mounts_below(self.mnt):
            raise RuntimeError(f"could not unmount {self.mnt}")
        try:
            os.unlink(self.image)
        except FileNotFoundError:
            pass
        try:
            os.rmdir(self.mnt)
        except OSError:
            pass


def fs_usage(path: str) -> tuple[int, int]:
    """(bytes, inodes) in use on the filesystem holding ``path``, from ``statvfs``."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_files - st.f_ffree


@dataclass
class Sample:
    """One run of one scenario: a :class:`Timing` per reported operation (the sum of the steps
    charged to it), every step's own timing, and extras (footprints, verdicts)."""

    reports: dict[str, Timing] = field(default_factory=dict)
    steps: dict[str, Timing] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def charge(self, report: str, step: str, t: Timing) -> None:
        self.steps[step] = t
        self.reports[report] = self.reports[report] + t if report in self.reports else t

    def to_json(self) -> dict[str, Any]:
        return {
            "reports": {k: asdict(v) for k, v in self.reports.items()},
            "steps": {k: asdict(v) for k, v in self.steps.items()},
            "extra": self.extra,
        }


@dataclass
class Row:
    """Summary of one (operation, tool): medians, the spread, and ratios to the baselines."""

    operation: str
    tool: str
    runs: int
    value: float
    value_min: float
    value_max: float
    inner: bool
    wall: float
    user: float
    sys: float
    maxrss_mib: float
    ratios: dict[str, float]
    note: str = ""


def summarize(
    operation: str, baselines: Sequence[str], timings: Mapping[str, list[Timing]], notes: Mapping[str, str]
) -> list[Row]:
    """Rows for one operation, in the order of ``timings``; ratio = median / a baseline's median."""
    base = {b: statistics.median(t.value for t in timings[b]) for b in baselines if timings.get(b)}
    rows = []
    for tool, ts in timings.items():
        if not ts:
            continue
        values = [t.value for t in ts]
        value = statistics.median(values)
        rows.append(
            Row(
                operation=operation,
                tool=tool,
                runs=len(ts),
                value=value,
                value_min=min(values),
                value_max=max(values),
                inner=all(t.inner is not None for t in ts),
                wall=statistics.median(t.wall for t in ts),
                user=statistics.median(t.user for t in ts),
                sys=statistics.median(t.sys for t in ts),
                maxrss_mib=statistics.median(t.maxrss_kb for t in ts) / 1024,
                ratios={b: value / v for b, v in base.items() if b != tool and v > 0},
                note=notes.get(tool, ""),
            )
        )
    return rows


def secs(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 0.1 else f"{x:.3f} s" if x < 10 else f"{x:.2f} s"


def markdown(rows: Sequence[Row], baselines: Mapping[str, Sequence[str]]) -> str:
    """The results table (one line per operation and tool). Rows marked * report the library's
    own time (``inner``); their CPU and RSS columns are still the whole process's."""
    lines = [
        "| operation | tool | median | min-max | user | sys | max RSS | ratio to peers | notes |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if r.tool in baselines.get(r.operation, ()):
            ratio = "**peer**"
        else:
            ratio = ", ".join(f"{v:.2f}x {b}" for b, v in r.ratios.items()) or "-"
        star = "*" if r.inner else ""
        rss = "n/a" if r.maxrss_mib < 0 else f"{r.maxrss_mib:.1f} MiB"
        lines.append(
            f"| {r.operation} | {r.tool}{star} | {secs(r.value)} | {secs(r.value_min)}-{secs(r.value_max)} | "
            f"{secs(r.user)} | {secs(r.sys)} | {rss} | {ratio} | {r.note} |"
        )
    return "\n".join(lines)
