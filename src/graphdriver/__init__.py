"""graphdriver: container image layers and root filesystems on copy-on-write backends.

The library is layered (see docs/ARCHITECTURE.md):

- :mod:`graphdriver.archive` -- the OCI/Docker layer tar format: apply (secure, whiteout-aware),
  export, change detection, compression.
- :mod:`graphdriver.drivers` -- the driver contract and its backends (vfs, overlay, overlay2, btrfs,
  fuse-overlayfs; aufs and devmapper as probes).
- :mod:`graphdriver.testing` -- the conformance suite every driver passes (a pytest plugin).
- :mod:`graphdriver.cli` -- the ``graphdriver`` command, a thin layer over the library.

Errors raised anywhere in the library derive from :class:`graphdriver.errors.GraphDriverError`.
"""

from graphdriver.errors import GraphDriverError

__version__ = "0.1.0"

__all__ = ["GraphDriverError", "__version__"]
