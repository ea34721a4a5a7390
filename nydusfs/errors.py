"""The nydusfs exception tree.

Every error nydusfs raises on purpose is a :class:`NydusfsError`, so the CLI can print one clear
line and exit non-zero instead of a traceback. Foreign exceptions (``OSError`` from the disk,
``tarfile.TarError``, ``zstandard.ZstdError``) are translated where the library is called::

    NydusfsError
    ├── FormatError          a bootstrap or blob is malformed (untrusted input failed a check)
    │   └── IntegrityError   bytes do not match their digest (chunk, blob, Merkle node)
    ├── SourceError          a build input is unusable (bad tar, bad OCI layout, missing path)
    ├── BuildError           the build itself cannot proceed (bad option, name too long, ...)
    └── ConfigError          a configuration value is invalid; the message names the field

Later layers (storage backends, the OCI client) keep *not found*, *unavailable (retry)* and
*integrity* apart by subclassing here; ``IntegrityError`` is already separate so a reader can tell
"this chunk is corrupt" (never retry the same bytes, never serve them) from "this file is broken".
"""

from __future__ import annotations

__all__ = [
    "BuildError",
    "ConfigError",
    "FormatError",
    "IntegrityError",
    "NydusfsError",
    "SourceError",
]


class NydusfsError(Exception):
    """Base of every error nydusfs raises deliberately."""


class FormatError(NydusfsError):
    """A bootstrap (or blob) is malformed: an offset, length, count or value failed a check."""


class IntegrityError(FormatError):
    """Bytes do not match the digest that names them (a chunk, a blob, a Merkle node)."""


class SourceError(NydusfsError):
    """A build input (directory, tar layer, OCI layout) cannot be used as given."""


class BuildError(NydusfsError):
    """The build cannot proceed (invalid option, an entry the format cannot represent)."""


class ConfigError(NydusfsError):
    """A configuration value is invalid; the message starts with the field's dotted path."""
