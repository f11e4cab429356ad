"""The root filesystem of an imported image equals what ``umoci unpack`` makes of the same image,
file by file: type, mode, owner, size, mtime, content hash, link target, xattrs, hard links.

- A small image built here (every kind of entry, whiteouts, an opaque directory that is declared
  again without its xattrs, gzip and plain layers: the umoci here reads no zstd), on every driver.
- The bench image (``/var/tmp/gd-bench``, built by ``shared/bench/make-image.sh``: Debian minbase,
  a Python venv, 461 whiteouts, an opaque directory), from its OCI layout (refs ``raw`` and ``gz``)
  and from its docker-archive, through vfs and overlay2: equal to umoci's unpack, and to the
  snapshot the image was made from (``src/rootfs-l3``; its ``.gd-done`` marker and the contents of
  ``/dev``, ``/proc`` and ``/sys`` left out). The bench's layer tars carry whole-second mtimes and
  its directories' mtimes are not those of the snapshot, so against the snapshot mtimes are
  compared in whole seconds and not for directories (as the bench's own ``treecmp.py`` does);
  against umoci everything is compared. Marked ``slow``; skipped when the bench image is not there
  (fresh CI machines do not have it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from graphdriver.fs.remove import remove_tree
from graphdriver.images.imagestore import ImageStore
from graphdriver.testing.trees import diff_snapshots, snapshot_tree

Kit = Any

BENCH = Path("/var/tmp/gd-bench")
BENCH_LAYOUT = BENCH / "image" / "oci"
BENCH_GROUND_TRUTH = BENCH / "src" / "rootfs-l3"
GROUND_TRUTH_EXCLUDE = ("/.gd-done", "/dev/*", "/proc/*", "/sys/*")


def umoci() -> str:
    path = shutil.which("umoci")
    if path is None:
        pytest.skip("umoci is not installed")
    return path


def umoci_snapshot(layout: Path, ref: str, work: Path) -> dict[str, Any]:
    """``umoci unpack`` the image, snapshot its rootfs, delete the bundle."""
    bundle = work / f"umoci-{ref}"
    proc = subprocess.run(
        [umoci(), "unpack", "--image", f"{layout}:{ref}", str(bundle)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"umoci unpack failed:\n{proc.stderr}")
    try:
        return snapshot_tree(bundle / "rootfs")
    finally:
        remove_tree(bundle)


def our_snapshot(images: ImageStore, source: str | Path) -> dict[str, Any]:
    image = images.import_image(source)
    assert image.top_layer is not None
    with images.layers.mounted(image.top_layer) as root:
        return snapshot_tree(root)


def test_small_image_equals_umoci(images: ImageStore, tmp_path: Path, ikit: Kit) -> None:
    image = ikit.standard_image(tmp_path, ("gzip", "gzip", "none"), keep_dir_xattrs=False)
    layout = ikit.write_layout(tmp_path / "layout", [(image, ikit.ref("v1"))])
    expected = umoci_snapshot(layout, "v1", tmp_path)
    assert "/dev/null" in expected and "/ping" in expected  # the privileged entries are there
    assert diff_snapshots(expected, our_snapshot(images, layout)) == []
    # the same image from a docker-archive (uncompressed layers) gives the same tree
    archive = ikit.write_docker_archive(tmp_path, image, tmp_path / "saved.tar")
    images.rmi(image.config_digest)
    assert diff_snapshots(expected, our_snapshot(images, archive)) == []


# -- the bench image --------------------------------------------------------------------------------


def _bench_docker_archives() -> list[Path]:
    return sorted(p for p in (BENCH / "image").glob("*docker-archive*") if p.is_file())


def _ts(ns: int) -> str:
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def truth_diffs(truth: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """Differences from the bench's source snapshot: everything but mtimes, then the mtimes of
    non-directories in whole seconds."""
    out = diff_snapshots(truth, got, ignore=("mtime",), exclude=GROUND_TRUTH_EXCLUDE)
    for path, entry in truth.items():
        other = got.get(path)
        if other is None or entry.type == "dir" or path.startswith(("/dev/", "/proc/", "/sys/")):
            continue
        if entry.mtime_ns // 10**9 != other.mtime_ns // 10**9:
            out.append(f"{path}: mtime {entry.mtime_ns // 10**9} != {other.mtime_ns // 10**9} (seconds)")
    return out


@pytest.fixture(scope="module")
def bench_trees(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    """(umoci's unpack of the bench image (ref ``raw``), the source snapshot), checked against
    each other once."""
    if not (BENCH_LAYOUT / "index.json").exists() or not BENCH_GROUND_TRUTH.is_dir():
        pytest.skip(f"the bench image is not built here ({BENCH}; see shared/bench/make-image.sh)")
    work = tmp_path_factory.mktemp("bench-umoci")
    expected = umoci_snapshot(BENCH_LAYOUT, "raw", work)
    truth = snapshot_tree(BENCH_GROUND_TRUTH)
    assert truth_diffs(truth, expected) == []
    return expected, truth


BENCH_SOURCES = ["oci:raw", "oci:gz", "docker-archive"]


@pytest.mark.slow
@pytest.mark.parametrize("source", BENCH_SOURCES)
def test_bench_image_equals_umoci(
    bench_trees: tuple[dict[str, Any], dict[str, Any]], images: ImageStore, source: str
) -> None:
    if source == "docker-archive":
        archives = _bench_docker_archives()
        if not archives:
            pytest.skip(f"no docker-archive in {BENCH / 'image'}")
        target: str | Path = archives[0]
    else:
        target = f"oci:{BENCH_LAYOUT}:{source.partition(':')[2]}"
    got = our_snapshot(images, target)
    umoci_tree, truth = bench_trees
    # no layer of the bench image has a "./" entry, so the image does not say what the root
    # directory's mtime is: umoci leaves it at 0, a layer store at the time it made the layer
    root_mtime = [f"/: mtime {_ts(umoci_tree['/'].mtime_ns)} != {_ts(got['/'].mtime_ns)}"]
    assert diff_snapshots(umoci_tree, got) in ([], root_mtime)
    assert truth_diffs(truth, got) == []
    assert images.check().clean
