"""Filesystem helpers below the archive and the drivers: in-root path resolution, safe removal,
copying with reflinks, xattrs, syncing."""
