"""Image references as docker writes them: ``[registry/]repository[:tag][@digest]``.

A reference is user input (a command-line argument), so :meth:`Reference.parse` validates it
against the distribution grammar and raises :class:`~nydusfs.errors.ConfigError` with the text
on failure; nothing downstream re-checks it. Rules, as ``docker pull`` applies them:

- the first ``/``-separated component is a registry when it contains ``.`` or ``:`` or is
  ``localhost``; otherwise the registry is ``docker.io`` and a one-component repository gets
  ``library/`` (``python`` -> ``docker.io/library/python``). ``index.docker.io`` is ``docker.io``.
- repositories are lowercase path components (``[a-z0-9]+`` joined by ``.``, ``_``, ``__`` or
  runs of ``-``), 255 characters at most in all;
- a tag is ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``; without tag or digest the tag is ``latest``;
- digests are ``sha256:<64 lowercase hex>`` (the only algorithm registries use in practice).

The registry stays ``docker.io`` here; only the HTTP client maps it to
``registry-1.docker.io``. ``str(ref)`` always spells the registry, so it round-trips.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from nydusfs.errors import ConfigError

__all__ = ["DOCKER_HUB", "Reference"]

DOCKER_HUB = "docker.io"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# host name, IPv4 or bracketed IPv6, optional port
_REGISTRY = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                       r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_MAX_NAME = 255


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed, validated image reference; see the module docstring for the grammar."""

    registry: str  # "docker.io", "ghcr.io", "127.0.0.1:5000"
    repository: str  # "library/python"
    tag: str | None  # None when only a digest was given
    digest: str | None  # "sha256:<hex>" or None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse ``text``; raise ``ConfigError("...: invalid image reference ...")``."""

        def bad(why: str) -> ConfigError:
            return ConfigError(f"{text!r}: invalid image reference: {why}")

        if not isinstance(text, str) or not text:
            raise bad("empty")
        if text != text.strip() or any(c.isspace() for c in text):
            raise bad("contains whitespace")
        rest, digest = text, None
        if "@" in rest:
            rest, _, digest = rest.partition("@")
            if not _DIGEST.fullmatch(digest):
                raise bad(f"digest {digest!r} is not sha256:<64 lowercase hex digits>")
        name, tag = rest, None
        last_slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > last_slash:  # a ':' after the last '/' starts the tag (not a port)
            name, tag = rest[:colon], rest[colon + 1:]
            if not _TAG.fullmatch(tag):
                raise bad(f"tag {tag!r} is not [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")
        if not name:
            raise bad("no repository")
        first, sep, remainder = name.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"
                    or first.startswith("[")):
            registry, repository = first, remainder
            if not _REGISTRY.fullmatch(registry):
                raise bad(f"registry {registry!r} is not host[:port]")
            port = registry.rpartition(":")[2] if not registry.endswith("]") else ""
            if ":" in registry and port.isdigit() and not 0 < int(port) < 65536:
                raise bad(f"registry port {port} out of range")
        else:
            registry, repository = DOCKER_HUB, name
        if registry == "index.docker.io":
            registry = DOCKER_HUB
        if registry == DOCKER_HUB and "/" not in repository:
            repository = f"library/{repository}"
        if not _REPOSITORY.fullmatch(repository):
            why = ("repository names must be lowercase" if repository.lower() != repository
                   else f"repository {repository!r} is not lowercase path components")
            raise bad(why)
        if len(registry) + 1 + len(repository) > _MAX_NAME:
            raise bad(f"name longer than {_MAX_NAME} characters")
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, repository, tag, digest)

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when there is one, else the tag."""
        if self.digest is not None:
            return self.digest
        assert self.tag is not None  # parse() gives every reference a tag or a digest
        return self.tag

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    def with_tag(self, tag: str) -> Reference:
        """The same repository at ``tag`` (and no digest)."""
        if not _TAG.fullmatch(tag):
            raise ConfigError(f"{tag!r}: invalid image reference: tag is not "
                              "[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
        return replace(self, tag=tag, digest=None)

    def with_digest(self, digest: str) -> Reference:
        """The same repository pinned to ``digest`` (the tag is kept for display)."""
        if not _DIGEST.fullmatch(digest):
            raise ConfigError(f"{digest!r}: invalid image reference: digest is not "
                              "sha256:<64 lowercase hex digits>")
        return replace(self, digest=digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text
