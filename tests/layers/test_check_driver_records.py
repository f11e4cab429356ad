"""``check`` compares overlay2's own records of each layer (``link``, ``parent``, ``lower``,
written without fsync) with the store's record of the parent chain, the source of truth, and
``repair=True`` rewrites them: here every one of them is torn as a crash leaves them (emptied),
the report names each, the repair restores the exact files and the container mounts again."""

from __future__ import annotations

import io
from pathlib import Path

from graphdriver.layers import ProblemKind
from graphdriver.layers.store import LayerStore
from graphdriver.testing.tarbuild import TarBuilder

T = 1_700_000_000


def test_check_reports_and_repairs_torn_overlay2_records(store_root: Path, mounting_driver: str) -> None:
    with LayerStore.open(store_root, mounting_driver) as store:
        base = store.import_layer(io.BytesIO(TarBuilder().file("a", b"base\n", mode=0o644, mtime=T).build()))
        child = store.import_layer(
            io.BytesIO(TarBuilder().file("b", b"child\n", mode=0o644, mtime=T).build()), base.id
        )
        ctr = store.create_layer(child.id, id="ctr")
        home = store.driver.home
        ids = (base.id, child.id, ctr.id)
        files = [home / id / name for id in ids for name in ("link", "parent", "lower")]
        before = {f: f.read_bytes() for f in files if f.exists()}
        assert len(before) == 7  # the base layer has no parent or lower
        assert store.check().clean

        for f in before:
            f.write_bytes(b"")
        found = store.check()
        assert [(p.kind, p.layer) for p in found.problems] == [
            (ProblemKind.DRIVER_RECORDS, base.id),
            (ProblemKind.DRIVER_RECORDS, child.id),
            (ProblemKind.DRIVER_RECORDS, "ctr"),
        ]
        assert found.problems[2].message == (
            "layer ctr: link file '' does not name its l/ symlink; "
            f"parent file '', the record says {child.id}; "
            "lower file '' does not list the parent chain's links"
        )
        assert all(f.read_bytes() == b"" for f in before)  # check alone changes nothing

        fixed = store.check(repair=True)
        assert [(p.kind, p.layer, p.repaired) for p in fixed.problems] == [
            (ProblemKind.DRIVER_RECORDS, base.id, True),
            (ProblemKind.DRIVER_RECORDS, child.id, True),
            (ProblemKind.DRIVER_RECORDS, "ctr", True),
        ]
        assert fixed.removed == []
        assert {f: f.read_bytes() for f in before} == before  # the same links, found again in l/
        assert store.check().clean
        with store.mounted("ctr") as root:
            assert sorted(p.name for p in root.iterdir()) == ["a", "b"]
            assert (root / "a").read_bytes() == b"base\n"
            assert (root / "b").read_bytes() == b"child\n"
