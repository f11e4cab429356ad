"""The image and container commands, run as a subprocess the way a user runs them.

Until :func:`graphdriver.cli.image_commands.register` is wired into ``build_parser``, the
commands are run through a two-line wrapper that adds them (and does nothing once they are there).
Mount counts survive the process (``container-mount`` in one, ``container-unmount`` in another),
``--json`` shapes, and the error contract (one ``graphdriver: error:`` line, the class's exit
status).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from graphdriver.errors import ArchiveError, Busy, DigestMismatch, NotFound

Kit = Any

WRAPPER = """
import argparse, importlib, sys
from graphdriver.cli import image_commands
m = importlib.import_module("graphdriver.cli.main")
orig = m.build_parser
def build():
    p = orig()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    if "images" not in sub.choices:
        image_commands.register(sub)
    return p
m.build_parser = build
sys.exit(m.main(sys.argv[1:]))
"""


def gd(root: Path, driver: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPHDRIVER_") or "TEST" in k}
    return subprocess.run(
        [sys.executable, "-c", WRAPPER, "--root", str(root), "--driver", driver, *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )


def ok(root: Path, driver: str, *args: str) -> str:
    proc = gd(root, driver, *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout


def js(root: Path, driver: str, *args: str) -> Any:
    return json.loads(ok(root, driver, "--json", *args))


def fails(root: Path, driver: str, status: int, *args: str) -> str:
    proc = gd(root, driver, *args)
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("graphdriver: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_image_workflow(store_root: Path, driver_name: str, tmp_path: Path, ikit: Kit) -> None:
    root, drv = store_root, driver_name
    image = ikit.standard_image(tmp_path)
    layout = ikit.write_layout(tmp_path / "layout", [(image, ikit.ref("v1"))])

    assert ok(root, drv, "import", str(layout), "--name", "app:1").strip() == image.config_digest
    shown = js(root, drv, "images")["images"]
    assert [(i["id"], i["names"]) for i in shown] == [(image.config_digest, ["docker.io/library/app:1"])]
    listing = ok(root, drv, "images").splitlines()
    assert listing[0].split() == ["NAME", "IMAGE", "ID", "CREATED", "LAYERS", "SIZE"]
    assert listing[1].split()[:4] == [
        "docker.io/library/app:1",
        image.config_digest[7:19],
        "2024-01-02T03:04:05Z",
        "3",
    ]
    js(root, drv, "tag", "app:1", "example.com/app:stable")

    made = js(root, drv, "create-container", "app:1", "--name", "web")
    assert made["name"] == "web" and made["image"] == image.config_digest
    path = Path(ok(root, drv, "container-mount", "web").strip())
    (path / "added").write_text("hello\n")
    assert js(root, drv, "containers")["containers"][0]["mount_count"] == 1
    assert js(root, drv, "container-unmount", "web") == {"name": "web", "mount_count": 0}
    new_id = ok(root, drv, "commit", "web", "app:2", "-m", "added a file").strip()
    tree = ok(root, drv, "layers", "--tree").splitlines()
    assert len(tree) == 5 and "container web" in tree[3] and "docker.io/library/app:2" in tree[4]
    assert [n["depth"] for n in js(root, drv, "layers")["layers"]] == [0, 1, 2, 3, 3]

    out = tmp_path / "app2.tar"
    exported = js(root, drv, "export", "app:2", "-o", str(out), "--format", "docker-archive")
    assert exported["image"] == new_id and len(exported["layers"]) == 4 and out.is_file()

    fails(root, drv, Busy.exit_code, "rmi", "app:1", "example.com/app:stable")  # the container uses it
    ok(root, drv, "rm-container", "web")
    removed = js(root, drv, "rmi", "app:2")
    assert removed["deleted"] == new_id and len(removed["removed"]) == 1
    df = js(root, drv, "df")
    assert (df["images"], df["containers"], df["layers"], df["unused_layers"]) == (1, 0, 3, 0)
    check = js(root, drv, "check")
    assert check["clean"] is True
    assert ok(root, drv, "check").startswith("clean: 3 layers checked")
    assert js(root, drv, "prune") == {"removed": [], "kept": []}

    # the exported archive comes back as the same image
    assert ok(root, drv, "import", f"docker-archive:{out}").strip() == new_id


def test_errors(store_root: Path, driver_name: str, tmp_path: Path, ikit: Kit) -> None:
    root, drv = store_root, driver_name
    assert "image not known: nope" in fails(root, drv, NotFound.exit_code, "rmi", "nope")
    fails(root, drv, NotFound.exit_code, "container-mount", "ghost")
    image = ikit.standard_image(tmp_path)
    layout = ikit.write_layout(tmp_path / "layout", [(image, {})])
    blob = layout / "blobs" / "sha256" / image.layers[2].digest.partition(":")[2]
    blob.write_bytes(blob.read_bytes()[:-10])
    assert "(truncated)" in fails(root, drv, DigestMismatch.exit_code, "import", str(layout))
    bad = tmp_path / "bad.tar"
    bad.write_bytes(ikit.small_tar(tmp_path))
    fails(root, drv, ArchiveError.exit_code, "import", str(bad))
    assert js(root, drv, "images") == {"images": []}
    assert js(root, drv, "check")["clean"] is True
