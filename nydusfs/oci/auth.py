"""Registry authentication: where credentials come from, and how challenges are answered.

Registries authenticate the way the distribution spec and Docker Hub do, and this module
answers the same way docker does:

1. A request is sent with whatever authorization is already known (none at first).
2. A ``401`` carries ``WWW-Authenticate``. ``Basic realm=...`` -> send the credentials as
   HTTP Basic from then on. ``Bearer realm=...,service=...,scope=...`` -> ``GET realm?service=
   &scope=`` (with the credentials as Basic, or anonymously without any) returns a token
   (``{"token"|"access_token", "expires_in"}``), sent as ``Authorization: Bearer``.
3. Tokens are cached per (realm, service, scope set) until shortly before ``expires_in`` runs
   out (60 s when absent, as the spec says). A ``401`` for a request that carried a token drops
   it and fetches a new one once (the token expired or lacked a scope the challenge names);
   a second refusal is :class:`~nydusfs.errors.AuthError`.

Credentials, first found wins (:func:`find_credentials`): explicit username/password; the
environment ``NYDUSFS_REGISTRY_USERNAME`` / ``NYDUSFS_REGISTRY_PASSWORD``; then the docker-style
``auths`` file given as ``auth_file``, or else the first of ``$DOCKER_CONFIG/config.json`` (or
``~/.docker/config.json``), ``$REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR/containers/auth.json``
and ``~/.config/containers/auth.json`` with an entry for the registry. Entries hold base64
``auth`` ("user:password") or ``username``/``password``; ``credsStore``/``credHelpers`` and
``identitytoken`` (OAuth2 refresh tokens) are not used. Secrets never appear in messages or
reprs: errors name the *source* of the credentials and the user name.

Token responses are untrusted JSON: bounded in size by the caller, validated here
(:class:`~nydusfs.errors.FormatError`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from nydusfs.errors import AuthError, ConfigError, FormatError

__all__ = [
    "ENV_PASSWORD",
    "ENV_USERNAME",
    "MAX_TOKEN_RESPONSE",
    "Authenticator",
    "Challenge",
    "Credentials",
    "TokenCache",
    "default_auth_files",
    "find_credentials",
    "merge_scopes",
    "parse_challenges",
    "parse_token_response",
]

ENV_USERNAME = "NYDUSFS_REGISTRY_USERNAME"
ENV_PASSWORD = "NYDUSFS_REGISTRY_PASSWORD"
MAX_TOKEN_RESPONSE = 1 << 20  # bytes; real token responses are a few KiB
DEFAULT_EXPIRES_IN = 60  # seconds, when the token server does not say (distribution spec)
_DOCKER_HUB_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io")
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # visible ASCII: nothing that breaks a header


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and secret, and where they came from (for messages; never the secret)."""

    username: str
    password: str = field(repr=False)
    source: str  # "explicit credentials", "environment", "/root/.docker/config.json"

    def describe(self) -> str:
        return f"user {self.username!r} from {self.source}"

    def basic(self) -> str:
        """The ``Authorization`` header value for HTTP Basic."""
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


def default_auth_files(env: Mapping[str, str] | None = None,
                       home: Path | None = None) -> list[Path]:
    """Where docker, podman and skopeo keep credentials, in lookup order."""
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    files: list[Path] = []
    if env.get("DOCKER_CONFIG"):
        files.append(Path(env["DOCKER_CONFIG"]) / "config.json")
    else:
        files.append(home / ".docker" / "config.json")
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    files.append(home / ".config" / "containers" / "auth.json")
    return files


def _normalise_key(key: str) -> str:
    """``https://host:5000/v2/`` -> ``host:5000``; podman keys keep a repository path."""
    if "://" in key:
        parts = urlsplit(key)
        key = parts.netloc + parts.path
    key = key.strip("/")
    if key.endswith("/v1") or key.endswith("/v2"):
        key = key[:-3]
    return key


def _entry_credentials(entry: object, where: str) -> tuple[str, str] | None:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected an object")
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth + "=" * (-len(auth) % 4), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}.auth: not base64 of 'user:password'") from exc
        user, sep, password = decoded.partition(":")
        if not sep or not user:
            raise ConfigError(f"{where}.auth: not base64 of 'user:password'")
        return user, password
    name, secret = entry.get("username"), entry.get("password")
    if isinstance(name, str) and name and isinstance(secret, str):
        return name, secret
    return None  # identitytoken only, or an empty entry left by a credsStore


def _from_auth_file(path: Path, registry: str, repository: str | None) -> Credentials | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read credentials file: {exc}") from exc
    try:
        doc = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    auths = doc.get("auths")
    if auths is None:
        auths = {}
    if not isinstance(auths, dict):
        raise ConfigError(f"{path}: auths: expected an object")
    hosts = _DOCKER_HUB_KEYS if registry in _DOCKER_HUB_KEYS else (registry,)
    wanted = list(hosts)
    if repository:  # podman: "host/ns/repo" and "host/ns" entries beat "host"
        parts = repository.split("/")
        wanted = [f"{h}/{'/'.join(parts[:i])}" for h in hosts
                  for i in range(len(parts), 0, -1)] + wanted
    normalised: dict[str, tuple[str, object]] = {}
    for key, entry in auths.items():
        normalised.setdefault(_normalise_key(str(key)), (str(key), entry))
    for key in wanted:
        if key in normalised:
            original, entry = normalised[key]
            pair = _entry_credentials(entry, f"{path}: auths.{original}")
            if pair is not None:
                return Credentials(pair[0], pair[1], str(path))
    return None


def find_credentials(registry: str, *, repository: str | None = None,
                     username: str | None = None, password: str | None = None,
                     auth_file: Path | None = None, env: Mapping[str, str] | None = None,
                     home: Path | None = None) -> Credentials | None:
    """The credentials to use for ``registry`` (``host[:port]``), or ``None`` (anonymous).

    Lookup order in the module docstring. A credentials file that exists but cannot be read
    or parsed is a :class:`~nydusfs.errors.ConfigError` naming it (as docker refuses too).
    """
    env = os.environ if env is None else env
    if username is not None:
        return Credentials(username, password or "", "explicit credentials")
    if env.get(ENV_USERNAME):
        return Credentials(env[ENV_USERNAME], env.get(ENV_PASSWORD, ""),
                           f"environment {ENV_USERNAME}/{ENV_PASSWORD}")
    files = [auth_file] if auth_file is not None else default_auth_files(env, home)
    if auth_file is not None and not auth_file.exists():
        raise ConfigError(f"{auth_file}: credentials file does not exist")
    for path in files:
        found = _from_auth_file(path, registry, repository)
        if found is not None:
            return found
    return None


# -- challenges and tokens -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: scheme (lowercase) and its parameters."""

    scheme: str
    params: Mapping[str, str]


_TOKEN68 = r"[A-Za-z0-9._~+/-]+=*"
_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"=][^\s,"]*)\s*(?:,|$)')
_SCHEME = re.compile(r"\s*,?\s*([A-Za-z][A-Za-z0-9_.-]*)(?:\s+|$)")


def parse_challenges(header: str) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` (RFC 7235): ``Bearer realm="...",service="...",scope="..."``.

    Lenient the way clients must be (registries differ in spacing and quoting); anything
    unparseable ends the list rather than raising.
    """
    out: list[Challenge] = []
    pos = 0
    while pos < len(header):
        m = _SCHEME.match(header, pos)
        if not m:
            break
        scheme = m.group(1).lower()
        pos = m.end()
        params: dict[str, str] = {}
        while pos < len(header):
            p = _PARAM.match(header, pos)
            if not p:
                t = re.match(rf"\s*{_TOKEN68}\s*(?:,|$)", header[pos:])
                if t and not params:
                    pos += t.end()
                break
            value = p.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[p.group(1).lower()] = value
            pos = p.end()
        out.append(Challenge(scheme, params))
    return out


def merge_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """Union of ``type:name:actions`` scopes, one per (type, name), sorted and canonical."""
    merged: dict[tuple[str, str], set[str]] = {}
    for scope in scopes:
        for part in scope.split():
            kind, _, rest = part.partition(":")
            name, _, actions = rest.rpartition(":")
            if not kind or not name:
                continue
            merged.setdefault((kind, name), set()).update(a for a in actions.split(",") if a)
    return tuple(f"{k}:{n}:{','.join(sorted(a))}" for (k, n), a in sorted(merged.items()))


def parse_token_response(body: bytes, where: str) -> tuple[str, float]:
    """``(token, expires_in seconds)`` from a token server's JSON; ``FormatError`` otherwise."""
    if len(body) > MAX_TOKEN_RESPONSE:
        raise FormatError(f"{where}: token response larger than {MAX_TOKEN_RESPONSE} bytes")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{where}: token response is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: token response: expected a JSON object")
    token = doc.get("token") or doc.get("access_token")
    if not isinstance(token, str) or not _TOKEN_CHARS.fullmatch(token):
        raise FormatError(f"{where}: token response has no usable token "
                          "(token/access_token must be a non-empty header-safe string)")
    expires = doc.get("expires_in", DEFAULT_EXPIRES_IN)
    if (not isinstance(expires, int | float) or isinstance(expires, bool)
            or not 0 < expires < 1e9):
        raise FormatError(f"{where}: token response: expires_in: expected positive seconds, "
                          f"got {expires!r}")
    return token, float(expires)


class TokenCache:
    """Bearer tokens by (realm, service, scopes), each until shortly before it expires.

    The margin (10 % of the lifetime, at most 30 s) covers clock skew and the time a request
    spends in flight. ``clock`` is injected so tests need not wait for expiry.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}

    def get(self, key: tuple[str, ...]) -> str | None:
        hit = self._tokens.get(key)
        if hit is None:
            return None
        token, until = hit
        if self.clock() >= until:
            del self._tokens[key]
            return None
        return token

    def put(self, key: tuple[str, ...], token: str, expires_in: float) -> None:
        self._tokens[key] = (token, self.clock() + expires_in - min(expires_in * 0.1, 30.0))

    def drop(self, key: tuple[str, ...], token: str | None = None) -> None:
        """Forget ``key`` (only if it still holds ``token``, when given)."""
        hit = self._tokens.get(key)
        if hit is not None and (token is None or hit[0] == token):
            del self._tokens[key]


# GET url with headers -> (status, body); the client supplies it with its retries and limits.
TokenFetch = Callable[[str, dict[str, str]], Awaitable[tuple[int, bytes]]]
# May credentials be sent to this realm URL (https, or plain HTTP that is allowed)?
RealmCheck = Callable[[str], bool]


class Authenticator:
    """Per-registry authorization state: the challenge seen, cached tokens, credentials.

    :meth:`authorization` gives the header for a request needing ``scopes``;
    :meth:`unauthorized` digests a 401 and says whether retrying with a new header may help.
    """

    def __init__(self, registry: str, credentials: Credentials | None, fetch: TokenFetch, *,
                 realm_ok: RealmCheck, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.credentials = credentials
        self.fetch = fetch
        self.realm_ok = realm_ok
        self.tokens = TokenCache(clock)
        self.challenge: Challenge | None = None
        self.tokens_fetched = 0  # for tests and logs
        self._learned: dict[tuple[str, ...], tuple[str, ...]] = {}  # our scopes -> merged
        self._locks: dict[tuple[str, ...], asyncio.Lock] = {}

    def describe(self) -> str:
        """Which credentials were tried, for error messages (never the secret)."""
        return self.credentials.describe() if self.credentials else "anonymous"

    def _key(self, scopes: tuple[str, ...]) -> tuple[str, ...]:
        assert self.challenge is not None
        p = self.challenge.params
        return (p.get("realm", ""), p.get("service", ""),
                *self._learned.get(scopes, merge_scopes(scopes)))

    async def authorization(self, scopes: tuple[str, ...]) -> str | None:
        """The ``Authorization`` value for a request needing ``scopes`` (None: send none)."""
        if self.challenge is None:
            return None
        if self.challenge.scheme == "basic":
            return self.credentials.basic() if self.credentials else None
        key = self._key(scopes)
        token = self.tokens.get(key)
        if token is None:
            # one fetch per scope set at a time: fifty concurrent reads share one token
            async with self._locks.setdefault(key, asyncio.Lock()):
                token = self.tokens.get(key)
                if token is None:
                    token = await self._fetch_token(key)
        return f"Bearer {token}"

    async def unauthorized(self, header: str | None, scopes: tuple[str, ...],
                           sent: str | None) -> bool:
        """Handle a 401 whose request carried ``sent``; True if a retry may now succeed."""
        challenges = parse_challenges(header or "")
        chosen = (next((c for c in challenges if c.scheme == "bearer"), None)
                  or next((c for c in challenges if c.scheme == "basic"), None))
        if chosen is None:
            return False
        if chosen.scheme == "basic":
            first = self.challenge is None or self.challenge.scheme != "basic"
            self.challenge = chosen
            return self.credentials is not None and (first or sent is None)
        if not chosen.params.get("realm"):
            raise AuthError(f"{self.registry}: Bearer challenge without a realm: {header!r}")
        self.challenge = chosen
        wanted = merge_scopes((*scopes, chosen.params.get("scope", "")))
        if wanted != merge_scopes(scopes):
            self._learned[scopes] = wanted
        key = self._key(scopes)
        if sent is not None and sent.startswith("Bearer "):
            self.tokens.drop(key, sent[len("Bearer "):])  # expired or short of a scope
        return True

    async def _fetch_token(self, key: tuple[str, ...]) -> str:
        realm, service, *scopes = key
        query = [("service", service)] if service else []
        query += [("scope", s) for s in scopes]
        url = realm + ("&" if "?" in realm else "?") + urlencode(query) if query else realm
        headers: dict[str, str] = {}
        if self.credentials is not None:
            if not self.realm_ok(realm):
                raise AuthError(f"{self.registry}: refusing to send {self.describe()} to token "
                                f"server {realm} over plain HTTP")
            headers["Authorization"] = self.credentials.basic()
        status, body = await self.fetch(url, headers)
        if status in (401, 403):
            raise AuthError(f"{self.registry}: token server {realm} refused "
                            f"{self.describe()} (HTTP {status})")
        if status != 200:
            raise AuthError(f"{self.registry}: token server {realm} answered HTTP {status}")
        token, expires_in = parse_token_response(body, f"{self.registry}: token server {realm}")
        self.tokens.put(tuple(key), token, expires_in)
        self.tokens_fetched += 1
        return token
