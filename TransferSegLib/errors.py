"""The exceptions TransferSeg raises for problems a user can fix.

Every message is one sentence that names the file (or node, or setting) and says what to do.
The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TransferSegError(Exception):
    """Base class: a problem with the user's input, data or settings, not a bug."""


class InputError(TransferSegError):
    """An input file is missing, unreadable, of an unsupported kind, or has bad content."""


class GeometryError(TransferSegError):
    """Two images that must share a voxel grid do not."""


class ModelFileError(TransferSegError):
    """A TransferSeg model file is missing, truncated, corrupt or describes an unknown network."""


class OutputExistsError(TransferSegError):
    """An output path exists and overwriting was not asked for."""


class MissingSampleError(TransferSegError):
    """Sample data the caller needs has not been fetched yet."""
