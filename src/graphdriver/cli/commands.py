"""One function per ``graphdriver`` subcommand: one library call, then printing.

Each command takes the :class:`Context` (global options, the lazily opened driver, the output
streams) and the parsed arguments, and returns the exit code. Errors are raised, never printed
here: :func:`graphdriver.cli.main.main` turns them into one ``graphdriver: error:`` line.

``--json`` output shapes (one JSON document on stdout):

=============  ==================================================================================
drivers        ``{"root", "selected", "selected_because", "drivers": [{"name", "supported",
               "reason", "priority"}]}``
status         ``{"driver", "root", "home", "status": {key: value}}``
create         ``{"id", "parent"}``
remove         ``{"id"}``
mount          ``{"id", "path"}``
unmount        ``{"id"}``
exists         ``{"id", "exists"}``
diff           ``{"id", "parent", "output", "compression", "bytes"}`` (needs ``-o``)
changes        ``{"id", "parent", "changes": [{"kind": "A"|"C"|"D", "path"}]}``
apply-diff     ``{"id", "parent", "bytes"}``
diff-size      ``{"id", "parent", "bytes"}``
cleanup        ``{"driver"}``
=============  ==================================================================================
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

from graphdriver.errors import InvalidArgument
from graphdriver.ids import validate_id, validate_parent

if TYPE_CHECKING:
    from graphdriver.drivers.base import Driver

COMPRESSIONS = ("none", "gzip", "zstd")
_COPY_CHUNK = 1 << 20


class Context:
    """Global options, the output streams and the driver, opened on first use."""

    def __init__(
        self,
        *,
        root: Path,
        driver_name: str | None,
        options: dict[str, str],
        json: bool,
        verbose: int,
        stdin: TextIO,
        stdout: TextIO,
        stderr: TextIO,
    ) -> None:
        self.root = root
        self.driver_name = driver_name
        self.options = options
        self.json = json
        self.verbose = verbose
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self._driver: Driver | None = None

    def driver(self) -> Driver:
        """The driver for ``root`` by the registry's selection rules (opened once)."""
        if self._driver is None:
            from graphdriver.drivers.registry import open_driver

            self._driver = open_driver(self.root, self.driver_name, self.options)
            self.debug(f"driver {self._driver.name} at {self._driver.home}")
        return self._driver

    def debug(self, message: str) -> None:
        if self.verbose:
            self.stderr.write(f"graphdriver: {message}\n")

    def emit(self, text: str | None, data: dict[str, Any]) -> None:
        """Print ``data`` as JSON with ``--json``, else ``text`` (if any) as a line."""
        if self.json:
            import json

            self.stdout.write(json.dumps(data, indent=None, sort_keys=False) + "\n")
        elif text is not None:
            self.stdout.write(text + "\n")


def _parent(ctx: Context, layer_id: str, given: str | None) -> str | None:
    """``--parent`` as given (``""`` means none), else the parent recorded at create.

    A driver that does not record parents (it keeps the contract's default ``parent_of``)
    cannot answer, and guessing "no parent" would silently diff the whole tree: the user must
    say which parent.
    """
    if given is not None:
        return validate_parent(given)
    driver = ctx.driver()
    from graphdriver.drivers.base import Driver

    if type(driver).parent_of is Driver.parent_of:
        raise InvalidArgument(
            f"the {driver.name} driver does not record parents: give --parent P (or --parent '' for none)"
        )
    return driver.parent_of(layer_id)


# -- drivers and status ----------------------------------------------------------------------------


def _selection(ctx: Context, supported: dict[str, bool]) -> tuple[str | None, str]:
    """Which driver ``open_driver`` would pick for this root, and why (without opening it)."""
    from graphdriver.drivers.registry import selected_driver

    return selected_driver(ctx.root, ctx.driver_name, supported)


def cmd_drivers(ctx: Context, args: argparse.Namespace) -> int:
    from graphdriver.drivers.registry import probe_drivers

    probes = probe_drivers(ctx.root)
    selected, because = _selection(ctx, {p.name: p.supported for p in probes})
    if ctx.json:
        ctx.emit(
            None,
            {
                "root": str(ctx.root),
                "selected": selected,
                "selected_because": because,
                "drivers": [
                    {"name": p.name, "supported": p.supported, "reason": p.reason, "priority": p.priority}
                    for p in probes
                ],
            },
        )
        return 0
    width = max(len(p.name) for p in probes)
    lines = [f"{'DRIVER':<{width}}  WORKS  PRIORITY  DETAILS"]
    for p in probes:
        prio = str(p.priority) if p.priority is not None else "-"
        lines.append(f"{p.name:<{width}}  {'yes' if p.supported else 'no':<5}  {prio:<8}  {p.reason}")
    lines.append("")
    lines.append(f"selected: {selected or 'none'} ({because})")
    ctx.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_status(ctx: Context, args: argparse.Namespace) -> int:
    driver = ctx.driver()
    pairs = driver.status()
    if ctx.json:
        ctx.emit(
            None,
            {"driver": driver.name, "root": str(ctx.root), "home": str(driver.home), "status": dict(pairs)},
        )
        return 0
    rows = [("Driver", driver.name), ("Root", str(ctx.root)), ("Home", str(driver.home)), *pairs]
    width = max(len(k) for k, _ in rows)
    ctx.stdout.write("".join(f"{k + ':':<{width + 1}} {v}\n" for k, v in rows))
    return 0


# -- layers ----------------------------------------------------------------------------------------


def cmd_create(ctx: Context, args: argparse.Namespace) -> int:
    layer_id = validate_id(args.id)
    parent = validate_parent(args.parent)
    ctx.driver().create(layer_id, parent)
    ctx.emit(None, {"id": layer_id, "parent": parent})
    return 0


def cmd_remove(ctx: Context, args: argparse.Namespace) -> int:
    layer_id = validate_id(args.id)
    ctx.driver().remove(layer_id)
    ctx.emit(None, {"id": layer_id})
    return 0


def cmd_mount(ctx: Context, args: argparse.Namespace) -> int:
    layer_id = validate_id(args.id)
    path = ctx.driver().get(layer_id, args.mount_label)
    ctx.emit(str(path), {"id": layer_id, "path": str(path)})
    return 0


def cmd_unmount(ctx: Context, args: argparse.Namespace) -> int:
    layer_id = validate_id(args.id)
    ctx.driver().put(layer_id)
    ctx.emit(None, {"id": layer_id})
    return 0


def cmd_exists(ctx: Context, args: argparse.Namespace) -> int:
    layer_id = validate_id(args.id)
    found = ctx.driver().exists(layer_id)
    ctx.emit(None, {"id": layer_id, "exists": found})
    return 0 if found else 1


def cmd_cleanup(ctx: Context, args: argparse.Namespace) -> int:
    driver = ctx.driver()
    driver.cleanup()
    ctx.emit(None, {"driver": driver.name})
    return 0


# -- diffs -----------------------------------------------------------------------------------------


def _copy(src: BinaryIO, dst: BinaryIO, compression: str) -> None:
    if compression == "none":
        _copy_plain(src, dst)
        return
    from graphdriver.archive.compression import open_compressed

    with open_compressed(dst, compression) as packed:
        _copy_plain(src, packed)


def _copy_plain(src: BinaryIO, dst: BinaryIO) -> None:
    read, write = src.read, dst.write
    while chunk := read(_COPY_CHUNK):
        write(chunk)


def cmd_diff(ctx: Context, args: argparse.Namespace) -> int:
    from graphdriver.cli.output import Progress, atomic_output, file_size

    layer_id = validate_id(args.id)
    to_stdout = args.output in (None, "-")
    if to_stdout and ctx.json:
        raise InvalidArgument("--json with diff needs -o FILE (the tar goes to stdout otherwise)")
    if to_stdout and ctx.stdout.isatty():
        raise InvalidArgument("refusing to write a tar archive to a terminal: use -o FILE or redirect stdout")
    driver = ctx.driver()
    parent = _parent(ctx, layer_id, args.parent)
    if to_stdout:
        ctx.stdout.flush()
        with driver.diff(layer_id, parent) as stream:
            _copy(stream, ctx.stdout.buffer, args.compression)
        ctx.stdout.buffer.flush()
        return 0
    with atomic_output(args.output) as out:
        with driver.diff(layer_id, parent) as stream, Progress(
            ctx.stderr, f"writing {args.output}", file_size(out.fileno())
        ):
            _copy(stream, out, args.compression)
        out.flush()
        written = os.fstat(out.fileno()).st_size
    ctx.emit(
        None,
        {"id": layer_id, "parent": parent, "output": args.output, "compression": args.compression,
         "bytes": written},
    )
    return 0


def cmd_changes(ctx: Context, args: argparse.Namespace) -> int:
    layer_id = validate_id(args.id)
    parent = _parent(ctx, layer_id, args.parent)
    changes = sorted(ctx.driver().changes(layer_id, parent), key=lambda c: c.path)
    if ctx.json:
        ctx.emit(
            None,
            {"id": layer_id, "parent": parent,
             "changes": [{"kind": c.kind.letter, "path": c.path} for c in changes]},
        )
    else:
        ctx.stdout.write("".join(f"{c.kind.letter} {c.path}\n" for c in changes))
    return 0


def cmd_apply_diff(ctx: Context, args: argparse.Namespace) -> int:
    layer_id = validate_id(args.id)
    if args.file in (None, "-"):
        if ctx.stdin.isatty():
            raise InvalidArgument("refusing to read a layer tar from a terminal: give FILE or pipe it in")
        return _apply(ctx, layer_id, args.parent, ctx.stdin.buffer, None)
    with open(args.file, "rb") as tar:
        return _apply(ctx, layer_id, args.parent, tar, args.file)


def _apply(ctx: Context, layer_id: str, given_parent: str | None, tar: BinaryIO, label: str | None) -> int:
    from graphdriver.cli.output import Progress, file_position

    driver = ctx.driver()
    parent = _parent(ctx, layer_id, given_parent)
    if label is None:
        size = driver.apply_diff(layer_id, parent, tar)
    else:
        with Progress(ctx.stderr, f"applying {label}", file_position(tar.fileno())):
            size = driver.apply_diff(layer_id, parent, tar)
    ctx.emit(str(size), {"id": layer_id, "parent": parent, "bytes": size})
    return 0


def cmd_diff_size(ctx: Context, args: argparse.Namespace) -> int:
    layer_id = validate_id(args.id)
    parent = _parent(ctx, layer_id, args.parent)
    size = ctx.driver().diff_size(layer_id, parent)
    ctx.emit(str(size), {"id": layer_id, "parent": parent, "bytes": size})
    return 0
