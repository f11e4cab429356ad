"""``graphdriver pull`` and ``graphdriver push``: the registry commands.

Wired into the parser by :func:`register` (``registry_commands.register(sub, _command)`` in
:func:`graphdriver.cli.main.build_parser`, passing its ``_command`` helper so that the global
options work after the command name too).

Progress goes to stderr: one live line per blob when stderr is a terminal; with ``--json``, one
JSON object per line (:mod:`graphdriver.registry.progress`), and the result as one JSON document
on stdout:

=====  ================================================================================================
pull   ``{"reference", "digest", "index_digest", "image", "config", "platform", "top_layer",
       "layers": [{"digest", "size", "diff_id", "chain_id", "id", "downloaded"}]}``
push   ``{"reference", "digest", "config": {...}, "layers": [{"digest", "size", "media_type",
       "action": "exists"|"mounted"|"uploaded", "from"?}]}``
=====  ================================================================================================
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphdriver.cli.commands import Context
    from graphdriver.images.imagestore import ImageStore
    from graphdriver.registry.progress import Sink

__all__ = ["cmd_pull", "cmd_push", "register"]

CommandMaker = Callable[..., argparse.ArgumentParser]

_REGISTRY_EPILOG = (
    "credentials: the 'auths' of $REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json or\n"
    "$DOCKER_CONFIG/config.json (~/.docker/config.json), or --authfile FILE\n"
)


def register(sub: Any, command: CommandMaker) -> None:
    """Add ``pull`` and ``push`` to the subcommands ``sub`` with ``command(sub, name, func,
    summary, example)`` (main's helper, which adds the global options)."""
    p = command(
        sub, "pull", cmd_pull,
        "pull an image from a registry into the store: layers download in parallel and are applied "
        "as they arrive; layers the store has are not downloaded",
        "  graphdriver pull docker.io/library/busybox:latest\n"
        "  graphdriver pull --insecure --platform linux/arm64 127.0.0.1:5000/team/app:1.0\n\n"
        + _REGISTRY_EPILOG,
    )
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", default=None,
                   help="the platform to pull from a multi-platform image (default: this machine's)")
    _common(p)
    p.add_argument("--parallel", metavar="N", type=int, default=4,
                   help="blobs downloaded at once (default 4)")
    p.add_argument("--download-first", action="store_true",
                   help="download every blob before applying any (default: apply while downloading)")
    p.add_argument("--parallel-apply", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the missing layers at the same time, each in a worker process "
                        "(default: on for drivers that apply each layer into its own directory: "
                        "overlay2, fuse-overlayfs)")
    p.add_argument("reference", metavar="REF", help="[REGISTRY/]REPOSITORY[:TAG][@DIGEST]")

    p = command(
        sub, "push", cmd_push,
        "push an image of the store to a registry: blobs the registry has are not sent, blobs in "
        "another repository of the same registry are mounted",
        "  graphdriver push app:1.0 registry.example.com/team/app:1.0\n"
        "  graphdriver push --insecure --compression none app:1.0 127.0.0.1:5000/app:1.0\n\n"
        + _REGISTRY_EPILOG,
    )
    _common(p)
    p.add_argument("--compression", choices=("gzip", "none", "zstd"), default="gzip",
                   help="how layers the registry lacks are uploaded (default gzip, reproducible)")
    p.add_argument("--mount-from", metavar="REPO", action="append", default=[],
                   help="another repository of the target registry to mount blobs from (repeatable)")
    p.add_argument("image", metavar="IMAGE", help="the image in the store: a name or an image id")
    p.add_argument("reference", metavar="REF", help="[REGISTRY/]REPOSITORY[:TAG]")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--insecure", action="store_true",
                   help="speak plain HTTP to the registry (local registries)")
    p.add_argument("--authfile", metavar="FILE", default=None,
                   help="a config.json / auth.json to take credentials from first")


@contextmanager
def _store(ctx: Context) -> Iterator[ImageStore]:
    from graphdriver.images.imagestore import ImageStore

    with ImageStore.open(ctx.root, ctx.driver_name, ctx.options or None) as store:
        ctx.debug(f"store {store.layers.root} on {store.layers.driver.name}")
        yield store


@contextmanager
def _progress(ctx: Context) -> Iterator[Sink]:
    from graphdriver.registry.progress import JsonLines, TerminalProgress, null_sink

    if ctx.json:
        yield JsonLines(ctx.stderr)
        return
    if ctx.stderr.isatty():
        terminal = TerminalProgress(ctx.stderr)
        try:
            yield terminal
        finally:
            terminal.close()
        return
    yield null_sink


def cmd_pull(ctx: Context, args: argparse.Namespace) -> int:
    from graphdriver.errors import InvalidArgument
    from graphdriver.images.manifests import Platform
    from graphdriver.registry.pull import PullOptions, pull

    if args.parallel < 1:
        raise InvalidArgument("--parallel must be at least 1")
    options = PullOptions(
        platform=Platform.parse(args.platform) if args.platform else None,
        insecure=args.insecure,
        parallel=args.parallel,
        stream_apply=not args.download_first,
        parallel_apply=args.parallel_apply,
        auth_file=args.authfile,
    )
    with _store(ctx) as store, _progress(ctx) as sink:
        result = pull(store, args.reference, options, sink=sink)
    doc = result.to_json()
    fetched = sum(1 for la in doc["layers"] if la["downloaded"])
    ctx.emit(
        f"{doc['reference']}: image {doc['config']} (manifest {doc['digest']}); "
        f"{fetched} of {len(doc['layers'])} layer(s) downloaded",
        doc,
    )
    return 0


def cmd_push(ctx: Context, args: argparse.Namespace) -> int:
    from graphdriver.registry.push import PushOptions, push

    options = PushOptions(
        insecure=args.insecure,
        compression=args.compression,
        mount_from=tuple(args.mount_from),
        auth_file=args.authfile,
    )
    with _store(ctx) as store, _progress(ctx) as sink:
        result = push(store, args.image, args.reference, options, sink=sink)
    doc = result.to_json()
    actions = [la["action"] for la in doc["layers"]]
    counts = {a: actions.count(a) for a in ("uploaded", "mounted", "exists")}
    ctx.emit(
        f"{doc['reference']}: pushed manifest {doc['digest']}; layers: {counts['uploaded']} uploaded, "
        f"{counts['mounted']} mounted, {counts['exists']} already there",
        doc,
    )
    return 0
