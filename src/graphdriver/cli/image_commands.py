"""The image and container subcommands of ``graphdriver``: one library call each, then printing.

:func:`register` adds them to the parser that :func:`graphdriver.cli.main.build_parser` makes
(``image_commands.register(sub, _command)``, as the registry commands are added). Each works on
the image store at ``--root`` with ``--driver`` (:class:`graphdriver.images.ImageStore`), opened
once per command; errors are raised, never printed here, as in :mod:`graphdriver.cli.commands`.
Import and export show progress on stderr when it is a terminal.

``--json`` output shapes (one JSON document on stdout):

==================  ==============================================================================
import              the image: ``{"id", "names", "top_layer", "layers", "diff_ids",
                    "manifest_digests", "created", "recorded", "size"}``
images              ``{"images": [image, ...]}``
tag                 the image
layers              ``{"layers": [{layer fields..., "depth", "images", "containers"}]}``
rmi                 ``{"untagged": [...], "deleted": id | null, "removed": [layer ids],
                    "kept": [{"layer", "reason"}]}``
create-container    the container: ``{"name", "layer", "image", "created", "mount_count",
                    "mount_point"}``
containers          ``{"containers": [container, ...]}``
container-mount     ``{"name", "path"}``
container-unmount   ``{"name", "mount_count"}``
rm-container        ``{"name"}``
commit              the new image
export              ``{"dest", "format", "compression", "image", "manifest_digest", "layers":
                    [{"mediaType", "digest", "size", "diff_id"}], "names"}``
df                  ``{"images", "containers", "unused_layers", "reclaimable", "layers",
                    "image_layers", "container_layers", "size", "compressed_size",
                    "uncompressed_size", "mounted"}``
check               ``{"clean", "problems": [...], "layers": {layer check report}, "notes"}``
prune               ``{"removed": [layer ids], "kept": [{"layer", "reason"}]}``
==================  ==============================================================================
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphdriver.cli.commands import Context
    from graphdriver.images.imagestore import Image, ImageStore

__all__ = ["COMMANDS", "register"]

COMMANDS = (
    "import",
    "images",
    "tag",
    "layers",
    "rmi",
    "create-container",
    "containers",
    "container-mount",
    "container-unmount",
    "rm-container",
    "commit",
    "export",
    "df",
    "check",
    "prune",
)

CommandMaker = Callable[..., argparse.ArgumentParser]


def _open(ctx: Context) -> ImageStore:
    from graphdriver.images.imagestore import ImageStore

    store = ImageStore.open(ctx.root, ctx.driver_name, ctx.options)
    ctx.debug(f"image store at {ctx.root} on driver {store.layers.driver.name}")
    return store


def _size(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _name(image: Image) -> str:
    return ", ".join(image.names) if image.names else "<none>"


# -- images ----------------------------------------------------------------------------------------


def cmd_import(ctx: Context, args: argparse.Namespace) -> int:
    from graphdriver.cli.output import Progress
    from graphdriver.images.importer import ImportProgress

    progress = ImportProgress()
    with _open(ctx) as store, Progress(ctx.stderr, f"importing {args.source}", progress.poll):
        image = store.import_image(
            args.source,
            format=args.format,
            ref=args.ref,
            platform=args.platform,
            names=args.name,
            progress=progress,
            parallel_apply=args.parallel_apply,
        )
    if progress.skipped:
        ctx.debug(f"{len(progress.skipped)} of {progress.layers_total} layers were stored already")
    ctx.emit(image.id, image.to_json())
    return 0


def cmd_images(ctx: Context, args: argparse.Namespace) -> int:
    with _open(ctx) as store:
        found = store.images()
    if ctx.json:
        ctx.emit(None, {"images": [i.to_json() for i in found]})
        return 0
    rows = [("NAME", "IMAGE ID", "CREATED", "LAYERS", "SIZE")]
    for image in found:
        for name in image.names or ("<none>",):
            rows.append(
                (name, image.short_id, image.created or "-", str(len(image.layers)), _size(image.size))
            )
    _table(ctx, rows)
    return 0


def cmd_tag(ctx: Context, args: argparse.Namespace) -> int:
    with _open(ctx) as store:
        image = store.tag(args.image, args.name)
    ctx.emit(None, image.to_json())
    return 0


def cmd_layers(ctx: Context, args: argparse.Namespace) -> int:
    with _open(ctx) as store:
        nodes = store.tree()
    if ctx.json:
        ctx.emit(
            None,
            {
                "layers": [
                    {
                        **n.layer.to_json(),
                        "depth": n.depth,
                        "images": list(n.images),
                        "containers": list(n.containers),
                    }
                    for n in nodes
                ]
            },
        )
        return 0
    if args.tree:
        lines = []
        for n in nodes:
            who = [*n.images, *(f"container {c}" for c in n.containers)]
            label = f"{n.layer.id[:12]}  {_size(n.layer.size)}" + (f"  [{'; '.join(who)}]" if who else "")
            lines.append(("   " * (n.depth - 1) + "└─ " if n.depth else "") + label)
        ctx.stdout.write("".join(line + "\n" for line in lines))
        return 0
    rows = [("LAYER ID", "PARENT", "KIND", "SIZE", "CREATED", "DIFF ID")]
    for n in sorted(nodes, key=lambda n: (n.layer.created, n.layer.id)):
        la = n.layer
        rows.append(
            (
                la.id[:12],
                (la.parent or "-")[:12],
                str(la.kind),
                _size(la.size),
                la.created.strftime("%Y-%m-%d %H:%M:%S"),
                (la.diff_id or "-")[:19],
            )
        )
    _table(ctx, rows)
    return 0


def cmd_rmi(ctx: Context, args: argparse.Namespace) -> int:
    reports = []
    with _open(ctx) as store:
        for ref in args.image:
            reports.append(store.rmi(ref))
    if ctx.json:
        merged: dict[str, Any] = {"untagged": [], "deleted": [], "removed": [], "kept": []}
        for r in reports:
            data = r.to_json()
            merged["untagged"] += data["untagged"]
            merged["deleted"] += [data["deleted"]] if data["deleted"] else []
            merged["removed"] += data["removed"]
            merged["kept"] += data["kept"]
        if len(reports) == 1:
            merged["deleted"] = reports[0].deleted
        ctx.emit(None, merged)
        return 0
    for r in reports:
        for name in r.untagged:
            ctx.stdout.write(f"Untagged: {name}\n")
        if r.deleted:
            ctx.stdout.write(f"Deleted: {r.deleted}\n")
        for lid in r.gc.removed:
            ctx.stdout.write(f"Removed layer: {lid}\n")
        for lid, why in r.gc.kept:
            ctx.stdout.write(f"Kept layer: {lid} ({why})\n")
    return 0


# -- containers ------------------------------------------------------------------------------------


def cmd_create_container(ctx: Context, args: argparse.Namespace) -> int:
    with _open(ctx) as store:
        ctr = store.create_container(args.image, args.name)
    ctx.emit(ctr.name, ctr.to_json())
    return 0


def cmd_containers(ctx: Context, args: argparse.Namespace) -> int:
    with _open(ctx) as store:
        found = store.containers()
        names = {i.id: (i.names[0] if i.names else i.short_id) for i in store.images()}
    if ctx.json:
        ctx.emit(None, {"containers": [c.to_json() for c in found]})
        return 0
    rows = [("NAME", "IMAGE", "LAYER", "MOUNTS", "CREATED")]
    for c in found:
        rows.append(
            (
                c.name,
                names.get(c.image_id, c.image_id[:19]),
                c.layer_id[:12],
                str(c.mount_count),
                c.created.strftime("%Y-%m-%d %H:%M:%S"),
            )
        )
    _table(ctx, rows)
    return 0


def cmd_container_mount(ctx: Context, args: argparse.Namespace) -> int:
    with _open(ctx) as store:
        path = store.mount_container(args.name, args.mount_label)
    ctx.emit(str(path), {"name": args.name, "path": str(path)})
    return 0


def cmd_container_unmount(ctx: Context, args: argparse.Namespace) -> int:
    with _open(ctx) as store:
        left = store.unmount_container(args.name, args.force)
    ctx.emit(None, {"name": args.name, "mount_count": left})
    return 0


def cmd_rm_container(ctx: Context, args: argparse.Namespace) -> int:
    with _open(ctx) as store:
        store.remove_container(args.name)
    ctx.emit(None, {"name": args.name})
    return 0


def cmd_commit(ctx: Context, args: argparse.Namespace) -> int:
    with _open(ctx) as store:
        image = store.commit(args.container, args.image_name, message=args.message, author=args.author)
    ctx.emit(image.id, image.to_json())
    return 0


def cmd_export(ctx: Context, args: argparse.Namespace) -> int:
    from graphdriver.cli.output import Progress
    from graphdriver.images.exporter import ExportProgress

    progress = ExportProgress()
    with _open(ctx) as store, Progress(ctx.stderr, f"writing {args.output}", progress.poll):
        result = store.export_image(
            args.image,
            args.output,
            format=args.format,
            compression=args.compression,
            docker_form=args.docker_form,
            progress=progress,
        )
    ctx.emit(None, result.to_json())
    return 0


# -- the store -------------------------------------------------------------------------------------


def cmd_df(ctx: Context, args: argparse.Namespace) -> int:
    with _open(ctx) as store:
        usage = store.df()
    if ctx.json:
        ctx.emit(None, usage.to_json())
        return 0
    la = usage.layers
    rows = [
        ("TYPE", "COUNT", "SIZE", "RECLAIMABLE"),
        ("Images", str(usage.images), "", ""),
        ("Containers", str(usage.containers), "", ""),
        (
            "Layers",
            str(la.layers),
            _size(la.size),
            f"{_size(usage.reclaimable)} ({usage.unused_layers} unused)",
        ),
    ]
    _table(ctx, rows)
    ctx.stdout.write(
        f"image layers {la.image_layers}, container layers {la.container_layers}, mounted {la.mounted}; "
        f"imported from {_size(la.compressed_size)} of blobs ({_size(la.uncompressed_size)} uncompressed)\n"
    )
    return 0


def cmd_check(ctx: Context, args: argparse.Namespace) -> int:
    with _open(ctx) as store:
        report = store.check(repair=args.repair, verify_content=args.verify_content)
    unrepaired = [p for p in report.problems if not p.repaired] + report.layers.unrepaired
    if ctx.json:
        ctx.emit(None, report.to_json())
    else:
        for line in report.lines():
            ctx.stdout.write(line + "\n")
        for removed in report.layers.removed:
            ctx.stdout.write(f"removed layer {removed}\n")
        for note in report.notes + report.layers.notes:
            ctx.stdout.write(f"note: {note}\n")
        if report.clean:
            ctx.stdout.write(f"clean: {report.layers.layers_checked} layers checked\n")
    return 1 if unrepaired else 0


def cmd_prune(ctx: Context, args: argparse.Namespace) -> int:
    with _open(ctx) as store:
        result = store.prune()
    if ctx.json:
        ctx.emit(None, result.to_json())
        return 0
    for lid in result.removed:
        ctx.stdout.write(f"Removed layer: {lid}\n")
    for lid, why in result.kept:
        ctx.stdout.write(f"Kept layer: {lid} ({why})\n")
    return 0


def _table(ctx: Context, rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        ctx.stdout.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


# -- the parser ------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[Any], command: CommandMaker | None = None) -> None:
    """Add the image and container subcommands to ``sub`` (the parser's subcommands).

    ``command`` makes one subcommand parser with the global options
    (:func:`graphdriver.cli.main._command`, the default).
    """
    if command is None:
        from graphdriver.cli.main import _command

        command = _command
    add = command

    p = add(
        sub,
        "import",
        cmd_import,
        "import an image from an OCI layout directory, an oci-archive or a docker-archive "
        "(docker save; legacy and Docker 25+ forms); every blob is verified",
        "  graphdriver import ./layout --name app:1\n"
        "  graphdriver import oci:./layout:v1\n"
        "  graphdriver import docker-archive:saved.tar:app:1",
    )
    p.add_argument(
        "source",
        metavar="SRC",
        help="DIR, FILE, oci:DIR[:REF], oci-archive:FILE[:REF], docker-archive:FILE[:NAME:TAG|:@N]",
    )
    p.add_argument(
        "--name",
        metavar="NAME:TAG",
        action="append",
        default=[],
        help="name the image (repeatable; replaces the names the source gives)",
    )
    p.add_argument(
        "--ref",
        metavar="REF",
        default=None,
        help="which image of the source: a ref name or manifest digest (docker-archive: NAME:TAG)",
    )
    p.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        default=None,
        help="which manifest of an image index (default: this machine's)",
    )
    p.add_argument(
        "--format",
        choices=("oci", "oci-archive", "docker-archive"),
        default=None,
        help="the source's format (default: detected)",
    )
    p.add_argument(
        "--parallel-apply",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply the layers of an OCI layout at the same time, each in a worker process (default: "
        "on where the driver applies each layer into its own directory and two or more layers are big)",
    )

    add(
        sub,
        "images",
        cmd_images,
        "list the images: names, id, created, layers, size",
        "  graphdriver images\n  graphdriver --json images",
    )

    p = add(
        sub,
        "tag",
        cmd_tag,
        "give an image another name (taken from the image that had it)",
        "  graphdriver tag app:1 registry.example.com/app:stable",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("name", metavar="NAME:TAG")

    p = add(
        sub,
        "layers",
        cmd_layers,
        "list the layers (with --tree: as a tree, with the images and containers on each)",
        "  graphdriver layers --tree",
    )
    p.add_argument("--tree", action="store_true", help="show parents and children as a tree")

    p = add(
        sub,
        "rmi",
        cmd_rmi,
        "remove an image name, or the image (by id, digest or its last name), and every layer no "
        "image or container uses any more",
        "  graphdriver rmi app:1",
    )
    p.add_argument("image", metavar="IMAGE", nargs="+")

    p = add(
        sub,
        "create-container",
        cmd_create_container,
        "create a container: a read-write layer on the image's top layer",
        "  graphdriver create-container app:1 --name web\n  graphdriver container-mount web",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--name", metavar="N", required=True, help="the container's name")

    add(sub, "containers", cmd_containers, "list the containers", "  graphdriver containers")

    p = add(
        sub,
        "container-mount",
        cmd_container_mount,
        "mount a container's root filesystem and print its path (counts persist across invocations)",
        "  path=$(graphdriver container-mount web)",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--mount-label", metavar="L", default="", help="SELinux mount label (context=)")

    p = add(
        sub,
        "container-unmount",
        cmd_container_unmount,
        "release one mount of a container; the last one unmounts it",
        "  graphdriver container-unmount web",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--force", action="store_true", help="release every mount at once")

    p = add(
        sub,
        "rm-container",
        cmd_rm_container,
        "remove a container and its layer (not while mounted)",
        "  graphdriver rm-container web",
    )
    p.add_argument("name", metavar="NAME")

    p = add(
        sub,
        "commit",
        cmd_commit,
        "turn a container's changes into a new image layer and a new image",
        "  graphdriver commit web app:2 -m 'add config'",
    )
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("image_name", metavar="NAME:TAG", nargs="?", default=None)
    p.add_argument("-m", "--message", default=None, help="a comment for the history entry")
    p.add_argument("--author", default=None)

    p = add(
        sub,
        "export",
        cmd_export,
        "write an image as an OCI layout directory, an oci-archive or a docker-archive; layer "
        "digests and diff IDs are the imported ones",
        "  graphdriver export app:1 -o app.tar --format docker-archive\n"
        "  graphdriver export app:1 -o ./layout --format oci --compression none",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument(
        "-o",
        "--output",
        metavar="DEST",
        required=True,
        help="a new file or directory (written completely or not at all)",
    )
    p.add_argument("--format", choices=("oci", "oci-archive", "docker-archive"), default="oci")
    p.add_argument(
        "--compression",
        choices=("none", "gzip"),
        default=None,
        help="layer compression (default: gzip, none for docker-archive)",
    )
    p.add_argument(
        "--docker-form",
        choices=("legacy", "oci"),
        default="legacy",
        help="docker-archive layout: legacy <id>/layer.tar, or Docker 25+ (OCI layout inside)",
    )

    add(
        sub,
        "df",
        cmd_df,
        "show the space used by images, containers and layers, and what prune frees",
        "  graphdriver df",
    )

    p = add(
        sub,
        "check",
        cmd_check,
        "report every inconsistency of the images, containers and layers (exit 1 if any remains)",
        "  graphdriver check\n  graphdriver check --repair",
    )
    p.add_argument("--repair", action="store_true", help="fix what can be fixed and say what was removed")
    p.add_argument(
        "--verify-content",
        action="store_true",
        help="also recompute every image layer's diff ID from the stored files (slow)",
    )

    add(sub, "prune", cmd_prune, "remove every layer no image or container uses", "  graphdriver prune")
