"""The nydusfs exception tree.

Every error nydusfs raises on purpose is a :class:`NydusfsError`, so the CLI can print one clear
line and exit non-zero instead of a traceback. Foreign exceptions (``OSError`` from the disk,
``tarfile.TarError``, ``zstandard.ZstdError``) are translated where the library is called::

    NydusfsError
    ├── FormatError          a bootstrap or blob is malformed (untrusted input failed a check)
    │   └── IntegrityError   bytes do not match their digest (chunk, blob, Merkle node)
    ├── SourceError          a build input is unusable (bad tar, bad OCI layout, missing path)
    ├── BuildError           the build itself cannot proceed (bad option, name too long, ...)
    ├── ConfigError          a configuration value is invalid; the message names the field
    └── StorageError         a backend could not deliver blob bytes
        ├── NotFoundError    the blob (or range) does not exist there: retrying will not help
        ├── UnavailableError transient: timeout, connection refused, 5xx; retry with backoff
        └── RegistryError    a registry refused in a way retrying will not fix (HTTP 4xx)
            └── AuthError    401/403 after every credential there was (never shows secrets)

Later layers (storage backends, the OCI client) keep *not found*, *unavailable (retry)* and
*integrity* apart by subclassing here; ``IntegrityError`` is already separate so a reader can tell
"this chunk is corrupt" (never retry the same bytes, never serve them) from "this file is broken".
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BuildError",
    "ConfigError",
    "FormatError",
    "IntegrityError",
    "NotFoundError",
    "NydusfsError",
    "RegistryError",
    "SourceError",
    "StorageError",
    "UnavailableError",
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


class StorageError(NydusfsError):
    """A storage backend could not deliver the requested blob bytes."""


class NotFoundError(StorageError):
    """The blob (or the requested range of it) does not exist in that backend. Final."""


class UnavailableError(StorageError):
    """A transient failure (timeout, refused connection, 5xx, EIO): worth retrying later."""


class RegistryError(StorageError):
    """An OCI registry said no in a way retrying will not fix: denied, unsupported, bad request.

    The message carries the HTTP status and the registry's error code (``DENIED``,
    ``MANIFEST_INVALID``, ...). 404s are :class:`NotFoundError`, 429/5xx after the retries
    :class:`UnavailableError`.
    """


class AuthError(RegistryError):
    """401/403 after trying the credentials there are; the message says which were tried
    (anonymous, a config file entry, explicit, environment), never the secret itself."""
