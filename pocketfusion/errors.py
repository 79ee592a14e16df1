"""Typed errors. ``UserError`` and its subclasses are bad input: the CLI prints one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or usage: reported as a single ``error:`` line, exit status 2."""


class CheckpointError(UserError):
    """A model folder or weight file that cannot be loaded as asked."""


class ManifestError(UserError):
    """A manifest that is missing, of an unknown schema, or whose files fail their checksums."""


class MissingBackendError(UserError):
    """An optional dependency is not installed; the message names the extra to install."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by the CLI's handler: unwinds like Ctrl-C, so every staged
    output is removed on the way out (``artifact.staged_dir`` cleans up on any BaseException)."""
