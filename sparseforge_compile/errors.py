"""The errors a user can act on: each message names the file, layer or value and the fix.

A leaf module (it imports nothing of ours), so every room raises the same types and the CLI catches
them all as :class:`SparseForgeError`, printed as one line.
"""

from __future__ import annotations


class SparseForgeError(Exception):
    """Base of every error whose message is meant for the user as it is."""


class UsageError(SparseForgeError, RuntimeError):
    """Bad input a user can fix; printed as one line."""


class ModelLoadError(SparseForgeError, RuntimeError):
    """A model could not be loaded; the message says what to do."""


class DataError(SparseForgeError, RuntimeError):
    """Input data is missing or unusable; the message says what to provide."""


class CaptureError(SparseForgeError, RuntimeError):
    """The model could not be captured; the message names the construct and the way around it."""


class PruneError(SparseForgeError, RuntimeError):
    """A layer could not be pruned; the message names it, its shape and what to change."""


class AnnealError(SparseForgeError, RuntimeError):
    """The annealing run cannot go on; the message says why and what was kept."""


class RecipeError(SparseForgeError, ValueError):
    """A recipe or setting is unknown or out of range; the message names the file (or flag) and the key."""


class CheckpointError(SparseForgeError, ValueError):
    """A checkpoint cannot be written or read; the message names the file or tensor and the fix."""


class NMViolationError(SparseForgeError, ValueError):
    """A weight that is not N:M reached the lowering."""
