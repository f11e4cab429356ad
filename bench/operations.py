"""What the benchmark measures: a table of named operations, each run by several tools.

An :class:`Operation` has a name, a description, the tool its ratios are computed against, and
one :class:`Scenario` per tool. A scenario is

- ``setup(ws)``: untimed preparation on the fresh filesystem (e.g. import the image first),
- ``steps(ws)``: the timed commands, ``(step name, argv)``; each runs as its own process and the
  operation's time is their sum (so several CLI invocations are charged their start-up),
- ``verify(ws)``: optional, first run only, returns a one-line verdict (e.g. ``treecmp``),
- ``teardown(ws)``: optional, before the filesystem is unmounted (e.g. ``cleanup``),
- ``needs``: the :class:`Probe` keys that must be available, else the tool is skipped with the
  reason.

To add an operation, append to :func:`operations`; to add a peer (bsdtar, umoci,
containers-storage vfs...), write a scenario factory next to :func:`tar_extract` and list it.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from harness import LoopFs, run

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

StepList = list[tuple[str, list[str]]]


@dataclass
class Env:
    """Inputs shared by every run: the image, the expected root filesystem, where tools are."""

    image: str
    expected: str | None
    shared: str | None
    python: str = sys.executable
    probe: dict[str, str] = field(default_factory=dict)
    """key -> "ok" or the reason it is unavailable (``driver:overlay2``, ``tool:containers-storage``)."""

    def layers(self, gz: bool) -> list[str]:
        suffix = ".tar.gz" if gz else ".tar"
        return [os.path.join(self.image, f"layer{i}{suffix}") for i in (1, 2, 3)]

    def gd_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPHDRIVER_")}
        src = os.path.join(REPO, "src")
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env


@dataclass
class Workspace:
    """One scenario's run: a fresh loop-mounted filesystem plus a scratch dir outside it."""

    env: Env
    fs: LoopFs
    scratch: str
    first: bool

    @property
    def gd_root(self) -> str:
        return os.path.join(self.fs.mnt, "graphdriver")

    def gd(self, driver: str, *args: str) -> list[str]:
        """The graphdriver CLI, as a user runs it (a fresh interpreter per command)."""
        return [self.env.python, "-m", "graphdriver", "--root", self.gd_root, "--driver", driver, *args]

    def gd_lib(self, driver: str, *args: str) -> list[str]:
        """The small library entry (one process for a whole chain; see gd_apply.py)."""
        return [self.env.python, os.path.join(HERE, "gd_apply.py"), "--root", self.gd_root, "--driver",
                driver, *args]

    def cs(self, driver: str, *args: str) -> list[str]:
        return ["containers-storage", "-g", os.path.join(self.fs.mnt, "cs"), "-R",
                os.path.join(self.scratch, "runroot"), "-s", driver, *args]


@dataclass
class Scenario:
    tool: str
    steps: Callable[[Workspace], StepList]
    setup: Callable[[Workspace], None] | None = None
    verify: Callable[[Workspace], str] | None = None
    teardown: Callable[[Workspace], None] | None = None
    needs: tuple[str, ...] = ()
    note: str = ""
    uses_gd: bool = False


@dataclass
class Operation:
    name: str
    description: str
    baseline: str
    scenarios: list[Scenario]


# -- verification --------------------------------------------------------------------------------


def treecmp(ws: Workspace, actual: str) -> str:
    """The shared treecmp.py verdict line for ``actual`` against the expected final rootfs."""
    if not ws.env.expected or not ws.env.shared:
        return "not verified (no expected rootfs)"
    script = os.path.join(ws.env.shared, "treecmp.py")
    import subprocess

    proc = subprocess.run([ws.env.python, script, ws.env.expected, actual], capture_output=True, text=True,
                          check=False)
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else f"treecmp failed: {proc.stderr.strip()[-200:]}"


def gd_verify(driver: str, layer: str) -> Callable[[Workspace], str]:
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

        for name in containers:
            subprocess.run(ws.cs(driver, "unmount", name), capture_output=True, check=False, timeout=60)
        try:
            subprocess.run(ws.cs(driver, "shutdown", "-f"), capture_output=True, check=False, timeout=60)
        except subprocess.TimeoutExpired:
            print("bench: containers-storage shutdown -f did not finish in 60 s; killed", file=sys.stderr)

    return teardown


# -- scenario factories ------------------------------------------------------------------------------


def tar_extract(tool: str, gz: bool) -> Scenario:
    """GNU tar (or bsdtar) extracting the layers, in order, into one directory (no whiteouts)."""

    def steps(ws: Workspace) -> StepList:
        dest = os.path.join(ws.fs.mnt, "rootfs")
        os.makedirs(dest, exist_ok=True)
        if tool == "gnutar":
            return [(f"l{i}", ["tar", "-xzf" if gz else "-xf", layer, "-C", dest])
                    for i, layer in enumerate(ws.env.layers(gz), 1)]
        return [(f"l{i}", ["bsdtar", "-xpf", layer, "-C", dest])
                for i, layer in enumerate(ws.env.layers(gz), 1)]

    binary = "tar" if tool == "gnutar" else "bsdtar"
    return Scenario(tool=tool, steps=steps, needs=(f"tool:{binary}",),
                    note="floor: extracts whiteouts as files")


def gd_apply_cli(driver: str, gz: bool) -> Scenario:
    """graphdriver through the CLI: ``create`` + ``apply-diff`` per layer (6 processes)."""

    def steps(ws: Workspace) -> StepList:
        out: StepList = []
        parent = ""
        for i, layer in enumerate(ws.env.layers(gz), 1):
            create = ["create", f"l{i}"] if not parent else ["create", "--parent", parent, f"l{i}"]
            out.append((f"create-l{i}", ws.gd(driver, *create)))
            out.append((f"apply-l{i}", ws.gd(driver, "apply-diff", "--parent", parent, f"l{i}", layer)))
            parent = f"l{i}"
        return out

    return Scenario(tool=f"gd-cli-{driver}", steps=steps, verify=gd_verify(driver, "l3"),
                    teardown=gd_teardown(driver), needs=(f"driver:{driver}",), uses_gd=True,
                    note="create + apply-diff per layer, one process each")


def gd_apply_lib(driver: str, gz: bool) -> Scenario:
    """graphdriver through the library: the whole chain in one process (bench/gd_apply.py)."""

    def steps(ws: Workspace) -> StepList:
        return [("chain", ws.gd_lib(driver, "apply", *ws.env.layers(gz)))]

    return Scenario(tool=f"gd-lib-{driver}", steps=steps, verify=gd_verify(driver, "l3"),
                    teardown=gd_teardown(driver), needs=(f"driver:{driver}",), uses_gd=True,
                    note="one process: create + apply_diff per layer")


def gd_create_mount(driver: str) -> Scenario:
    """Create a container layer on the applied image and mount it, through the CLI."""

    def setup(ws: Workspace) -> None:
        run(ws.gd_lib(driver, "apply", *ws.env.layers(False)), env=ws.env.gd_env())

    def steps(ws: Workspace) -> StepList:
        return [("create", ws.gd(driver, "create", "--parent", "l3", "ctr")),
                ("mount", ws.gd(driver, "mount", "ctr"))]

    return Scenario(tool=f"gd-cli-{driver}", steps=steps, setup=setup, teardown=gd_teardown(driver),
                    needs=(f"driver:{driver}",), uses_gd=True, note="create --parent l3 ctr; mount ctr")


def cs_create_mount(driver: str) -> Scenario:
    """containers-storage: create-container on the imported image, then mount it."""

    def setup(ws: Workspace) -> None:
        l1, l2, l3 = ws.env.layers(False)
        run(ws.cs(driver, "import-layer", "-f", l1, "--id", "l1"))
        run(ws.cs(driver, "import-layer", "-f", l2, "--id", "l2", "l1"))
        run(ws.cs(driver, "import-layer", "-f", l3, "--id", "l3", "l2"))
        run(ws.cs(driver, "create-image", "--id", "img", "l3"))

    def steps(ws: Workspace) -> StepList:
        return [("create", ws.cs(driver, "create-container", "--id", "ctr", "img")),
                ("mount", ws.cs(driver, "mount", "ctr"))]

    return Scenario(tool=f"cs-{driver}", steps=steps, setup=setup, teardown=cs_teardown(driver, ("ctr",)),
                    needs=("tool:containers-storage",), note="create-container; mount")


def command(tool: str, argv: list[str], note: str, uses_gd: bool = False) -> Scenario:
    """A single command with no setup: start-up costs and other fixed overheads."""
    return Scenario(tool=tool, steps=lambda ws: [(tool, argv)], note=note, uses_gd=uses_gd)


def operations() -> list[Operation]:
    """Every operation, in report order."""
    return [
        Operation(
            "apply", "apply layer1..3.tar (uncompressed) of the bench image into one root filesystem",
            baseline="gnutar",
            scenarios=[tar_extract("gnutar", False), gd_apply_cli("vfs", False), gd_apply_lib("vfs", False),
                       gd_apply_cli("overlay2", False), gd_apply_lib("overlay2", False)],
        ),
        Operation(
            "apply-gz", "the same with layer1..3.tar.gz",
            baseline="gnutar",
            scenarios=[tar_extract("gnutar", True), gd_apply_cli("vfs", True), gd_apply_lib("vfs", True),
                       gd_apply_cli("overlay2", True), gd_apply_lib("overlay2", True)],
        ),
        Operation(
            "startup", "interpreter start-up, for reading the CLI rows (site may import .pth hooks)",
            baseline="python-S",
            scenarios=[
                command("python-S", [sys.executable, "-S", "-c", "pass"], "python3 -S -c pass (no site)"),
                command("python", [sys.executable, "-c", "pass"], "python3 -c pass"),
                command("gd-version", [sys.executable, "-m", "graphdriver", "--version"],
                        "python3 -m graphdriver --version", uses_gd=True),
            ],
        ),
        Operation(
            "create-mount", "create a container layer on the applied image and mount it (setup untimed)",
            baseline="cs-overlay",
            scenarios=[cs_create_mount("overlay"), gd_create_mount("overlay2"), gd_create_mount("vfs")],
        ),
    ]


def probe_tools() -> dict[str, str]:
    """Which external tools exist (``tool:<name>`` -> "ok" or why not)."""
    out = {}
    for name in ("tar", "bsdtar", "containers-storage", "umoci"):
        out[f"tool:{name}"] = "ok" if shutil.which(name) else f"{name} is not installed"
    return out
