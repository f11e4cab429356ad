"""What the benchmark measures: groups of scenarios, one per tool, whose timed steps are charged
to named operations (the rows of the report).

A :class:`Group` shares one kind of setup and lists the :class:`Report` rows it produces (each with
the peer tools its ratios are computed against). A :class:`Scenario` is one tool's way through it:

- ``fstype``: the loop filesystem it runs on (a fresh one per run);
- ``setup(ws)``: untimed preparation (e.g. apply the image first), followed by a ``sync``;
- ``steps(ws)``: a generator of :class:`Step` (argv + the operation it is charged to). Each step
  is its own process, timed by the harness; the generator resumes after the step ran, so it can
  do untimed work in between (write 10 files into a mounted container, read a mount point);
- ``teardown(ws)``: before the filesystem is unmounted (``cleanup``, ``shutdown -f``);
- ``needs``: probe keys (``tool:umoci``, ``driver:btrfs@btrfs``) that must be "ok", else the
  tool is skipped with the reason.

Tool names: ``gnutar``, ``bsdtar``, ``umoci``; ``cs-<driver>`` is containers-storage;
``gd-cli-<driver>`` is the graphdriver command (one fresh interpreter per step, as a user runs
it); ``gd-lib-<driver>`` is the library through bench/gd_lib.py, reporting the time of the
library call alone; ``gd-store-<driver>`` is the layer store's import (digests, tar-split,
syncfs). ``@xfs``/``@btrfs`` suffixes name a filesystem other than ext4.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from harness import LoopFs, Sample, run
from inputs import deep_layers, wide_layer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


@dataclass
class Env:
    """Inputs shared by every run: the images, the expected root filesystem, where tools are."""

    image: str
    expected: str | None
    shared: str | None
    inputs: str = ""
    python: str = sys.executable
    probe: dict[str, str] = field(default_factory=dict)
    """key -> "ok" or the reason it is unavailable (``driver:overlay2@ext4``, ``tool:umoci``)."""

    def layers(self, gz: bool) -> list[str]:
        suffix = ".tar.gz" if gz else ".tar"
        return [os.path.join(self.image, f"layer{i}{suffix}") for i in (1, 2, 3)]

    def gd_env(self) -> dict[str, str]:
        """The environment of graphdriver processes: no GRAPHDRIVER_* settings, this checkout's
        src/ first, and byte code allowed (run.py compiles it first, as an installed package is)."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("GRAPHDRIVER_") and k != "PYTHONDONTWRITEBYTECODE"
        }
        src = os.path.join(REPO, "src")
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env


@dataclass
class Step:
    """One timed process. ``report`` is the operation row it is charged to; ``tool`` overrides
    the scenario's tool name for that row (e.g. the naive diff of the same layer)."""

    name: str
    argv: list[str]
    report: str
    tool: str | None = None
    stdout: str | None = None
    gd: bool = False


@dataclass
class Workspace:
    """One scenario's run: a fresh loop-mounted filesystem plus a scratch dir outside it."""

    env: Env
    fs: LoopFs
    scratch: str
    first: bool
    sample: Sample

    @property
    def gd_root(self) -> str:
        return os.path.join(self.fs.mnt, "graphdriver")

    def gd(self, driver: str, *args: str) -> list[str]:
        """The graphdriver CLI, as a user runs it (a fresh interpreter per command)."""
        return [self.env.python, "-m", "graphdriver", "--root", self.gd_root, "--driver", driver, *args]

    def lib(self, driver: str, *args: str, opts: tuple[str, ...] = ()) -> list[str]:
        """The library through bench/gd_lib.py (reports the library call's own time)."""
        return [
            self.env.python,
            os.path.join(HERE, "gd_lib.py"),
            "--root",
            self.gd_root,
            "--driver",
            driver,
            *(f"--opt={o}" for o in opts),
            *args,
        ]

    def cs(self, driver: str, *args: str) -> list[str]:
        return [
            "containers-storage",
            "-g",
            os.path.join(self.fs.mnt, "cs"),
            "-R",
            os.path.join(self.scratch, "runroot"),
            "-s",
            driver,
            *args,
        ]

    def footprint(self, label: str) -> None:
        """Record the bytes and inodes used on the filesystem since mkfs, as ``footprint:label``."""
        used, inodes = self.fs.used()
        self.sample.extra[f"footprint:{label}"] = {"bytes": used, "inodes": inodes}

    def scratch_file(self, name: str) -> str:
        return os.path.join(self.scratch, name)


StepGen = Iterator[Step]


@dataclass
class Scenario:
    tool: str
    steps: Callable[[Workspace], StepGen]
    fstype: str = "ext4"
    setup: Callable[[Workspace], None] | None = None
    verify: Callable[[Workspace], str] | None = None
    teardown: Callable[[Workspace], None] | None = None
    needs: tuple[str, ...] = ()
    note: str = ""


@dataclass
class Report:
    name: str
    description: str
    baselines: tuple[str, ...]


@dataclass
class Group:
    name: str
    description: str
    reports: list[Report]
    scenarios: list[Scenario]
    quick: bool = False
    """part of ``--quick``"""


# -- verification and teardown -------------------------------------------------------------------


def treecmp(ws: Workspace, actual: str) -> str:
    """The shared treecmp.py verdict line for ``actual`` against the expected final rootfs."""
    if not ws.env.expected or not ws.env.shared:
        return "not verified (no expected rootfs)"
    import subprocess

    proc = subprocess.run(
        [ws.env.python, os.path.join(ws.env.shared, "treecmp.py"), ws.env.expected, actual],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else f"treecmp failed: {proc.stderr.strip()[-200:]}"


def gd_verify(driver: str, layer: str = "l3") -> Callable[[Workspace], str]:
    def verify(ws: Workspace) -> str:
        env = ws.env.gd_env()
        path = run(ws.gd(driver, "mount", layer), env=env, capture=True).strip()
        try:
            return treecmp(ws, path)
        finally:
            run(ws.gd(driver, "unmount", layer), env=env)

    return verify


def gd_teardown(driver: str) -> Callable[[Workspace], None]:
    def teardown(ws: Workspace) -> None:
        if os.path.isdir(ws.gd_root):
            run(ws.gd(driver, "cleanup"), env=ws.env.gd_env())

    return teardown


def cs_teardown(driver: str, containers: tuple[str, ...] = ()) -> Callable[[Workspace], None]:
    """Unmount the containers, then ``shutdown -f`` (bounded: with a mount count it cannot
    satisfy, containers-storage 1.43's forced shutdown loops forever, fsyncing as it goes)."""

    def teardown(ws: Workspace) -> None:
        import subprocess

        if not os.path.isdir(os.path.join(ws.fs.mnt, "cs")):
            return
        for name in containers:
            subprocess.run(ws.cs(driver, "unmount", name), capture_output=True, check=False, timeout=60)
        try:
            subprocess.run(ws.cs(driver, "shutdown", "-f"), capture_output=True, check=False, timeout=60)
        except subprocess.TimeoutExpired:
            print("bench: containers-storage shutdown -f did not finish in 60 s; killed", file=sys.stderr)

    return teardown


# -- container workloads (untimed, between steps) ----------------------------------------------------


def _candidates(root: str, skip: int, count: int) -> list[str]:
    """``count`` regular files under ``root/usr`` (sorted walk, after the first ``skip``): the
    same files on every tool, since every tool holds the same image."""
    out: list[str] = []
    seen = 0
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, "usr")):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            seen += 1
            if seen > skip:
                out.append(path)
                if len(out) == count:
                    return out
    return out


def write_changes(root: str, added: int, modified: int, deleted: int, offset: int) -> None:
    """Change ``added + modified + deleted`` files in the mounted container ``root``: new 1 KiB
    files in ``/srv/bench`` (100 per dir), appended-to existing files (a copy-up on overlay), and
    deleted ones. ``offset`` keeps a second call from touching the first call's files."""
    for i in range(added):
        d = os.path.join(root, "srv", "bench", f"d{(offset + i) // 100:03d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{offset + i:05d}"), "wb") as f:
            f.write(b"x" * 1024)
    files = _candidates(root, offset, modified + deleted)
    for path in files[:modified]:
        with open(path, "ab") as f:
            f.write(b"# bench\n")
    for path in files[modified:]:
        os.unlink(path)


# -- peers --------------------------------------------------------------------------------------------


def _tar_argv(tool: str, layer: str, dest: str) -> list[str]:
    gz = layer.endswith(".gz")
    if tool == "gnutar":
        return ["tar", "-xzf" if gz else "-xf", layer, "-C", dest]
    return ["bsdtar", "-xpf", layer, "-C", dest]


def tar_extract(tool: str, layers: Callable[[Env], list[str]], report: str) -> Scenario:
    """GNU tar or bsdtar extracting the layers in order into one directory (whiteouts stay files)."""

    def steps(ws: Workspace) -> StepGen:
        dest = os.path.join(ws.fs.mnt, "rootfs")
        os.makedirs(dest, exist_ok=True)
        for i, layer in enumerate(layers(ws.env), 1):
            yield Step(f"l{i}", _tar_argv(tool, layer, dest), report)
        ws.footprint(report)

    return Scenario(
        tool=tool,
        steps=steps,
        needs=(f"tool:{'tar' if tool == 'gnutar' else 'bsdtar'}",),
        note="floor: no whiteouts, one process per layer",
    )


def cs_import(driver: str, layers: Callable[[Env], list[str]], report: str, fstype: str = "ext4") -> Scenario:
    """containers-storage ``import-layer`` of each layer on the previous one."""

    def steps(ws: Workspace) -> StepGen:
        parent = ""
        for i, layer in enumerate(layers(ws.env), 1):
            yield Step(
                f"l{i}",
                ws.cs(driver, "import-layer", "-f", layer, "--id", f"l{i}", *([parent] if parent else [])),
                report,
            )
            parent = f"l{i}"
        ws.footprint(report)

    return Scenario(
        tool=f"cs-{driver}",
        steps=steps,
        fstype=fstype,
        teardown=cs_teardown(driver),
        needs=("tool:containers-storage",),
        note="import-layer per layer",
    )


def _cs_import_setup(driver: str, layers: Callable[[Env], list[str]]) -> Callable[[Workspace], None]:
    def setup(ws: Workspace) -> None:
        parent = ""
        for i, layer in enumerate(layers(ws.env), 1):
            run(ws.cs(driver, "import-layer", "-f", layer, "--id", f"l{i}", *([parent] if parent else [])))
            parent = f"l{i}"
        run(ws.cs(driver, "create-image", "--id", "img", parent))
        ws.footprint("import")

    return setup


def _policy(ws: Workspace) -> str:
    path = ws.scratch_file("policy.json")
    with open(path, "w") as f:
        json.dump({"default": [{"type": "insecureAcceptAnything"}]}, f)
    return path


def skopeo_cs_import(oci: Callable[[Env], str], ref: str, report: str, rmi: str | None) -> Scenario:
    """skopeo copying the OCI layout into containers-storage (overlay), then ``delete-image``."""

    def steps(ws: Workspace) -> StepGen:
        graph, runroot = os.path.join(ws.fs.mnt, "cs"), ws.scratch_file("runroot")
        dest = f"containers-storage:[overlay@{graph}+{runroot}]localhost/bench:{ref}"
        yield Step(
            "import",
            ["skopeo", "--policy", _policy(ws), "copy", "-q", f"oci:{oci(ws.env)}:{ref}", dest],
            report,
        )
        ws.footprint(report)
        if rmi:
            yield Step("rmi", ws.cs("overlay", "delete-image", f"localhost/bench:{ref}"), rmi)

    return Scenario(
        tool="cs-overlay",
        steps=steps,
        teardown=cs_teardown("overlay"),
        needs=("tool:skopeo", "tool:containers-storage"),
        note="skopeo copy oci:... containers-storage:...; delete-image",
    )


def umoci_unpack(oci: Callable[[Env], str], ref: str, report: str) -> Scenario:
    def steps(ws: Workspace) -> StepGen:
        yield Step(
            "unpack",
            ["umoci", "unpack", "--image", f"{oci(ws.env)}:{ref}", os.path.join(ws.fs.mnt, "bundle")],
            report,
        )
        ws.footprint(report)

    return Scenario(
        tool="umoci",
        steps=steps,
        needs=("tool:umoci",),
        note="umoci unpack (one rootfs; also writes an mtree manifest)",
    )


# -- graphdriver -----------------------------------------------------------------------------------


_APPLY_MODES = {
    "lib": ("apply", "create + apply_diff per layer, one process"),
    "store": ("store-import", "LayerStore.import_layer per layer (digests, tar-split, syncfs)"),
    "stack": ("store-import-stack", "LayerStore.import_layers: the layers applied in parallel processes"),
}


def gd_lib_apply(
    driver: str,
    layers: Callable[[Env], list[str]],
    report: str,
    *,
    fstype: str = "ext4",
    mode: str = "lib",
    verify: bool = True,
) -> Scenario:
    """The library applying the layers in one process: driver create + apply_diff (``lib``), the
    layer store's import_layer per layer (``store``) or its import_layers of the stack (``stack``)."""
    command, note = _APPLY_MODES[mode]

    def steps(ws: Workspace) -> StepGen:
        yield Step("chain", ws.lib(driver, command, *layers(ws.env)), report, gd=True)
        ws.footprint(report)

    return Scenario(
        tool=f"gd-{mode}-{driver}",
        steps=steps,
        fstype=fstype,
        verify=gd_verify(driver) if verify and mode == "lib" else None,
        teardown=gd_teardown(driver),
        needs=(f"driver:{driver}@{fstype}",),
        note=note,
    )


def gd_cli_apply(driver: str, layers: Callable[[Env], list[str]], report: str) -> Scenario:
    """The CLI: ``create`` + ``apply-diff`` per layer, one process each."""

    def steps(ws: Workspace) -> StepGen:
        parent = ""
        for i, layer in enumerate(layers(ws.env), 1):
            create = ["create", f"l{i}"] if not parent else ["create", "--parent", parent, f"l{i}"]
            yield Step(f"create-l{i}", ws.gd(driver, *create), report, gd=True)
            yield Step(
                f"apply-l{i}",
                ws.gd(driver, "apply-diff", "--parent", parent, f"l{i}", layer),
                report,
                gd=True,
            )
            parent = f"l{i}"
        ws.footprint(report)

    return Scenario(
        tool=f"gd-cli-{driver}",
        steps=steps,
        verify=gd_verify(driver),
        teardown=gd_teardown(driver),
        needs=(f"driver:{driver}@ext4",),
        note="create + apply-diff per layer, one process each",
    )


def gd_lib_import_oci(
    oci: Callable[[Env], str], ref: str, report: str, rmi: str | None, *, serial: bool = False
) -> Scenario:
    def steps(ws: Workspace) -> StepGen:
        out = ws.scratch_file("image-id")
        yield Step(
            "import",
            ws.lib("overlay2", "import-oci", f"oci:{oci(ws.env)}:{ref}", *(["serial"] if serial else [])),
            report,
            stdout=out,
            gd=True,
        )
        ws.footprint(report)
        if rmi:
            with open(out) as f:
                image_id = next(ln for ln in f.read().splitlines() if ln and not ln.startswith("GDBENCH"))
            yield Step("rmi", ws.lib("overlay2", "rmi", image_id), rmi, gd=True)

    return Scenario(
        tool="gd-lib-overlay2-serial" if serial else "gd-lib-overlay2",
        steps=steps,
        teardown=gd_teardown("overlay2"),
        needs=("driver:overlay2@ext4",),
        note="ImageStore.import_image(parallel_apply=False), layers one by one; rmi"
        if serial
        else "ImageStore.import_image (layers in parallel where it pays); rmi",
    )


def _gd_image_setup(driver: str, layers: Callable[[Env], list[str]]) -> Callable[[Workspace], None]:
    def setup(ws: Workspace) -> None:
        run(ws.lib(driver, "apply", *layers(ws.env)), env=ws.env.gd_env())
        ws.footprint("import")

    return setup


def _mount_point(path: str) -> str:
    with open(path) as f:
        return next(ln for ln in f.read().splitlines() if ln and not ln.startswith("GDBENCH")).strip()


def _bench_layers(env: Env) -> list[str]:
    return env.layers(False)


def container(tool: str) -> Scenario:
    """A container layer on the bench image: create + mount, then changes / diff / diff-size with
    10 changed files and with 10,000, then the export of layer 2 (its diff against layer 1)."""
    kind, driver = tool.split("-", 2)[0], tool.split("-", 2)[-1]

    def gd_steps(ws: Workspace) -> StepGen:
        mp = ws.scratch_file("mountpoint")
        lib = tool.startswith("gd-lib")
        if lib:
            yield Step(
                "create-mount",
                ws.lib(driver, "create-mount", "l3", "ctr"),
                "create-mount",
                stdout=mp,
                gd=True,
            )
        else:
            yield Step("create", ws.gd(driver, "create", "--parent", "l3", "ctr"), "create-mount", gd=True)
            yield Step("mount", ws.gd(driver, "mount", "ctr"), "create-mount", stdout=mp, gd=True)
        root = _mount_point(mp)
        for n, (added, modified, deleted, offset) in (("10", (6, 3, 1, 0)), ("10k", (8990, 900, 100, 10))):
            write_changes(root, added, modified, deleted, offset)
            out = ws.scratch_file(f"ctr-{n}.tar")
            if lib:
                yield Step(f"changes-{n}", ws.lib(driver, "changes", "ctr", "l3"), f"changes-{n}", gd=True)
                yield Step(f"diff-{n}", ws.lib(driver, "diff", "ctr", "l3", out), f"diff-{n}", gd=True)
                yield Step(
                    f"diffsize-{n}", ws.lib(driver, "diff-size", "ctr", "l3"), f"diffsize-{n}", gd=True
                )
                naive = ("native_diff=false",)
                yield Step(
                    f"changes-{n}-naive",
                    ws.lib(driver, "changes", "ctr", "l3", opts=naive),
                    f"changes-{n}",
                    tool=f"{tool}-naive",
                    gd=True,
                )
                yield Step(
                    f"diff-{n}-naive",
                    ws.lib(driver, "diff", "ctr", "l3", out, opts=naive),
                    f"diff-{n}",
                    tool=f"{tool}-naive",
                    gd=True,
                )
            else:
                yield Step(
                    f"changes-{n}", ws.gd(driver, "changes", "--parent", "l3", "ctr"), f"changes-{n}", gd=True
                )
                yield Step(
                    f"diff-{n}",
                    ws.gd(driver, "diff", "--parent", "l3", "-o", out, "ctr"),
                    f"diff-{n}",
                    gd=True,
                )
                yield Step(
                    f"diffsize-{n}",
                    ws.gd(driver, "diff-size", "--parent", "l3", "ctr"),
                    f"diffsize-{n}",
                    gd=True,
                )
            ws.sample.extra[f"diff-{n}-bytes"] = os.path.getsize(out)
        ws.footprint("container-10k")
        out = ws.scratch_file("l2.tar")
        if lib:
            yield Step("export-l2", ws.lib(driver, "diff", "l2", "l1", out), "export-l2", gd=True)
        else:
            yield Step(
                "export-l2", ws.gd(driver, "diff", "--parent", "l1", "-o", out, "l2"), "export-l2", gd=True
            )
        ws.sample.extra["export-l2-bytes"] = os.path.getsize(out)

    def cs_steps(ws: Workspace) -> StepGen:
        mp = ws.scratch_file("mountpoint")
        yield Step("create", ws.cs(driver, "create-container", "--id", "ctr", "img"), "create-mount")
        yield Step("mount", ws.cs(driver, "mount", "ctr"), "create-mount", stdout=mp)
        root = _mount_point(mp)
        layer = json.loads(run(ws.cs(driver, "container", "--json", "ctr"), capture=True))[0]["layer"]
        for n, (added, modified, deleted, offset) in (("10", (6, 3, 1, 0)), ("10k", (8990, 900, 100, 10))):
            write_changes(root, added, modified, deleted, offset)
            out = ws.scratch_file(f"ctr-{n}.tar")
            yield Step(f"changes-{n}", ws.cs(driver, "changes", layer), f"changes-{n}")
            yield Step(f"diff-{n}", ws.cs(driver, "diff", "-u", "-f", out, layer), f"diff-{n}")
            yield Step(f"diffsize-{n}", ws.cs(driver, "diffsize", layer), f"diffsize-{n}")
            ws.sample.extra[f"diff-{n}-bytes"] = os.path.getsize(out)
        ws.footprint("container-10k")
        out = ws.scratch_file("l2.tar")
        yield Step("export-l2", ws.cs(driver, "diff", "-u", "-f", out, "l2"), "export-l2")
        ws.sample.extra["export-l2-bytes"] = os.path.getsize(out)

    if kind == "cs":
        return Scenario(
            tool=tool,
            steps=cs_steps,
            setup=_cs_import_setup(driver, _bench_layers),
            teardown=cs_teardown(driver, ("ctr",)),
            needs=("tool:containers-storage",),
            note="create-container img; mount; changes/diff/diffsize LAYER; diff l2",
        )
    note = (
        "gd_lib.py: library calls (changes/diff also with native_diff=false: the naive rows)"
        if tool.startswith("gd-lib")
        else "graphdriver create/mount/changes/diff/diff-size, a process each"
    )
    return Scenario(
        tool=tool,
        steps=gd_steps,
        setup=_gd_image_setup(driver, _bench_layers),
        teardown=gd_teardown(driver),
        needs=(f"driver:{driver}@ext4",),
        note=note,
    )


def child(driver: str, fstype: str) -> Scenario:
    """Create a child of the bench image's top layer (the container layer), with its disk use."""
    cs = driver.startswith("cs-")
    name = driver.removeprefix("cs-")
    tool = (driver if cs else f"gd-cli-{driver}") + ("" if fstype == "ext4" else f"@{fstype}")

    def steps(ws: Workspace) -> StepGen:
        before = ws.fs.used()
        if cs:
            yield Step("create", ws.cs(name, "create-container", "--id", "ctr", "img"), "child-create")
        else:
            yield Step("create", ws.gd(name, "create", "--parent", "l3", "ctr"), "child-create", gd=True)
        after = ws.fs.used()
        ws.sample.extra["footprint:child-create"] = {
            "bytes": after[0] - before[0],
            "inodes": after[1] - before[1],
        }

    if cs:
        return Scenario(
            tool=tool,
            steps=steps,
            fstype=fstype,
            setup=_cs_import_setup(name, _bench_layers),
            teardown=cs_teardown(name),
            needs=("tool:containers-storage",),
            note="create-container",
        )
    return Scenario(
        tool=tool,
        steps=steps,
        fstype=fstype,
        setup=_gd_image_setup(name, _bench_layers),
        teardown=gd_teardown(name),
        needs=(f"driver:{name}@{fstype}",),
        note="create --parent l3 ctr",
    )


def deep_create_mount(tool: str) -> Scenario:
    """A container on the 200-layer image: create + mount (200 lower dirs on overlay)."""

    def deep(env: Env) -> list[str]:
        return deep_layers(env.inputs)

    def gd_steps(ws: Workspace) -> StepGen:
        top = f"l{len(deep(ws.env))}"
        yield Step(
            "create", ws.gd("overlay2", "create", "--parent", top, "ctr"), "deep-create-mount", gd=True
        )
        yield Step("mount", ws.gd("overlay2", "mount", "ctr"), "deep-create-mount", gd=True)

    def cs_steps(ws: Workspace) -> StepGen:
        yield Step("create", ws.cs("overlay", "create-container", "--id", "ctr", "img"), "deep-create-mount")
        yield Step("mount", ws.cs("overlay", "mount", "ctr"), "deep-create-mount")

    if tool == "cs-overlay":
        return Scenario(
            tool=tool,
            steps=cs_steps,
            setup=_cs_import_setup("overlay", deep),
            teardown=cs_teardown("overlay", ("ctr",)),
            needs=("tool:containers-storage",),
            note="create-container; mount",
        )
    return Scenario(
        tool=tool,
        steps=gd_steps,
        setup=_gd_image_setup("overlay2", deep),
        teardown=gd_teardown("overlay2"),
        needs=("driver:overlay2@ext4",),
        note="create; mount",
    )


# -- pull from a local registry ---------------------------------------------------------------------

PULL_REF = "gz"
"""the bench image's ref pulled: gzip layers, as registries serve them"""


def _registry_dir(env: Env) -> str:
    """``<work>/inputs/registry``: a docker-registry's storage holding the bench image as
    ``bench:gz``, pushed once with skopeo from the OCI layout (untimed)."""
    from pathlib import Path

    from graphdriver.testing.registry_server import registry_server

    work = os.path.join(env.inputs, "registry")
    stamp = os.path.join(work, "pushed")
    source = f"oci:{os.path.join(env.image, 'oci')}:{PULL_REF}"
    if os.path.exists(stamp):
        with open(stamp) as f:
            if f.read().strip() == source:
                return work
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    policy = os.path.join(work, "policy.json")
    with open(policy, "w") as f:
        json.dump({"default": [{"type": "insecureAcceptAnything"}]}, f)
    with registry_server(Path(work)) as srv:
        run(["skopeo", "--policy", policy, "copy", "-q", "--dest-tls-verify=false", source,
             f"docker://{srv.host}/bench:{PULL_REF}"])
    with open(stamp, "w") as f:
        f.write(source + "\n")
    return work


def pull_scenario(tool: str) -> Scenario:
    """A pull of the bench image from a docker-registry on 127.0.0.1 (started untimed, on the
    storage :func:`_registry_dir` made): graphdriver's CLI with parallel apply on
    (``gd-cli-overlay2``) or off (``gd-cli-overlay2-serial``), or skopeo into
    containers-storage's overlay driver (``cs-overlay``)."""
    from pathlib import Path

    def steps(ws: Workspace) -> StepGen:
        from graphdriver.testing.registry_server import registry_server

        with registry_server(Path(_registry_dir(ws.env))) as srv:
            ref = f"{srv.host}/bench:{PULL_REF}"
            if tool == "cs-overlay":
                graph, runroot = os.path.join(ws.fs.mnt, "cs"), ws.scratch_file("runroot")
                dest = f"containers-storage:[overlay@{graph}+{runroot}]{ref}"
                argv = ["skopeo", "--policy", _policy(ws), "copy", "-q", "--src-tls-verify=false",
                        f"docker://{ref}", dest]
                yield Step("pull", argv, "pull")
            else:
                switch = "--no-parallel-apply" if tool.endswith("-serial") else "--parallel-apply"
                yield Step("pull", ws.gd("overlay2", "pull", "--insecure", switch, ref), "pull", gd=True)
            ws.footprint("pull")

    if tool == "cs-overlay":
        return Scenario(
            tool=tool,
            steps=steps,
            teardown=cs_teardown("overlay"),
            needs=("tool:skopeo", "tool:containers-storage", "tool:docker-registry"),
            note="skopeo copy docker://... containers-storage:[overlay@...]...",
        )
    return Scenario(
        tool=tool,
        steps=steps,
        teardown=gd_teardown("overlay2"),
        needs=("driver:overlay2@ext4", "tool:docker-registry", "tool:skopeo"),
        note="graphdriver pull --no-parallel-apply" if tool.endswith("-serial") else "graphdriver pull "
        "--parallel-apply (layers applied in forked workers as they download)",
    )


def command(tool: str, argv: list[str], note: str, gd: bool = False) -> Scenario:
    """A single command with no setup: start-up costs."""
    return Scenario(tool=tool, steps=lambda ws: iter([Step(tool, argv, "startup", gd=gd)]), note=note)


# -- the suite ---------------------------------------------------------------------------------------


def groups() -> list[Group]:
    """Every group, in report order."""
    raw = _bench_layers
    gz: Callable[[Env], list[str]] = lambda env: env.layers(True)  # noqa: E731
    oci: Callable[[Env], str] = lambda env: os.path.join(env.image, "oci")  # noqa: E731
    deep: Callable[[Env], list[str]] = lambda env: deep_layers(env.inputs)  # noqa: E731
    deep_oci: Callable[[Env], str] = lambda env: os.path.join(env.inputs, "deep", "oci")  # noqa: E731
    wide: Callable[[Env], list[str]] = lambda env: [wide_layer(env.inputs)]  # noqa: E731
    py = sys.executable
    return [
        Group(
            "startup",
            "interpreter start-up, to read the CLI rows by (site may import .pth hooks)",
            [
                Report(
                    "startup", "python3 -S -c pass / python3 -c pass / graphdriver --version", ("python-S",)
                )
            ],
            [
                command("python-S", [py, "-S", "-c", "pass"], "python3 -S -c pass (no site)"),
                command("python", [py, "-c", "pass"], "python3 -c pass"),
                command(
                    "gd-version",
                    [py, "-m", "graphdriver", "--version"],
                    "python3 -m graphdriver --version",
                    gd=True,
                ),
            ],
            quick=True,
        ),
        Group(
            "apply",
            "the bench image's three uncompressed layers applied in order",
            [
                Report(
                    "apply",
                    "layer1..3.tar of the bench image, each on the previous",
                    ("gnutar", "cs-overlay"),
                )
            ],
            [
                tar_extract("gnutar", raw, "apply"),
                tar_extract("bsdtar", raw, "apply"),
                cs_import("overlay", raw, "apply"),
                cs_import("vfs", raw, "apply"),
                gd_lib_apply("overlay2", raw, "apply"),
                gd_lib_apply("vfs", raw, "apply"),
                gd_lib_apply("overlay2", raw, "apply", mode="store"),
                gd_lib_apply("overlay2", raw, "apply", mode="stack"),
                gd_cli_apply("overlay2", raw, "apply"),
            ],
            quick=True,
        ),
        Group(
            "apply-gz",
            "the same with the gzip layers",
            [Report("apply-gz", "layer1..3.tar.gz of the bench image", ("gnutar", "cs-overlay"))],
            [
                tar_extract("gnutar", gz, "apply-gz"),
                tar_extract("bsdtar", gz, "apply-gz"),
                cs_import("overlay", gz, "apply-gz"),
                cs_import("vfs", gz, "apply-gz"),
                gd_lib_apply("overlay2", gz, "apply-gz"),
                gd_lib_apply("vfs", gz, "apply-gz"),
                gd_lib_apply("overlay2", gz, "apply-gz", mode="store"),
                gd_lib_apply("overlay2", gz, "apply-gz", mode="stack"),
            ],
        ),
        Group(
            "import",
            "the bench image imported from its OCI layout (ref raw), then removed",
            [
                Report(
                    "import-oci", "OCI layout, uncompressed layers -> stored image", ("umoci", "cs-overlay")
                ),
                Report("rmi", "remove the imported image and its layers", ("cs-overlay",)),
            ],
            [
                umoci_unpack(oci, "raw", "import-oci"),
                skopeo_cs_import(oci, "raw", "import-oci", "rmi"),
                gd_lib_import_oci(oci, "raw", "import-oci", "rmi"),
                gd_lib_import_oci(oci, "raw", "import-oci", "rmi", serial=True),
            ],
            quick=True,
        ),
        Group(
            "import-gz",
            "the same from the gzip ref",
            [Report("import-oci-gz", "OCI layout, gzip layers -> stored image", ("umoci", "cs-overlay"))],
            [
                umoci_unpack(oci, "gz", "import-oci-gz"),
                skopeo_cs_import(oci, "gz", "import-oci-gz", None),
                gd_lib_import_oci(oci, "gz", "import-oci-gz", None),
                gd_lib_import_oci(oci, "gz", "import-oci-gz", None, serial=True),
            ],
        ),
        Group(
            "pull",
            "the bench image pulled from a local docker-registry (gzip layers, 86 MB)",
            [
                Report(
                    "pull",
                    "docker-registry on 127.0.0.1 -> stored image (untimed: the registry's start)",
                    ("cs-overlay", "gd-cli-overlay2-serial"),
                )
            ],
            [
                pull_scenario("cs-overlay"),
                pull_scenario("gd-cli-overlay2"),
                pull_scenario("gd-cli-overlay2-serial"),
            ],
        ),
        Group(
            "container",
            "a container layer on the applied bench image (setup untimed)",
            [
                Report("create-mount", "create a container layer on l3 and mount it", ("cs-overlay",)),
                Report(
                    "changes-10",
                    "changes of the container after 10 changed files (6 A, 3 C, 1 D)",
                    ("cs-overlay",),
                ),
                Report("diff-10", "its diff (tar to a file)", ("cs-overlay",)),
                Report("diffsize-10", "its diff size", ("cs-overlay",)),
                Report(
                    "changes-10k",
                    "changes after 10,000 changed files (8,996 A, 903 C, 101 D)",
                    ("cs-overlay",),
                ),
                Report("diff-10k", "its diff", ("cs-overlay",)),
                Report("diffsize-10k", "its diff size", ("cs-overlay",)),
                Report("export-l2", "export layer 2 (its diff against layer 1, 119 MB tar)", ("cs-overlay",)),
            ],
            [
                container("cs-overlay"),
                container("cs-vfs"),
                container("gd-cli-overlay2"),
                container("gd-lib-overlay2"),
                container("gd-cli-vfs"),
            ],
            quick=True,
        ),
        Group(
            "child",
            "create a child of the bench image's top layer on each driver and filesystem",
            [
                Report(
                    "child-create",
                    "create of the container layer (disk use in the footprint table)",
                    ("cs-vfs",),
                )
            ],
            [
                child("cs-vfs", "ext4"),
                child("cs-vfs", "xfs"),
                child("cs-overlay", "ext4"),
                child("vfs", "ext4"),
                child("vfs", "xfs"),
                child("btrfs", "btrfs"),
                child("overlay2", "ext4"),
                child("fuse-overlayfs", "ext4"),
            ],
        ),
        Group(
            "deep",
            "the synthetic 200-layer image applied, one layer on the other",
            [
                Report(
                    "deep-apply",
                    "200 small layers (10 files each, some whiteouts and opaque dirs)",
                    ("gnutar", "cs-overlay"),
                )
            ],
            [
                tar_extract("gnutar", deep, "deep-apply"),
                cs_import("overlay", deep, "deep-apply"),
                gd_lib_apply("overlay2", deep, "deep-apply", verify=False),
                gd_lib_apply("overlay2", deep, "deep-apply", mode="stack"),
            ],
        ),
        Group(
            "deep-import",
            "the 200-layer image imported from its OCI layout",
            [
                Report(
                    "deep-import-oci", "OCI layout with 200 layers -> stored image", ("umoci", "cs-overlay")
                )
            ],
            [
                umoci_unpack(deep_oci, "raw", "deep-import-oci"),
                skopeo_cs_import(deep_oci, "raw", "deep-import-oci", None),
                gd_lib_import_oci(deep_oci, "raw", "deep-import-oci", None),
            ],
        ),
        Group(
            "deep-container",
            "a container on the 200-layer image",
            [Report("deep-create-mount", "create + mount a container on layer 200", ("cs-overlay",))],
            [deep_create_mount("cs-overlay"), deep_create_mount("gd-cli-overlay2")],
        ),
        Group(
            "wide",
            "one layer of 100,000 small files",
            [
                Report(
                    "wide-apply",
                    "one 100,000-file layer (1,000 dirs of 100 files of 0-2 KiB)",
                    ("gnutar", "cs-overlay"),
                )
            ],
            [
                tar_extract("gnutar", wide, "wide-apply"),
                tar_extract("bsdtar", wide, "wide-apply"),
                cs_import("overlay", wide, "wide-apply"),
                cs_import("vfs", wide, "wide-apply"),
                gd_lib_apply("overlay2", wide, "wide-apply", verify=False),
                gd_lib_apply("vfs", wide, "wide-apply", verify=False),
                gd_lib_apply("overlay2", wide, "wide-apply", mode="store"),
            ],
        ),
    ]


def probe_tools() -> dict[str, str]:
    """Which external tools exist (``tool:<name>`` -> "ok" or why not)."""
    packages = {
        "tar": "tar",
        "bsdtar": "libarchive-tools",
        "containers-storage": "containers-storage",
        "umoci": "umoci",
        "skopeo": "skopeo",
        "mkfs.xfs": "xfsprogs",
        "mkfs.btrfs": "btrfs-progs",
        "fuse-overlayfs": "fuse-overlayfs",
        "time": "time",
        "docker-registry": "docker-registry",
    }
    return {
        f"tool:{name}": "ok" if shutil.which(name) else f"{name} is not installed (apt-get install {pkg})"
        for name, pkg in packages.items()
    }
