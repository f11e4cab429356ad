"""The error hierarchy of graphdriver.

Every error the library raises on purpose derives from :class:`GraphDriverError`, so a caller can
catch one class. The CLI maps each class to a one-line message and an exit code (``exit_code``):
1 any other error, 2 usage (argparse), 3 NotFound, 4 AlreadyExists, 5 InvalidArgument,
6 NotSupported, 7 Busy, 8 PermissionDenied, 9 MountError, 10 ArchiveError, 11 DigestMismatch,
12 StoreCorrupt, 13 RegistryError.

::

    GraphDriverError
    +-- NotFound              a layer, image or file that should exist does not
    +-- AlreadyExists         create of an id that is taken
    +-- InvalidArgument       a malformed id, option or reference
    +-- NotSupported          the driver cannot work on this machine (``reason`` says why)
    |   +-- PrerequisitesNotMet    e.g. btrfs driver on a root that is not btrfs
    |   +-- IncompatibleFilesystem e.g. overlay on a backing filesystem without d_type
    +-- Busy                  in use: mounted, has children, locked by another process
    +-- PermissionDenied      the operation needs a privilege this process lacks
    +-- MountError            the kernel refused a mount or unmount
    +-- ArchiveError          a layer archive that cannot be applied
    |   +-- InvalidArchive         malformed tar, bad header, unknown type, invalid whiteout
    |   |   +-- BreakoutError      an entry, link or whiteout aimed outside the layer root
    |   |   +-- CorruptStream      truncated data, bad checksum, bad gzip/zstd trailer
    |   +-- LimitExceeded          a configured limit (bytes, entries, depth...) was passed
    +-- DigestMismatch        content does not match its digest or size
    +-- StoreCorrupt          the layer store's metadata is inconsistent
    +-- RegistryError         a registry could not be reached or kept failing

Internal signals, never raised to a caller of the layer store or the CLI:
``graphdriver.archive.apply.LowerLayersNeeded`` (a GraphDriverError) tells the store that a layer
applied in parallel needs its lower layers complete; the store applies it again after them.
"""

from __future__ import annotations


class GraphDriverError(Exception):
    """Base class of every error graphdriver raises on purpose."""

    exit_code: int = 1


class NotFound(GraphDriverError):
    """A layer, image or path that should exist does not."""

    exit_code = 3


class AlreadyExists(GraphDriverError):
    """An id or name is already taken."""

    exit_code = 4


class InvalidArgument(GraphDriverError):
    """A malformed id, option, reference or argument."""

    exit_code = 5


class NotSupported(GraphDriverError):
    """The driver cannot work here; ``reason`` says what is missing."""

    exit_code = 6

    def __init__(self, reason: str, driver: str | None = None) -> None:
        self.reason = reason
        self.driver = driver
        super().__init__(f"{driver}: {reason}" if driver else reason)


class PrerequisitesNotMet(NotSupported):
    """A prerequisite of the driver is missing (e.g. the root is not on the right filesystem)."""


class IncompatibleFilesystem(NotSupported):
    """The backing filesystem cannot carry this driver (e.g. no d_type)."""


class Busy(GraphDriverError):
    """The object is in use: mounted, has children, or locked by another process."""

    exit_code = 7


class PermissionDenied(GraphDriverError):
    """The operation needs a privilege this process does not have."""

    exit_code = 8


class MountError(GraphDriverError):
    """The kernel refused a mount or an unmount."""

    exit_code = 9


class ArchiveError(GraphDriverError):
    """A layer archive could not be applied or produced."""

    exit_code = 10


class InvalidArchive(ArchiveError):
    """A malformed archive: bad header, unknown entry type, invalid whiteout, bad name."""

    def __init__(self, message: str, entry: str | None = None) -> None:
        self.entry = entry
        super().__init__(f"{message}: {entry!r}" if entry is not None else message)


class BreakoutError(InvalidArchive):
    """An entry, link target or whiteout that would reach outside the layer root."""


class CorruptStream(InvalidArchive):
    """A truncated or corrupt stream: short data, bad header checksum, bad compression trailer."""


class LimitExceeded(ArchiveError):
    """A configured extraction limit was exceeded (decompressed bytes, entries, depth, ...)."""


class DigestMismatch(GraphDriverError):
    """Content does not match its expected digest or size."""

    exit_code = 11


class StoreCorrupt(GraphDriverError):
    """The layer store's metadata is inconsistent with what is on disk."""

    exit_code = 12


class RegistryError(GraphDriverError):
    """A registry could not be reached, or kept failing after the retries."""

    exit_code = 13
