"""The ``graphdriver`` command line: a thin layer over the library.

:mod:`.main` parses arguments and maps errors to exit codes, :mod:`.commands` holds one small
function per subcommand, :mod:`.output` the terminal-aware I/O helpers (atomic ``-o`` files,
progress on stderr). Nothing here holds storage logic: every command is one library call plus
printing. Only :func:`main` is public.
"""

from graphdriver.cli.main import main

__all__ = ["main"]
