"""``check`` for images: the layer store's check plus what the image records must satisfy.

=============  ===========================================================  ==========================
kind           meaning                                                      repair
=============  ===========================================================  ==========================
image          an image whose config does not hash to its id, whose top     delete the image record
               layer is missing or not complete, or whose layer chain does  (not while a container
               not have the chain IDs its config's diff IDs give            uses it)
container      a container whose layer is missing or does not sit on its    delete the record and the
               image's top layer                                            layer (unless mounted)
stale-lease    a lease of an operation that died                            delete it; remove the
                                                                            layers only it claimed
=============  ===========================================================  ==========================

With ``repair``, records that refer to layers the layer check is about to remove (a layer whose
data is missing, whose chain ID or content is wrong, whose parent is gone, and everything above
it) are deleted first, so that the layer repair never has to delete a layer an image still names.
Layers that no image or container uses are not a problem (``prune`` removes them); their number
is given as a note.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from graphdriver.errors import GraphDriverError
from graphdriver.images.imagestore import ImageCheckReport, ImageProblem
from graphdriver.images.manifests import parse_config
from graphdriver.images.records import ImageTxn
from graphdriver.layers.digests import chain_ids
from graphdriver.layers.metadata import Layer, LayerState

if TYPE_CHECKING:
    from graphdriver.images.imagestore import ImageStore

__all__ = ["check"]

_DOOMING = ("dangling-parent", "missing-data", "chain-id", "content", "incomplete", "removing")


def _chain(top: str | None, by_id: dict[str, Layer]) -> list[Layer] | None:
    """The layers from ``top`` down, bottom first; None if one is missing or not complete."""
    out: list[Layer] = []
    cur = top
    while cur is not None:
        layer = by_id.get(cur)
        if layer is None or layer.state is not LayerState.COMPLETE or len(out) > len(by_id):
            return None
        out.append(layer)
        cur = layer.parent
    return list(reversed(out))


def _image_problem(config: bytes, image_id: str, top: str | None, by_id: dict[str, Layer]) -> str | None:
    algo = image_id.partition(":")[0]
    got = f"{algo}:{hashlib.new(algo, config).hexdigest()}"
    if got != image_id:
        return f"image {image_id}: its config hashes to {got}"
    try:
        diff_ids = parse_config(config, f"config of image {image_id}").diff_ids
    except GraphDriverError as exc:
        return f"image {image_id}: {exc}"
    chain = _chain(top, by_id)
    if chain is None:
        return f"image {image_id}: its top layer {top} or a layer below it is missing or incomplete"
    want = chain_ids(diff_ids)
    have = [la.chain_id for la in chain]
    if have != want:
        return f"image {image_id}: its layers have chain IDs {have}, its config gives {want}"
    return None


def _descendants(roots: set[str], layers: list[Layer]) -> set[str]:
    kids: dict[str, list[str]] = {}
    for la in layers:
        if la.parent is not None:
            kids.setdefault(la.parent, []).append(la.id)
    out: set[str] = set()
    stack = list(roots)
    while stack:
        cur = stack.pop()
        if cur in out:
            continue
        out.add(cur)
        stack.extend(kids.get(cur, []))
    return out


def check(images: ImageStore, *, repair: bool = False, verify_content: bool = False) -> ImageCheckReport:
    store = images.layers
    layer_report = store.check(verify_content=verify_content, repair=False)
    report = ImageCheckReport(layers=layer_report)

    # leases of dead operations
    with store.db.read() as txn:
        leases = ImageTxn(txn).leases()
    stale = [lid for lid in leases if not store.lease_alive(lid)]
    if stale:
        for lid in stale:
            report.problems.append(ImageProblem("stale-lease", lid, f"lease {lid} of an operation that died"))
        if repair:
            gc = images.clean_leases()
            for p in report.problems:
                if p.kind == "stale-lease":
                    p.repaired, p.action = (
                        True,
                        "deleted" + (f"; removed layers {', '.join(gc.removed)}" if gc.removed else ""),
                    )

    with store.db.read() as txn:
        itx = ImageTxn(txn)
        layers = txn.all()
        image_rows = itx.images()
        container_rows = itx.containers()
    by_id = {la.id: la for la in layers}
    doomed = _descendants(
        {p.layer for p in layer_report.problems if p.layer is not None and str(p.kind) in _DOOMING}, layers
    )
    users: dict[str, list[str]] = {}
    candidates: set[str] = set()
    """layers of records repair deleted: removed afterwards if nothing else uses them"""
    for c in container_rows:
        users.setdefault(c.image_id, []).append(c.name)

    for c in container_rows:
        layer = by_id.get(c.layer_id)
        image_top = next((r.top_layer for r in image_rows if r.id == c.image_id), None)
        message = None
        if layer is None or layer.state is not LayerState.COMPLETE:
            message = f"container {c.name!r}: its layer {c.layer_id} is missing or incomplete"
        elif layer.parent != image_top:
            message = (
                f"container {c.name!r}: its layer sits on {layer.parent},"
                f" its image's top layer is {image_top}"
            )
        elif c.layer_id in doomed:
            message = f"container {c.name!r}: its layer {c.layer_id} is broken (see the layer problems)"
        if message is None:
            continue
        p = ImageProblem("container", c.name, message)
        report.problems.append(p)
        if repair:
            if layer is not None and layer.mount_count > 0 and store.mount_alive(layer):
                p.action = "not repaired: its layer is mounted"
                continue
            with store.write() as wtxn:
                ImageTxn(wtxn).delete_container(c.name)
            users[c.image_id] = [n for n in users.get(c.image_id, []) if n != c.name]
            candidates.add(c.layer_id)
            p.repaired, p.action = True, "container record deleted"

    for row in image_rows:
        message = _image_problem(row.config, row.id, row.top_layer, by_id)
        if message is None and row.top_layer in doomed:
            message = f"image {row.id}: its layers are broken (see the layer problems)"
        if message is None:
            continue
        p = ImageProblem("image", row.id, message)
        report.problems.append(p)
        if repair:
            if users.get(row.id):
                p.action = f"not repaired: used by container(s) {', '.join(users[row.id])}"
                continue
            with store.write() as wtxn:
                ImageTxn(wtxn).delete_image(row.id)
            cur = row.top_layer
            while cur is not None and cur in by_id and cur not in candidates:
                candidates.add(cur)
                cur = by_id[cur].parent
            p.repaired, p.action = True, "image record deleted"

    if repair and (not layer_report.clean or report.problems):
        report.layers = store.check(verify_content=verify_content, repair=True)
        gc = images.collect(candidates)
        if gc.removed:
            report.notes.append(
                f"removed layers no image or container uses any more: {', '.join(gc.removed)}"
            )
    unused = images.unused_layers()
    if unused:
        report.notes.append(f"{len(unused)} layer(s) used by no image or container ('prune' removes them)")
    return report
