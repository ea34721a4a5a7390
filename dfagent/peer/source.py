"""Source locations: where a chunk lives when no peer has it, and the backends that read there.

A local-API request names, for each chunk, its *source location* (JSON, docs/api.md): the
image's registry repository, S3 bucket/prefix, or blob directory. The agent reads the chunk's
compressed extent from there with nydusfs's own storage backends (``nydusfs.storage.
create_backend``: the same retry/timeout stack, the same error contract), using the *node's*
credentials from the agent config, never any the requester could send. One backend per
distinct location is kept for the agent's life, so connections and registry tokens are reused.

Locations come from a local client (the Unix socket is the trust boundary: whoever can
connect may make the agent read from a registry, bucket or directory it names, with the
node's credentials) and are validated here where they enter; errors are
:class:`~dfagent.errors.RequestError` naming the field.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dfagent.errors import RequestError
from dfagent.peer.config import SourceConfig
from nydusfs.config import BackendConfig, LocalFsConfig, RegistryConfig, S3Config
from nydusfs.errors import ConfigError
from nydusfs.storage import BACKENDS, CountingBackend, create_backend

__all__ = ["SourceLocation", "SourcePool", "parse_location"]

SOURCE_TYPES = ("registry", "s3", "localfs")
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")


@dataclass(frozen=True, slots=True)
class SourceLocation:
    """One image source; hashable, so it keys the backend cache. Unused fields are None."""

    type: str
    host: str | None = None  # registry
    repository: str | None = None
    plain_http: bool | None = None
    insecure_skip_verify: bool = False  # registry, s3
    bucket: str | None = None  # s3
    endpoint: str | None = None
    region: str | None = None
    prefix: str | None = None
    addressing: str | None = None
    dir: str | None = None  # localfs

    def describe(self) -> str:
        if self.type == "registry":
            return f"registry {self.host}/{self.repository}"
        if self.type == "s3":
            return f"s3://{self.bucket}/{self.prefix or ''}"
        return f"localfs {self.dir}"

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if getattr(self, k) is not None}


def _opt_str(d: Mapping[str, object], key: str, where: str) -> str | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise RequestError(f"{where}.{key}: expected a non-empty string")
    return value


def _opt_bool(d: Mapping[str, object], key: str, where: str) -> bool | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise RequestError(f"{where}.{key}: expected true or false")
    return value


_FIELDS = {
    "registry": ("host", "repository", "plain_http", "insecure_skip_verify"),
    "s3": ("bucket", "endpoint", "region", "prefix", "addressing", "insecure_skip_verify"),
    "localfs": ("dir",),
}


def parse_location(raw: object, where: str) -> SourceLocation:
    """A validated :class:`SourceLocation` from decoded JSON."""
    if not isinstance(raw, dict):
        raise RequestError(f"{where}: expected a source location object")
    kind = raw.get("type")
    if kind not in SOURCE_TYPES:
        raise RequestError(f"{where}.type: expected one of {', '.join(SOURCE_TYPES)}, "
                           f"got {kind!r}")
    allowed = ("type", *_FIELDS[kind])
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise RequestError(f"{where}.{unknown[0]}: unknown field for a {kind} source")
    skip_verify = bool(_opt_bool(raw, "insecure_skip_verify", where))
    if kind == "registry":
        host = _opt_str(raw, "host", where)
        repo = _opt_str(raw, "repository", where)
        if host is None or not _HOST.fullmatch(host):
            raise RequestError(f"{where}.host: expected a registry host[:port]")
        if repo is None:
            raise RequestError(f"{where}.repository: required")
        return SourceLocation("registry", host=host, repository=repo,
                              plain_http=_opt_bool(raw, "plain_http", where),
                              insecure_skip_verify=skip_verify)
    if kind == "s3":
        bucket = _opt_str(raw, "bucket", where)
        if bucket is None:
            raise RequestError(f"{where}.bucket: required")
        addressing = _opt_str(raw, "addressing", where)
        if addressing not in (None, "path", "virtual"):
            raise RequestError(f"{where}.addressing: expected path or virtual")
        endpoint = _opt_str(raw, "endpoint", where)
        if endpoint is not None and not endpoint.startswith(("http://", "https://")):
            raise RequestError(f"{where}.endpoint: expected an http:// or https:// URL")
        prefix = raw.get("prefix") or ""
        if not isinstance(prefix, str):
            raise RequestError(f"{where}.prefix: expected a string")
        return SourceLocation("s3", bucket=bucket, endpoint=endpoint,
                              region=_opt_str(raw, "region", where), prefix=prefix.strip("/"),
                              addressing=addressing, insecure_skip_verify=skip_verify)
    d = _opt_str(raw, "dir", where)
    if d is None or not Path(d).is_absolute():
        raise RequestError(f"{where}.dir: expected an absolute directory path")
    return SourceLocation("localfs", dir=d)


class SourcePool:
    """One nydusfs backend per source location, built with the node's credentials."""

    def __init__(self, config: SourceConfig) -> None:
        self.config = config
        self._backends: dict[SourceLocation, CountingBackend] = {}

    def backend(self, loc: SourceLocation) -> CountingBackend:
        """The backend for ``loc`` (created on first use); ``RequestError`` when the
        location cannot make one (the message names the problem)."""
        be = self._backends.get(loc)
        if be is None:
            try:
                be = create_backend(self._backend_config(loc), image_dir=None)
            except ConfigError as exc:
                raise RequestError(f"source {loc.describe()}: {exc}") from exc
            self._backends[loc] = be
        return be

    def _backend_config(self, loc: SourceLocation) -> BackendConfig:
        c = self.config
        if loc.type == "registry":
            reg = RegistryConfig(host=loc.host, repository=loc.repository,
                                 plain_http=loc.plain_http,
                                 insecure_skip_verify=loc.insecure_skip_verify,
                                 ca_file=c.registry.ca_file, auth_file=c.registry.auth_file,
                                 username=c.registry.username, password=c.registry.password)
            return BackendConfig(type="registry", timeout=c.timeout, attempts=c.attempts,
                                 registry=reg)
        if loc.type == "s3":
            s3 = S3Config(bucket=loc.bucket or "", endpoint=loc.endpoint,
                          region=loc.region or "us-east-1", prefix=loc.prefix or "",
                          addressing=loc.addressing,
                          insecure_skip_verify=loc.insecure_skip_verify,
                          access_key_id=c.s3.access_key_id,
                          secret_access_key=c.s3.secret_access_key,
                          session_token=c.s3.session_token, ca_file=c.s3.ca_file)
            return BackendConfig(type="s3", timeout=c.timeout, attempts=c.attempts, s3=s3)
        return BackendConfig(type="localfs", timeout=c.timeout, attempts=c.attempts,
                             localfs=LocalFsConfig(dir=Path(loc.dir or "/nonexistent")))

    @staticmethod
    def preload() -> None:
        """Import the source backends and build the system CAs' TLS context now (blocking:
        run it in a thread at agent start).

        Why: the first source fetch paid both, about 0.3 s of CPU per agent under load, in
        the first seconds of an image's fan-out, when every agent does it at once on the
        same cores and the first leases are what everyone else waits for."""
        for name in ("registry", "s3", "localfs"):
            module_name = BACKENDS[name].partition(":")[0]
            importlib.import_module(module_name)
        from nydusfs.oci.client import default_ssl_context

        default_ssl_context()

    def stats(self) -> dict[str, dict[str, int]]:
        return {loc.describe(): {"reads": be.reads, "bytes": be.bytes_read}
                for loc, be in self._backends.items()}

    async def close(self) -> None:
        backends, self._backends = list(self._backends.values()), {}
        for be in backends:
            await be.close()
