"""``graphdriver``: argument parsing, dispatch and the mapping of errors to exit codes.

Every failure ends as exactly one line ``graphdriver: error: <what>`` on stderr and a non-zero
exit status, never a traceback:

======================  ============================================================
usage errors            2 (argparse's convention; the line names the ``--help`` to read)
GraphDriverError        the class's ``exit_code`` (see :mod:`graphdriver.errors`)
OSError                 by errno: ENOENT 3, EEXIST 4, EINVAL 5, EBUSY 7, EACCES/EPERM/EROFS 8, else 1
KeyboardInterrupt       130
broken pipe on stdout   141, silently (``graphdriver changes x | head``)
anything else (a bug)   70, with the traceback only under ``-v``
======================  ============================================================

Startup is kept short: this module imports argparse and the error classes only; the driver
registry, the drivers and the archive code are imported by the command that needs them.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TextIO

from graphdriver import __version__
from graphdriver.cli import commands
from graphdriver.errors import (
    AlreadyExists,
    Busy,
    GraphDriverError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)

PROG = "graphdriver"

# argparse translates each of its own words with gettext.gettext, which looks for message catalogs
# on disk at every call: ~90 calls, a third of the time of building the parser. The answer cannot
# change within one process, so it is memoised.
argparse._ = functools.lru_cache(maxsize=None)(argparse._)  # type: ignore[attr-defined]
EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

_ERRNO_EXIT = {
    errno.ENOENT: NotFound.exit_code,
    errno.ENOTDIR: NotFound.exit_code,
    errno.EEXIST: AlreadyExists.exit_code,
    errno.ENOTEMPTY: AlreadyExists.exit_code,
    errno.EINVAL: InvalidArgument.exit_code,
    errno.EISDIR: InvalidArgument.exit_code,
    errno.EBUSY: Busy.exit_code,
    errno.EACCES: PermissionDenied.exit_code,
    errno.EPERM: PermissionDenied.exit_code,
    errno.EROFS: PermissionDenied.exit_code,
}

Command = Callable[[commands.Context, argparse.Namespace], int]


class _UsageError(Exception):
    """A command line that does not parse; becomes one error line and exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump) and raise instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


_GLOBAL_HELP = """\
Store container image layers and container root filesystems on copy-on-write backends
(vfs, overlay, overlay2, btrfs, fuse-overlayfs). Every command works on one storage root
and one driver; see 'graphdriver drivers' for what works on this machine.
"""

_GLOBAL_EPILOG = """\
examples:
  graphdriver drivers
  graphdriver create base && graphdriver apply-diff --parent '' base layer1.tar.gz
  graphdriver create --parent base ctr && graphdriver mount ctr
  graphdriver changes --parent base ctr

'--parent' defaults to the parent a layer was created on, where the driver records it (vfs does
not); '--parent ""' means none.

environment:
  GRAPHDRIVER_ROOT    default for --root
  GRAPHDRIVER_DRIVER  default for --driver
"""


def _storage_opt(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The global options, accepted before and after the command name.

    On the subcommands their defaults are suppressed, so that an option given before the
    command is not overwritten by the subcommand's default.
    """
    default: object = argparse.SUPPRESS
    g = parser.add_argument_group("global options")
    g.add_argument(
        "--root", metavar="DIR", default=None if top else default,
        help="storage root (env GRAPHDRIVER_ROOT; default /var/lib/graphdriver as root, "
        "$XDG_DATA_HOME/graphdriver otherwise)",
    )
    g.add_argument(
        "--driver", metavar="NAME", default=None if top else default,
        help="storage driver (env GRAPHDRIVER_DRIVER; default: the driver already used under the root, "
        "else the first that works here)",
    )
    g.add_argument(
        "--storage-opt", metavar="KEY=VALUE", action="append", type=_storage_opt,
        default=[] if top else default, dest="storage_opt", help="driver option (repeatable)",
    )
    g.add_argument("--json", action="store_true", default=False if top else default,
                   help="print JSON instead of text")
    g.add_argument("-v", "--verbose", action="count", default=0 if top else default,
                   help="say which driver is used and how long the command took; tracebacks for bugs")


def _command(
    sub: argparse._SubParsersAction[_Parser], name: str, func: Command, summary: str, example: str
) -> _Parser:
    parser: _Parser = sub.add_parser(
        name, help=summary, description=summary, epilog="example:\n" + example,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_options(parser, top=False)
    parser.set_defaults(func=func)
    return parser


def _parent_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--parent", metavar="P", default=None,
        help=f"{what} (default: the parent the layer was created on, if the driver records it; "
        "'' for none: the whole tree)",
    )


def build_parser() -> _Parser:
    """The full argument parser (``graphdriver --help``)."""
    parser = _Parser(
        prog=PROG, description=_GLOBAL_HELP, epilog=_GLOBAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    _command(sub, "drivers", commands.cmd_drivers,
             "for every known driver: whether it works here (and why not), its priority, "
             "and which one would be selected",
             "  graphdriver drivers\n  graphdriver --root /srv/layers --json drivers")
    _command(sub, "status", commands.cmd_status,
             "show the selected driver, its home directory and its diagnostics",
             "  graphdriver --driver vfs status")

    p = _command(sub, "create", commands.cmd_create,
                 "create a layer, empty or with the content of a parent layer",
                 "  graphdriver create base\n  graphdriver create --parent base ctr")
    p.add_argument("--parent", metavar="P", default=None, help="the parent layer (default: none)")
    p.add_argument("id", metavar="ID", help="the new layer's id (1-128 of [A-Za-z0-9_.@+=-])")

    p = _command(sub, "remove", commands.cmd_remove,
                 "remove a layer and its storage (refused while it is mounted)",
                 "  graphdriver remove ctr")
    p.add_argument("id", metavar="ID")

    p = _command(sub, "mount", commands.cmd_mount,
                 "make the layer's full filesystem visible and print its path; every mount needs one "
                 "unmount (counts persist across invocations)",
                 "  path=$(graphdriver mount ctr)\n  ls \"$path\"\n  graphdriver unmount ctr")
    p.add_argument("--mount-label", metavar="L", default="", help="SELinux mount label (context=)")
    p.add_argument("id", metavar="ID")

    p = _command(sub, "unmount", commands.cmd_unmount,
                 "release one mount of the layer; the last one unmounts it",
                 "  graphdriver unmount ctr")
    p.add_argument("id", metavar="ID")

    p = _command(sub, "exists", commands.cmd_exists,
                 "exit 0 if the layer exists, 1 if not (prints nothing without --json)",
                 "  graphdriver exists ctr || graphdriver create --parent base ctr")
    p.add_argument("id", metavar="ID")

    p = _command(sub, "diff", commands.cmd_diff,
                 "write the layer's changes as an OCI layer tar (to stdout, or atomically to -o FILE)",
                 "  graphdriver diff --parent base -o ctr.tar.gz --compression gzip ctr\n"
                 "  graphdriver diff --parent base ctr | tar -tvf -")
    _parent_option(p, "diff against P")
    p.add_argument("-o", "--output", metavar="FILE", default=None,
                   help="write to FILE (complete or not at all) instead of stdout")
    p.add_argument("--compression", choices=commands.COMPRESSIONS, default="none",
                   help="compress the tar (default: none)")
    p.add_argument("id", metavar="ID")

    p = _command(sub, "changes", commands.cmd_changes,
                 "list the layer's changes, one 'A|C|D /path' line each (added, changed, deleted), "
                 "sorted by path",
                 "  graphdriver changes --parent base ctr")
    _parent_option(p, "compare with P")
    p.add_argument("id", metavar="ID")

    p = _command(sub, "apply-diff", commands.cmd_apply_diff,
                 "apply a layer tar (plain, gzip, zstd, bzip2 or xz) onto a freshly created layer "
                 "and print the size of its changes in bytes",
                 "  graphdriver create base && graphdriver apply-diff --parent '' base layer1.tar.gz\n"
                 "  curl -s URL | graphdriver apply-diff --parent base app -")
    _parent_option(p, "the layer's parent, to measure the changes against")
    p.add_argument("id", metavar="ID")
    p.add_argument("file", metavar="FILE", nargs="?", default=None,
                   help="the layer tar, or - for stdin (the default)")

    p = _command(sub, "diff-size", commands.cmd_diff_size,
                 "print the size in bytes of the layer's changes",
                 "  graphdriver diff-size --parent base ctr")
    _parent_option(p, "compare with P")
    p.add_argument("id", metavar="ID")

    _command(sub, "cleanup", commands.cmd_cleanup,
             "unmount everything the driver mounted under this root (mount counts are reset)",
             "  graphdriver cleanup")

    # the image store and registry commands live in their own modules (imported lazily inside)
    from graphdriver.cli import image_commands, registry_commands

    image_commands.register(sub, _command)
    registry_commands.register(sub, _command)
    return parser


def _fail(stderr: TextIO, message: str) -> None:
    line = " ".join(message.split("\n")).strip() or "unknown error"
    stderr.write(f"{PROG}: error: {line}\n")
    stderr.flush()


def _os_error(exc: OSError) -> tuple[str, int]:
    reason = exc.strerror or str(exc)
    if exc.filename is not None and exc.filename2 is not None:
        message = f"{exc.filename} -> {exc.filename2}: {reason}"
    elif exc.filename is not None:
        message = f"{exc.filename}: {reason}"
    else:
        message = reason
    return message, _ERRNO_EXIT.get(exc.errno or 0, 1)


def _silence_stdout(stdout: TextIO) -> None:
    """After EPIPE: point stdout at /dev/null so the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run one ``graphdriver`` command line and return its exit status."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        _fail(stderr, str(exc))
        return EXIT_USAGE
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0

    verbose: int = args.verbose
    try:
        if args.root is not None and not args.root:
            raise InvalidArgument("--root must not be empty")
        if args.root:
            root = Path(os.path.abspath(args.root))
        else:
            from graphdriver.drivers.registry import default_root

            root = default_root()
        ctx = commands.Context(
            root=root, driver_name=args.driver or None, options=dict(args.storage_opt),
            json=args.json, verbose=verbose, stdin=stdin, stdout=stdout, stderr=stderr,
        )
        func: Command = args.func
        if verbose:
            import time

            start = time.perf_counter()
            status = func(ctx, args)
            ctx.debug(f"{args.command} took {time.perf_counter() - start:.3f} s")
        else:
            status = func(ctx, args)
        stdout.flush()
        return status
    except BrokenPipeError:
        _silence_stdout(stdout)
        return EXIT_BROKEN_PIPE
    except GraphDriverError as exc:
        _fail(stderr, str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _fail(stderr, "interrupted")
        return EXIT_INTERRUPTED
    except OSError as exc:
        message, status = _os_error(exc)
        if verbose:
            import traceback

            traceback.print_exc(file=stderr)
        _fail(stderr, message)
        return status
    except Exception as exc:
        if verbose:
            import traceback

            traceback.print_exc(file=stderr)
        _fail(stderr, f"internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)")
        return EXIT_INTERNAL
