"""A real OCI registry for tests: ``docker-registry`` (distribution 2.8) on a loopback port.

Tests (and benchmarks) push to and pull from the registry users run, not a mock of it. Three
modes, as real deployments are configured:

- ``auth=None``: anonymous read/write;
- ``auth="htpasswd"``: HTTP Basic, users in a bcrypt htpasswd file (distribution accepts bcrypt
  only; the file is written with the ``bcrypt`` package);
- ``auth="token"``: Bearer tokens (distribution's ``auth: token``), issued by
  :class:`TokenIssuer`, a small HTTP server in a thread that checks Basic credentials and
  signs RS256 JWTs with a throw-away key; its self-signed certificate is the registry's
  ``rootcertbundle`` and travels in each token's ``x5c`` header, which is how distribution 2.8
  finds the verifying key.

Every process is started by PID and stopped by PID (SIGTERM, SIGKILL after a grace period);
start-up waits (bounded) for ``/v2/`` to answer and raises with the log's tail otherwise.

:func:`push_oci_dirs` builds a multi-layer image from directories with umoci (one layer per
directory, deletions as real whiteouts computed by ``umoci repack``) and pushes it with skopeo.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "DELETE_LIST",
    "AccessEntry",
    "RegistryServer",
    "TokenIssuer",
    "free_port",
    "push_oci_dirs",
]

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
START_TIMEOUT = 15.0  # seconds for /v2/ to answer after the process started
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL

# A directory given to push_oci_dirs may hold this file (not itself put in the image): one path
# per line, relative to the image root (a leading "/" is fine), deleted in that layer.
DELETE_LIST = ".oci-delete"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- token issuer --------------------------------------------------------------------------

@dataclass
class TokenRequest:
    """One request the issuer answered (or refused), for tests to assert on."""

    account: str | None  # Basic user name, None when anonymous
    service: str | None
    scopes: list[str]
    status: int
    expired: bool = False  # the token handed out was already expired


class TokenIssuer:
    """Docker token-auth issuer (https://distribution.github.io/distribution/spec/auth/token/).

    ``GET /token?service=S&scope=repository:NAME:pull,push`` with Basic credentials of one of
    ``users`` gets every action it asked for; wrong credentials get 401; anonymous requests get
    ``pull`` when ``anonymous_pull`` and no access otherwise (the registry then refuses).
    ``expire_next`` makes the next N tokens already expired (the JWT's ``exp`` in the past while
    ``expires_in`` claims otherwise): the real registry then answers 401, as it does when a
    token runs out in the middle of a long transfer.
    """

    def __init__(self, workdir: Path, users: Mapping[str, str], *, service: str,
                 issuer: str = "nydusfs-test-issuer", lifetime: int = 300,
                 anonymous_pull: bool = False) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.users = dict(users)
        self.service = service
        self.issuer = issuer
        self.lifetime = lifetime
        self.anonymous_pull = anonymous_pull
        self.expire_next = 0
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        self._key_pem = key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        workdir.mkdir(parents=True, exist_ok=True)
        self.cert_file = workdir / "token-cert.pem"
        self.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def start(self) -> None:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = issuer._answer(self.path, self.headers.get("Authorization"))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="token issuer"')
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="token-issuer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _answer(self, path: str, authorization: str | None) -> tuple[int, dict[str, Any]]:
        import jwt

        query = parse_qs(urlsplit(path).query)
        service = query.get("service", [None])[0]
        scopes = [s for raw in query.get("scope", []) for s in raw.split(" ") if s]
        account: str | None = None
        if authorization:
            kind, _, cred = authorization.partition(" ")
            try:
                user, _, password = base64.b64decode(cred).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = "", ""
            if kind.lower() != "basic" or self.users.get(user) != password or not user:
                with self._lock:
                    self.requests.append(TokenRequest(user or None, service, scopes, 401))
                return 401, {"errors": [{"code": "UNAUTHORIZED",
                                         "message": "invalid credentials"}]}
            account = user
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            if account is None:
                wanted = [a for a in wanted if a == "pull" and self.anonymous_pull]
            access.append({"type": kind, "name": name, "actions": wanted})
        now = int(time.time())
        with self._lock:
            expired = self.expire_next > 0
            if expired:
                self.expire_next -= 1
            self.requests.append(TokenRequest(account, service, scopes, 200, expired))
        exp = now - 3600 if expired else now + self.lifetime
        claims = {"iss": self.issuer, "sub": account or "", "aud": service or self.service,
                  "exp": exp, "nbf": now - 3600 - 10 if expired else now - 10,
                  "iat": now - 3600 - 10 if expired else now, "jti": uuid.uuid4().hex,
                  "access": access}
        token = jwt.encode(claims, self._key_pem, algorithm="RS256",
                           headers={"x5c": [self._x5c]})
        return 200, {"token": token, "access_token": token, "expires_in": self.lifetime,
                     "issued_at": dt.datetime.fromtimestamp(now, dt.UTC).isoformat()}


# -- the registry --------------------------------------------------------------------------

@dataclass(frozen=True)
class AccessEntry:
    """One line of the registry's access log (Apache combined format)."""

    method: str
    path: str
    status: int
    size: int  # response body bytes


_ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) '
                     r'(?P<size>\d+|-)')


@dataclass
class RegistryServer:
    """A real docker-registry process on ``127.0.0.1:<free port>``; see the module docstring.

    ``host`` is ``"127.0.0.1:PORT"`` (valid after :meth:`start`), ``root`` the storage
    directory. Use as a context manager or call :meth:`start` / :meth:`stop`.
    """

    workdir: Path
    auth: Literal[None, "htpasswd", "token"] = None
    users: Mapping[str, str] = field(default_factory=lambda: {"alice": "wonderland"})
    anonymous_pull: bool = False  # token mode: anonymous tokens may pull
    service: str = "nydusfs-test-registry"
    host: str = ""
    issuer: TokenIssuer | None = None
    _proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.root = self.workdir / "data"
        self.log_file = self.workdir / "registry.log"  # application log (stderr)
        self.access_file = self.workdir / "access.log"  # access log (stdout)

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("registry already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        port = free_port()
        self.host = f"127.0.0.1:{port}"
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text"},
            "storage": {"filesystem": {"rootdirectory": str(self.root)},
                        "delete": {"enabled": True}},
            "http": {"addr": self.host, "secret": "nydusfs-test-secret"},
        }
        if self.auth == "htpasswd":
            import bcrypt

            lines = [f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}"
                     for u, p in self.users.items()]
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text("\n".join(lines) + "\n")
            config["auth"] = {"htpasswd": {"realm": "nydusfs-test", "path": str(htpasswd)}}
        elif self.auth == "token":
            self.issuer = TokenIssuer(self.workdir, self.users, service=self.service,
                                      anonymous_pull=self.anonymous_pull)
            self.issuer.start()
            config["auth"] = {"token": {"realm": self.issuer.realm, "service": self.service,
                                        "issuer": self.issuer.issuer,
                                        "rootcertbundle": str(self.issuer.cert_file)}}
        elif self.auth is not None:
            raise ValueError(f"unknown auth mode {self.auth!r}")
        cfg_file = self.workdir / "config.yml"
        cfg_file.write_text(json.dumps(config, indent=1))  # JSON is YAML
        with open(self.access_file, "wb") as out, open(self.log_file, "wb") as err:
            self._proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg_file)],
                                          stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited with {self._proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=1):
                    return
            except urllib.error.HTTPError as exc:
                if exc.code == 401:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"docker-registry did not answer /v2/ within {START_TIMEOUT}s:\n"
                           f"{self.log_tail()}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_GRACE)
        if self.issuer is not None:
            self.issuer.stop()

    def __enter__(self) -> RegistryServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def access_log(self) -> list[AccessEntry]:
        """Every request served so far, in order. The registry writes a request's line after
        its response went out, so a client can be a moment ahead of the log: this waits
        (bounded) until the log has stopped growing, and counts taken before and after a
        client's requests then hold exactly those requests (without the wait, a previous
        request's late line was sometimes counted as the next test's)."""
        length = -1
        for _ in range(100):
            now = self.access_file.stat().st_size if self.access_file.exists() else 0
            if now == length:
                break
            length = now
            time.sleep(0.05)
        out = []
        for line in self.access_file.read_text(errors="replace").splitlines():
            m = _ACCESS.search(line)
            if m:
                size = m["size"]
                out.append(AccessEntry(m["method"], m["path"], int(m["status"]),
                                       0 if size == "-" else int(size)))
        return out

    def blob_file(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes (tests corrupt it to check that
        clients verify digests)."""
        algo, _, hexd = digest.partition(":")
        return (self.root / "docker" / "registry" / "v2" / "blobs" / algo / hexd[:2] / hexd
                / "data")

    def credentials(self) -> tuple[str, str]:
        """The first user's (name, password)."""
        return next(iter(self.users.items()))


# -- building and pushing images -----------------------------------------------------------

def _run(cmd: Sequence[str | os.PathLike[str]]) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                           f"{proc.stderr.strip()}")
    return proc.stdout


def push_oci_dirs(host: str, ref: str, dirs: Sequence[Path], *,
                  config: Mapping[str, Any] | None = None,
                  creds: tuple[str, str] | None = None,
                  format: Literal["oci", "v2s2"] = "oci") -> str:
    """Build an image with one layer per directory and push it to ``host/ref``; return the
    manifest digest.

    Each directory's tree is copied over the image so far (``cp -a``: owners, modes, times,
    xattrs, hard links, devices kept; must run as root to keep owners) and becomes one layer
    via ``umoci repack``, so modified files appear whole and deleted paths as whiteouts.
    Deletions: a file named :data:`DELETE_LIST` at the top of a directory lists paths (one per
    line, relative to the image root) removed in that layer before its files are copied.
    ``config`` takes image-config keys: ``Cmd``, ``Entrypoint``, ``Env`` (lists), ``WorkingDir``,
    ``User``, ``ExposedPorts`` (list or mapping), ``Labels`` (mapping). ``format="v2s2"`` pushes
    a Docker v2 schema 2 manifest instead of OCI. ``creds`` are given to skopeo for registries
    with auth.
    """
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    with tempfile.TemporaryDirectory(prefix="oci-dirs-") as tmp:
        layout, bundle = Path(tmp) / "layout", Path(tmp) / "bundle"
        image = f"{layout}:{tag}"
        _run(["umoci", "init", "--layout", layout])
        _run(["umoci", "new", "--image", image])
        _run(["umoci", "unpack", "--image", image, bundle])
        rootfs = bundle / "rootfs"
        for d in dirs:
            d = Path(d)
            delete_list = d / DELETE_LIST
            if delete_list.exists():
                for line in delete_list.read_text().splitlines():
                    rel = line.strip().lstrip("/")
                    if not rel:
                        continue
                    victim = rootfs / rel
                    if victim.is_dir() and not victim.is_symlink():
                        shutil.rmtree(victim)
                    elif victim.is_symlink() or victim.exists():
                        victim.unlink()
                    else:
                        raise FileNotFoundError(f"{d}/{DELETE_LIST}: {line!r} is not in the "
                                                "image")
            _run(["cp", "-a", f"{d}/.", f"{rootfs}/"])
            copied = rootfs / DELETE_LIST
            if delete_list.exists() and copied.exists():
                copied.unlink()
            _run(["umoci", "repack", "--refresh-bundle", "--image", image, bundle])
        args: list[str] = []
        cfg = dict(config or {})
        for key, flag in (("Cmd", "--config.cmd"), ("Entrypoint", "--config.entrypoint"),
                          ("Env", "--config.env")):
            for value in cfg.pop(key, None) or []:
                args += [flag, str(value)]
        for key, flag in (("WorkingDir", "--config.workingdir"), ("User", "--config.user")):
            if cfg.get(key) is not None:
                args += [flag, str(cfg.pop(key))]
        for port in cfg.pop("ExposedPorts", None) or []:
            args += ["--config.exposedports", str(port)]
        for k, v in (cfg.pop("Labels", None) or {}).items():
            args += ["--config.label", f"{k}={v}"]
        if cfg:
            raise ValueError(f"push_oci_dirs: unsupported config keys {sorted(cfg)}")
        if args:
            _run(["umoci", "config", "--image", image, *args])
        digest_file = Path(tmp) / "digest"
        cmd = ["skopeo", "copy", "-q", "--dest-tls-verify=false", "--digestfile", str(digest_file)]
        if format == "v2s2":
            cmd += ["--format", "v2s2"]
        if creds is not None:
            cmd += ["--dest-creds", f"{creds[0]}:{creds[1]}"]
        _run([*cmd, f"oci:{image}", f"docker://{host}/{ref}"])
        return digest_file.read_text().strip()
