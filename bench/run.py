#!/usr/bin/env python3
"""Benchmark graphdriver against GNU tar and the peers on the three-layer bench image.

  python3 bench/run.py [--image DIR] [--shared DIR] [--runs N] [--out DIR] [--only OP[:TOOL],...]

Every (run, operation, tool) gets a fresh loop-mounted ext4 (sparse image file, mkfs, mount -o
loop; always torn down). Runs are interleaved: run 1 of every operation and tool, then run 2...
Each timed step is its own process, measured with os.wait4 (wall, user, sys, peak RSS). The
report gives, per operation and tool, the median wall time, its min-max, median CPU times and
peak RSS, and the ratio of the median to the operation's baseline tool, all from this run.

Writes ``<out>/<stamp>.md`` and ``<out>/<stamp>.json`` and prints the Markdown table. Needs
root (loop mounts). The operations and tools are listed in bench/operations.py.

The image is the one ``make-image.sh`` builds (``../shared/bench`` from a clone of the
repository): by default ``/var/tmp/gd-bench/image``, built there first if it is missing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

from harness import ZERO, LoopFs, Row, Sample, StepError, markdown, run, summarize, timed
from operations import HERE, REPO, Env, Operation, Scenario, Workspace, operations, probe_tools

DEFAULT_OUT = "/var/tmp/gd-bench"


def default_shared() -> str | None:
    for candidate in (os.path.join(REPO, "..", "shared", "bench"), "/work/shared/bench"):
        if os.path.isfile(os.path.join(candidate, "make-image.sh")):
            return os.path.abspath(candidate)
    return None


def ensure_image(image: str, shared: str | None) -> None:
    missing = [p for p in ("layer1.tar", "layer2.tar", "layer3.tar", "layer1.tar.gz") if
               not os.path.exists(os.path.join(image, p))]
    if not missing:
        return
    if os.path.basename(os.path.normpath(image)) != "image" or not shared:
        sys.exit(f"bench: {image} lacks {', '.join(missing)} and cannot be built here "
                 "(give --image OUT/image and --shared DIR holding make-image.sh)")
    out = os.path.dirname(os.path.normpath(image))
    print(f"bench: building the bench image under {out} with {shared}/make-image.sh (takes minutes)",
          flush=True)
    subprocess.run([os.path.join(shared, "make-image.sh"), out], check=True)


def probe_drivers(env: Env, work: str) -> dict[str, str]:
    """Ask graphdriver itself which drivers work on a fresh loop filesystem like the runs use."""
    probe_dir = os.path.join(work, "probe")
    shutil.rmtree(probe_dir, ignore_errors=True)
    os.makedirs(probe_dir)
    try:
        with LoopFs(probe_dir) as fs:
            root = os.path.join(fs.mnt, "gd")
            argv = [env.python, "-m", "graphdriver", "--root", root, "--json", "drivers"]
            try:
                data = json.loads(run(argv, env=env.gd_env(), capture=True))
            except (StepError, ValueError) as exc:
                reason = f"graphdriver drivers failed: {str(exc).strip().splitlines()[-1]}"
                return {f"driver:{n}": reason for n in ("vfs", "overlay", "overlay2")}
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    return {f"driver:{d['name']}": "ok" if d["supported"] else d["reason"] for d in data["drivers"]}


def selected(ops: list[Operation], only: str, skip: str) -> list[Operation]:
    def match(spec: str, op: Operation, sc: Scenario) -> bool:
        return any(s in (op.name, f"{op.name}:{sc.tool}", sc.tool) for s in spec.split(",") if s)

    out = []
    for op in ops:
        scs = [sc for sc in op.scenarios if (not only or match(only, op, sc)) and not match(skip, op, sc)]
        if scs:
            out.append(Operation(op.name, op.description, op.baseline, scs))
    return out


def run_one(env: Env, op: Operation, sc: Scenario, rundir: str, first: bool) -> tuple[Sample, dict[str, str]]:
    shutil.rmtree(rundir, ignore_errors=True)
    scratch = os.path.join(rundir, "scratch")
    os.makedirs(scratch)
    subprocess.run(["sync"], check=False)
    commands: dict[str, str] = {}
    try:
        with LoopFs(rundir) as fs:
            ws = Workspace(env=env, fs=fs, scratch=scratch, first=first)
            try:
                if sc.setup:
                    sc.setup(ws)
                    subprocess.run(["sync"], check=False)  # the setup's writeback is not the step's cost
                sample = Sample(total=ZERO)
                for name, argv in sc.steps(ws):
                    t = timed(argv, env=env.gd_env() if sc.uses_gd else None)
                    sample.steps[name] = t
                    sample.total = sample.total + t
                    commands[name] = " ".join(argv)
                if first and sc.verify:
                    sample.extra["verify"] = sc.verify(ws)
            finally:
                if sc.teardown:
                    try:
                        sc.teardown(ws)
                    except StepError as exc:
                        print(f"bench: teardown of {op.name}/{sc.tool} failed: {exc}", file=sys.stderr)
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
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "ncpu": str(os.cpu_count()),
        "python": sys.version.split()[0],
        "gnutar": first_line(["tar", "--version"]),
        "containers-storage": first_line(["dpkg-query", "-W", "-f", "${Version}", "containers-storage"]),
        "graphdriver": first_line(["git", "-C", REPO, "describe", "--always", "--dirty"]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default=os.path.join(DEFAULT_OUT, "image"),
                    help="dir with layer{1,2,3}.tar[.gz] (default %(default)s; built if missing)")
    ap.add_argument("--shared", default=default_shared(),
                    help="dir with make-image.sh and treecmp.py (default %(default)s)")
    ap.add_argument("--runs", type=int, default=5, help="runs per operation and tool (default %(default)s)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"),
                    help="results dir (default bench/results)")
    ap.add_argument("--work", default="/var/tmp/graphdriver-bench",
                    help="scratch dir for the loop images, not on tmpfs (default %(default)s)")
    ap.add_argument("--fs", default="ext4", choices=("ext4", "xfs", "btrfs"), help="loop filesystem")
    ap.add_argument("--only", default="", help="comma list of OP, TOOL or OP:TOOL to run")
    ap.add_argument("--skip", default="", help="comma list of OP, TOOL or OP:TOOL to leave out")
    ap.add_argument("--list", action="store_true", help="list operations and tools, then exit")
    args = ap.parse_args(argv)

    ops = selected(operations(), args.only, args.skip)
    if args.list:
        for op in ops:
            print(f"{op.name}: {op.description} (baseline {op.baseline})")
            for sc in op.scenarios:
                print(f"  {op.name}:{sc.tool}  {sc.note}")
        return 0
    if os.geteuid() != 0:
        sys.exit("bench: needs root (loop mounts, mkfs, chown)")
    image = os.path.abspath(args.image)
    ensure_image(image, args.shared)
    expected = os.path.join(os.path.dirname(image), "src", "rootfs-l3")
    env = Env(image=image, expected=expected if os.path.isdir(expected) else None,
              shared=os.path.abspath(args.shared) if args.shared else None)
    os.makedirs(args.work, exist_ok=True)
    env.probe = {**probe_tools(), **probe_drivers(env, args.work)}

    skipped: dict[tuple[str, str], str] = {}
    plan: list[tuple[Operation, Scenario]] = []
    for op in ops:
        for sc in op.scenarios:
            missing = [env.probe.get(n, "unknown") for n in sc.needs if env.probe.get(n) != "ok"]
            if missing:
                skipped[(op.name, sc.tool)] = "; ".join(missing)
            else:
                plan.append((op, sc))
    for (op_name, tool), why in skipped.items():
        print(f"bench: skipping {op_name}:{tool}: {why}", flush=True)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    samples: dict[str, dict[str, list[Sample]]] = {op.name: {} for op in ops}
    commands: dict[str, dict[str, dict[str, str]]] = {}
    failed: dict[tuple[str, str], str] = {}
    started = time.time()
    for i in range(args.runs):
        for op, sc in plan:
            if (op.name, sc.tool) in failed:
                continue
            rundir = os.path.join(args.work, f"{op.name}-{sc.tool}")
            try:
                sample, cmds = run_one(env, op, sc, rundir, first=(i == 0))
            except StepError as exc:
                failed[(op.name, sc.tool)] = str(exc).strip().splitlines()[-1][:200]
                print(f"[run {i + 1}/{args.runs}] {op.name:<12} {sc.tool:<16} FAILED: {exc}", flush=True)
                continue
            samples[op.name].setdefault(sc.tool, []).append(sample)
            commands.setdefault(op.name, {})[sc.tool] = cmds
            steps = " ".join(f"{k}={v.wall:.3f}" for k, v in sample.steps.items())
            verdict = f"  [{sample.extra['verify']}]" if "verify" in sample.extra else ""
            print(f"[run {i + 1}/{args.runs}] {op.name:<12} {sc.tool:<16} {sample.total.wall:8.3f} s  "
                  f"{steps}{verdict}", flush=True)

    rows: list[Row] = []
    for op in ops:
        notes = {sc.tool: sc.note for sc in op.scenarios}
        for (op_name, tool), why in {**skipped, **failed}.items():
            if op_name == op.name:
                notes[tool] = ("FAILED: " if (op_name, tool) in failed else "skipped: ") + why
        rows += summarize(op.name, op.baseline, samples[op.name], notes)
    table = markdown(rows)
    verify_lines = [f"- verify {op}:{tool}: {runs[0].extra['verify']}" for op, by_tool in samples.items()
                    for tool, runs in by_tool.items() if runs and "verify" in runs[0].extra]
    not_run = [f"- {op}:{tool}: {('FAILED: ' if (op, tool) in failed else 'skipped: ') + why}"
               for (op, tool), why in {**skipped, **failed}.items()]
    vers = versions()
    header = (f"# graphdriver bench {stamp}\n\n{args.runs} runs per tool, interleaved, each on a fresh "
              f"loop-mounted {args.fs}; image {image}; median wall, min-max, median CPU and peak RSS "
              f"per operation (sum of its timed processes); ratio = median / baseline median.\n\n"
              f"kernel {vers['kernel']}, {vers['ncpu']} CPU ({vers['cpu']}), python {vers['python']}, "
              f"graphdriver {vers['graphdriver']}\n")
    descr = "\n".join(f"- **{op.name}** (baseline {op.baseline}): {op.description}" for op in ops)
    md = "\n".join([header, descr, "", table, "", *verify_lines, *([""] if not_run else []), *not_run, ""])
    os.makedirs(args.out, exist_ok=True)
    md_path = os.path.join(args.out, f"{stamp}.md")
    json_path = os.path.join(args.out, f"{stamp}.json")
    with open(md_path, "w") as f:
        f.write(md)
    with open(json_path, "w") as f:
        json.dump({
            "stamp": stamp, "runs": args.runs, "fs": args.fs, "image": image,
            "elapsed_s": time.time() - started, "versions": vers, "probe": env.probe,
            "operations": [{"name": op.name, "description": op.description, "baseline": op.baseline}
                           for op in ops],
            "rows": [r.__dict__ for r in rows],
            "samples": {op: {tool: [s.to_json() for s in runs] for tool, runs in by_tool.items()}
                        for op, by_tool in samples.items()},
            "commands": commands,
            "not_run": {f"{op}:{tool}": why for (op, tool), why in {**skipped, **failed}.items()},
        }, f, indent=1)
    print()
    print(md)
    print(f"wrote {md_path} and {json_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
