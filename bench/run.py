#!/usr/bin/env python3
"""Benchmark graphdriver against GNU tar, bsdtar, umoci and containers-storage.

  sudo python3 bench/run.py [--quick] [--runs N] [--only X,...] [--skip X,...] [--list]

Inputs: the three-layer bench image that ``make-image.sh`` builds (``--image``, default
/var/tmp/gd-bench/image, built there first if missing), and a deep (200 layers) and a wide
(100,000 files) image that the bench generates once under ``--work``/inputs.

Every (run, group, tool) gets a fresh loop-mounted filesystem (sparse image file, mkfs,
``mount -o loop``; always torn down). Runs are interleaved: run 1 of every group and tool, then
run 2... Each timed step is its own process, measured with ``os.wait4`` (wall, user, sys, peak
RSS). The report gives per operation and tool the median, min-max, median CPU times and peak
RSS, and the ratios of the median to the peers' medians from the same run; rows marked * give the
time of the library call alone (bench/gd_lib.py), others whole processes. A second table gives the
disk and inodes in use after each import (statvfs of the loop filesystem, minus a fresh one's).

``--only``/``--skip`` take group names (``--list``), tools, or GROUP:TOOL. ``--quick`` is one
run of the startup, apply, import and container groups.

Writes ``<out>/<stamp>.md`` and ``<out>/<stamp>.json`` (default bench/results/) and prints the
Markdown. Needs root (loop mounts). Installs nothing: a missing tool is reported and its rows
skipped (``scripts/test.sh`` installs the Debian packages).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time

from harness import LoopFs, Row, Sample, StepError, Timing, markdown, run, secs, summarize, timed
from inputs import ensure_inputs
from operations import HERE, REPO, Env, Group, Scenario, Workspace, groups, probe_tools

DEFAULT_OUT = "/var/tmp/gd-bench"
QUICK_RUNS = 1


def default_shared() -> str | None:
    for candidate in (os.path.join(REPO, "..", "shared", "bench"), "/work/shared/bench"):
        if os.path.isfile(os.path.join(candidate, "make-image.sh")):
            return os.path.abspath(candidate)
    return None


def ensure_image(image: str, shared: str | None) -> None:
    missing = [
        p
        for p in ("layer1.tar", "layer2.tar", "layer3.tar", "layer1.tar.gz", "oci/index.json")
        if not os.path.exists(os.path.join(image, p))
    ]
    if not missing:
        return
    if os.path.basename(os.path.normpath(image)) != "image" or not shared:
        sys.exit(
            f"bench: {image} lacks {', '.join(missing)} and cannot be built here "
            "(give --image OUT/image and --shared DIR holding make-image.sh)"
        )
    out = os.path.dirname(os.path.normpath(image))
    print(
        f"bench: building the bench image under {out} with {shared}/make-image.sh (takes minutes)", flush=True
    )
    subprocess.run([os.path.join(shared, "make-image.sh"), out], check=True)


def probe_drivers(env: Env, work: str, fstype: str) -> dict[str, str]:
    """Ask graphdriver itself which drivers work on a fresh loop filesystem of ``fstype``."""
    probe_dir = os.path.join(work, f"probe-{fstype}")
    shutil.rmtree(probe_dir, ignore_errors=True)
    os.makedirs(probe_dir)
    try:
        with LoopFs(probe_dir, fstype, size="2G") as fs:
            argv = [
                env.python,
                "-m",
                "graphdriver",
                "--root",
                os.path.join(fs.mnt, "gd"),
                "--json",
                "drivers",
            ]
            try:
                data = json.loads(run(argv, env=env.gd_env(), capture=True))
            except (StepError, ValueError) as exc:
                why = f"graphdriver drivers failed: {str(exc).strip().splitlines()[-1]}"
                return {f"driver:{n}@{fstype}": why for n in ("vfs", "overlay2", "btrfs", "fuse-overlayfs")}
    except StepError as exc:
        why = f"cannot make a loop {fstype}: {str(exc).strip().splitlines()[-1]}"
        return {f"driver:{n}@{fstype}": why for n in ("vfs", "overlay2", "btrfs", "fuse-overlayfs")}
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    return {f"driver:{d['name']}@{fstype}": "ok" if d["supported"] else d["reason"] for d in data["drivers"]}


def _match(spec: str, group: Group, sc: Scenario) -> bool:
    return any(s in (group.name, sc.tool, f"{group.name}:{sc.tool}") for s in spec.split(",") if s)


def selected(all_groups: list[Group], only: str, skip: str, quick: bool) -> list[Group]:
    out = []
    for g in all_groups:
        if quick and not only and not g.quick:
            continue
        scs = [
            sc
            for sc in g.scenarios
            if (not only or _match(only, g, sc)) and not (skip and _match(skip, g, sc))
        ]
        if scs:
            out.append(Group(g.name, g.description, g.reports, scs, g.quick))
    return out


def run_one(env: Env, sc: Scenario, rundir: str, first: bool) -> tuple[Sample, dict[str, str]]:
    """One scenario on a fresh filesystem; its timings are charged to (report, tool) keys."""
    shutil.rmtree(rundir, ignore_errors=True)
    scratch = os.path.join(rundir, "scratch")
    os.makedirs(scratch)
    subprocess.run(["sync"], check=False)
    commands: dict[str, str] = {}
    sample = Sample()
    try:
        with LoopFs(rundir, sc.fstype) as fs:
            ws = Workspace(env=env, fs=fs, scratch=scratch, first=first, sample=sample)
            try:
                if sc.setup:
                    sc.setup(ws)
                subprocess.run(["sync"], check=False)  # the setup's writeback is not the steps' cost
                for step in sc.steps(ws):
                    t = timed(step.argv, env=env.gd_env() if step.gd else None, stdout_path=step.stdout)
                    sample.charge(f"{step.report}\t{step.tool or sc.tool}", step.name, t)
                    commands[step.name] = " ".join(step.argv)
                if first and sc.verify:
                    sample.extra["verify"] = sc.verify(ws)
            finally:
                if sc.teardown:
                    try:
                        sc.teardown(ws)
                    except StepError as exc:
                        print(f"bench: teardown of {sc.tool} failed: {exc}", file=sys.stderr)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    return sample, commands


def versions() -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
        except OSError:
            return "n/a"
        return out.strip().splitlines()[0] if out.strip() else "n/a"

    cpu = "n/a"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "n/a")
    except OSError:
        pass
    deb = {
        p: first_line(["dpkg-query", "-W", "-f", "${Version}", p])
        for p in ("containers-storage", "umoci", "skopeo", "tar", "libarchive-tools", "fuse-overlayfs")
    }
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "ncpu": str(os.cpu_count()),
        "python": sys.version.split()[0],
        "graphdriver": first_line(["git", "-C", REPO, "describe", "--always", "--dirty"]),
        **{f"deb:{k}": v for k, v in deb.items()},
    }


def footprint_table(plan: list[tuple[Group, Scenario]], samples: dict[tuple[str, str], list[Sample]]) -> str:
    lines = ["| what | tool | disk used | inodes used |", "|---|---|---:|---:|"]
    for g, sc in plan:
        runs = samples.get((g.name, sc.tool), [])
        labels = sorted({k for s in runs for k in s.extra if k.startswith("footprint:")})
        for label in labels:
            vals = [s.extra[label] for s in runs if label in s.extra]
            b = statistics.median(v["bytes"] for v in vals)
            i = statistics.median(v["inodes"] for v in vals)
            lines.append(
                f"| {label.split(':', 1)[1]} ({g.name}) | {sc.tool} | {b / 2**20:.1f} MiB | {i:,.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--image",
        default=os.path.join(DEFAULT_OUT, "image"),
        help="dir with layer{1,2,3}.tar[.gz] and oci/ (default %(default)s; built if missing)",
    )
    ap.add_argument(
        "--shared",
        default=default_shared(),
        help="dir with make-image.sh and treecmp.py (default %(default)s)",
    )
    ap.add_argument(
        "--runs", type=int, default=None, help="runs per group and tool (default 5; 1 with --quick)"
    )
    ap.add_argument("--quick", action="store_true", help="a sanity pass: 1 run, fewer groups")
    ap.add_argument(
        "--out", default=os.path.join(HERE, "results"), help="results dir (default bench/results)"
    )
    ap.add_argument(
        "--work",
        default="/var/tmp/graphdriver-bench",
        help="scratch dir for loop images and the generated inputs, not on tmpfs (default %(default)s)",
    )
    ap.add_argument("--only", default="", help="comma list of GROUP, TOOL or GROUP:TOOL to run")
    ap.add_argument("--skip", default="", help="comma list of GROUP, TOOL or GROUP:TOOL to leave out")
    ap.add_argument("--list", action="store_true", help="list groups, operations and tools, then exit")
    args = ap.parse_args(argv)
    runs = args.runs if args.runs is not None else (QUICK_RUNS if args.quick else 5)

    sel = selected(groups(), args.only, args.skip, args.quick)
    if args.list:
        for g in sel:
            print(f"{g.name}: {g.description}{' (quick)' if g.quick else ''}")
            for r in g.reports:
                print(f"  row {r.name}: {r.description} (peers {', '.join(r.baselines)})")
            for sc in g.scenarios:
                print(f"  {g.name}:{sc.tool}{'' if sc.fstype == 'ext4' else ' on ' + sc.fstype}  {sc.note}")
        return 0
    if os.geteuid() != 0:
        sys.exit("bench: needs root (loop mounts, mkfs, chown)")
    # stop cleanly (unmounting what the current run mounted) on Ctrl-C and on kill, also when
    # started in the background, where the shell leaves SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    image = os.path.abspath(args.image)
    ensure_image(image, args.shared)
    expected = os.path.join(os.path.dirname(image), "src", "rootfs-l3")
    os.makedirs(args.work, exist_ok=True)
    env = Env(
        image=image,
        expected=expected if os.path.isdir(expected) else None,
        shared=os.path.abspath(args.shared) if args.shared else None,
    )
    wanted = {g.name for g in sel}
    env.inputs = ensure_inputs(
        args.work, tuple(n for n in ("deep", "wide") if any(w.startswith(n) for w in wanted))
    )
    # byte-compile the package, as pip does on install: a checkout run with PYTHONDONTWRITEBYTECODE
    # would otherwise compile every module in every timed process
    run([env.python, "-m", "compileall", "-q", os.path.join(REPO, "src", "graphdriver")], env=env.gd_env())
    env.probe = probe_tools()
    for fstype in sorted({sc.fstype for g in sel for sc in g.scenarios}):
        if fstype == "ext4" or env.probe.get(f"tool:mkfs.{fstype}") == "ok":
            env.probe.update(probe_drivers(env, args.work, fstype))

    skipped: dict[tuple[str, str], str] = {}
    plan: list[tuple[Group, Scenario]] = []
    for g in sel:
        for sc in g.scenarios:
            missing = [f"{n}: {env.probe.get(n, 'unknown')}" for n in sc.needs if env.probe.get(n) != "ok"]
            if missing:
                skipped[(g.name, sc.tool)] = "; ".join(missing)
            else:
                plan.append((g, sc))
    for (gname, tool), why in skipped.items():
        print(f"bench: skipping {gname}:{tool}: {why}", flush=True)
    if env.probe.get("tool:time") != "ok":
        print(f"bench: no peak RSS figures: {env.probe.get('tool:time')}", flush=True)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    samples: dict[tuple[str, str], list[Sample]] = {}
    commands: dict[str, dict[str, str]] = {}
    failed: dict[tuple[str, str], str] = {}
    started = time.time()
    for i in range(runs):
        for g, sc in plan:
            if (g.name, sc.tool) in failed:
                continue
            rundir = os.path.join(args.work, f"{g.name}-{sc.tool}".replace("@", "_"))
            try:
                sample, cmds = run_one(env, sc, rundir, first=(i == 0))
            except StepError as exc:
                failed[(g.name, sc.tool)] = str(exc).strip().splitlines()[-1][:200]
                print(f"[run {i + 1}/{runs}] {g.name:<14} {sc.tool:<22} FAILED: {exc}", flush=True)
                continue
            samples.setdefault((g.name, sc.tool), []).append(sample)
            commands[f"{g.name}:{sc.tool}"] = cmds
            shown = " ".join(f"{k.split(chr(9))[0]}={secs(v.value)}" for k, v in sample.reports.items())
            verdict = f"  [{sample.extra['verify']}]" if "verify" in sample.extra else ""
            print(f"[run {i + 1}/{runs}] {g.name:<14} {sc.tool:<22} {shown}{verdict}", flush=True)

    rows: list[Row] = []
    baselines = {r.name: r.baselines for g in sel for r in g.reports}
    for g in sel:
        notes = {sc.tool: sc.note for sc in g.scenarios}
        for (gname, tool), why in {**skipped, **failed}.items():
            if gname == g.name:
                notes[tool] = ("FAILED: " if (gname, tool) in failed else "skipped: ") + why
        for n, r in enumerate(g.reports):
            timings: dict[str, list[Timing]] = {}
            for sc in g.scenarios:
                for s in samples.get((g.name, sc.tool), []):
                    for key, t in s.reports.items():
                        report, tool = key.split("\t")
                        if report == r.name:
                            timings.setdefault(tool, []).append(t)
            rows += summarize(r.name, r.baselines, timings, notes if n == 0 else {})  # notes once a group
    table = markdown(rows, baselines)
    verify_lines = [
        f"- verify {g}:{tool}: {runs_[0].extra['verify']}"
        for (g, tool), runs_ in samples.items()
        if runs_ and "verify" in runs_[0].extra
    ]
    not_run = [
        f"- {g}:{tool}: {('FAILED: ' if (g, tool) in failed else 'skipped: ') + why}"
        for (g, tool), why in {**skipped, **failed}.items()
    ]
    vers = versions()
    cmdline = "sudo python3 bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        f"# graphdriver bench {stamp}\n\n`{cmdline.strip()}`: {runs} run(s) per tool, interleaved, each on a "
        f"fresh loop-mounted filesystem (ext4 unless the tool says @xfs/@btrfs). Median, min-max, median "
        f"user/sys CPU and peak RSS of the operation's processes; ratio = median / the peer's median in this "
        f"run. Rows marked * are library calls timed inside the process (bench/gd_lib.py); the others are "
        f"whole processes, interpreter start-up included (see the startup rows).\n\n"
        f"kernel {vers['kernel']}, {vers['ncpu']} CPU ({vers['cpu']}), python {vers['python']}, "
        f"graphdriver {vers['graphdriver']}, containers-storage {vers['deb:containers-storage']}, "
        f"umoci {vers['deb:umoci']}, GNU tar {vers['deb:tar']}\n"
    )
    descr = "\n".join(f"- **{r.name}** ({g.name}): {r.description}" for g in sel for r in g.reports)
    extras = sorted(
        {
            f"- {g}:{tool} {k} = {v}"
            for (g, tool), runs_ in samples.items()
            if runs_
            for k, v in runs_[0].extra.items()
            if k.endswith("-bytes")
        }
    )
    md = "\n".join(
        [
            header,
            descr,
            "",
            table,
            "",
            "Disk and inodes in use after the step (statvfs, minus mkfs):",
            "",
            footprint_table(plan, samples),
            "",
            *verify_lines,
            *extras,
            *([""] if not_run else []),
            *not_run,
            "",
        ]
    )
    os.makedirs(args.out, exist_ok=True)
    md_path = os.path.join(args.out, f"{stamp}.md")
    json_path = os.path.join(args.out, f"{stamp}.json")
    with open(md_path, "w") as f:
        f.write(md)
    with open(json_path, "w") as f:
        json.dump(
            {
                "stamp": stamp,
                "command": cmdline,
                "runs": runs,
                "image": image,
                "elapsed_s": time.time() - started,
                "versions": vers,
                "probe": env.probe,
                "reports": [
                    {"group": g.name, "name": r.name, "description": r.description, "peers": r.baselines}
                    for g in sel
                    for r in g.reports
                ],
                "rows": [r.__dict__ for r in rows],
                "samples": {
                    f"{g}:{tool}": [s.to_json() for s in runs_] for (g, tool), runs_ in samples.items()
                },
                "commands": commands,
                "not_run": {f"{g}:{tool}": why for (g, tool), why in {**skipped, **failed}.items()},
            },
            f,
            indent=1,
        )
    print()
    print(md)
    print(f"wrote {md_path} and {json_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
