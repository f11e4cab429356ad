"""The fuzzing harness (fuzz/fuzz_apply.py) in CI: a bounded run, and the corpus as regression set.

Each run is a separate process (the harness enters its own read-only mount namespace, and
atheris takes the process over). The sentinel tree is planted here, handed to the harness
(``--base``), which checks it after every batch of inputs, and checked here again after the
process ended. Any exception other than a GraphDriverError, a hang (libFuzzer ``-timeout``) or a
touched sentinel makes the harness exit non-zero with the input saved under ``artifacts/``.

Engines: atheris (coverage-guided) when it is installed, for ~25 s; hypothesis (the harness's
mutators driven by hypothesis) for ~25 s when atheris is not installed, and as a 5 s smoke run
when it is. ``-m slow`` runs both for five minutes.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from graphdriver.testing.sentinel import Sentinel
from graphdriver.testing.tarbuild import TarBuilder

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "fuzz" / "fuzz_apply.py"
CORPUS = REPO / "fuzz" / "corpus"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the harness applies layers as root, sandboxed")


def has_atheris() -> bool:
    try:
        import atheris  # type: ignore[import-not-found, import-untyped, unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


def run_harness(
    work: Path, args: list[str], timeout: float
) -> tuple[subprocess.CompletedProcess[str], Sentinel]:
    base = work / "base"
    base.mkdir(parents=True)
    sentinel = Sentinel(base, exclude=("dest", "store"))
    (base / "dest").mkdir()
    (base / "store").mkdir()
    sentinel.arm()
    env = {k: v for k, v in os.environ.items() if k != "GRAPHDRIVER_FAULT"}
    proc = subprocess.run(
        [sys.executable, str(HARNESS), "--work", str(work), "--base", str(base), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    return proc, sentinel


def explain(proc: subprocess.CompletedProcess[str], work: Path) -> str:
    crashes = sorted(str(p) for p in (work / "artifacts").glob("*")) if (work / "artifacts").exists() else []
    return f"exit {proc.returncode}; saved inputs: {crashes}\n{proc.stderr[-6000:]}"


def test_corpus_replays_cleanly(tmp_path: Path) -> None:
    """Every seed (and every input kept from earlier runs) applies or is refused with a typed error."""
    seeds = sorted(CORPUS.iterdir())
    assert len(seeds) >= 15
    proc, sentinel = run_harness(tmp_path, ["--engine", "replay", "--store-every", "1", str(CORPUS)], 300)
    assert proc.returncode == 0, explain(proc, tmp_path)
    sentinel.assert_intact()
    assert f"'inputs': {len(seeds)}" in proc.stderr


def ci_seconds(engine: str) -> float:
    if engine == "atheris":
        return 25
    return 5 if has_atheris() else 25


@pytest.mark.parametrize("engine", ["atheris", "hypothesis"])
def test_bounded_fuzz_run(engine: str, tmp_path: Path) -> None:
    fuzz(engine, ci_seconds(engine), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["atheris", "hypothesis"])
def test_long_fuzz_run(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("the five-minute runs: select them with -m slow")
    fuzz(engine, 300, tmp_path)


def fuzz(engine: str, seconds: float, tmp_path: Path) -> None:
    if engine == "atheris" and not has_atheris():
        pytest.skip("atheris is not installed (pip install atheris): the hypothesis engine runs instead")
    if engine == "atheris":
        new = tmp_path / "new-corpus"
        new.mkdir()
        args = [
            "--",
            f"-max_total_time={int(seconds)}",
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-max_len=131072",
            "-print_final_stats=1",
            str(new),
            str(CORPUS),
        ]
    else:
        args = ["--engine", "hypothesis", "--seconds", str(seconds), "--seed", str(os.getpid()), str(CORPUS)]
    proc, sentinel = run_harness(tmp_path / "work", args, seconds * 4 + 120)
    assert proc.returncode == 0, explain(proc, tmp_path / "work")
    sentinel.assert_intact()
    if engine == "atheris":
        runs = re.search(r"Done (\d+) runs", proc.stderr)
        assert runs is not None and int(runs.group(1)) > 0, proc.stderr[-2000:]
    else:
        inputs = re.search(r"'inputs': (\d+)", proc.stderr)
        assert inputs is not None and int(inputs.group(1)) > 0, proc.stderr[-2000:]


# -- bugs the fuzzer found, each a regression test -------------------------------------------------


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


IMPORT_ONE = """
import io, sys
from graphdriver.errors import GraphDriverError
from graphdriver.layers.store import LayerStore
with LayerStore.open(sys.argv[1], "vfs") as store:
    try:
        store.import_layer(io.BytesIO(sys.stdin.buffer.read()))
    except GraphDriverError as exc:
        print(type(exc).__name__)
"""


NEGATIVE_SIZES = {
    "pax-size-minus-1": lambda: TarBuilder().file("f", b"x", pax={"size": "-1"}).build(),
    "pax-size-minus-4096": lambda: TarBuilder().file("f", b"x", pax={"size": "-4096"}).build(),
    "octal-size-minus-1": lambda: TarBuilder().file("f", b"", raw={"size": b"-000001\0"}).build(),
}


@pytest.mark.parametrize("shape", sorted(NEGATIVE_SIZES))
def test_store_import_of_a_negative_size_fails_fast(shape: str, tmp_path: Path, arena: Any) -> None:
    blob = NEGATIVE_SIZES[shape]()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", IMPORT_ONE, str(arena.root)],
            input=blob,
            capture_output=True,
            timeout=5,
            preexec_fn=_limit_memory,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the import did not end within 5 s")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.decode().strip() == "InvalidArchive"
