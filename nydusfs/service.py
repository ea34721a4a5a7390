"""The resident mount service: ``nydusfs service``, a zygote that forks one daemon per mount.

Why: ``nydusfs mount --background`` on a container's start path spent most of its time
before FUSE was up starting Python and importing aiohttp, pyfuse3 (+trio), uvloop, zstandard,
blake3 and the filesystem from a cold page cache. Nydus (nydusd under nydus-snapshotter) and
stargz-snapshotter keep a resident daemon for the same reason. The service has imported all of
that once; each mount request forks a child (pyfuse3 serves one mount per process) that runs
the same code as a background daemon (:func:`nydusfs.mount.mount_foreground`), and the client
is a few milliseconds of Python that hands its request over a Unix socket.

Clean fork. The service never runs an event loop, never starts a thread and holds no network
session: it waits in ``select`` on the listening socket and a signal wake-up pipe, so the
child starts from the state a fresh process would have after its imports. The child closes
the listener, takes the client's cwd and credential-related environment (:data:`FORWARDED_ENV`,
:data:`FORWARDED_PREFIXES`), detaches (new session, ``/dev/null`` stdin, a log file as stdout
and stderr, every other descriptor closed) and mounts. Children are reaped on ``SIGCHLD``;
``SIGTERM``/``SIGINT`` stop the service, and the mounts it started keep running, each an
independent daemon that ``nydusfs umount`` stops.

Protocol (one JSON object per line, UTF-8, on a ``SOCK_STREAM`` Unix socket; one request per
connection):

- client -> service: ``{"op": "mount", "image": str, "mountpoint": abs path, "config": abs
  path | null, "remote": {RemoteOptions fields}, "cwd": str, "env": {str: str}, "started":
  float, "ns": {"mnt": int, "net": int}}``; ``image`` is made absolute by the client when it
  names a file.
- service -> client, one of: ``{"refused": reason}`` (the service will not serve this client:
  another user, another mount or network namespace; an ``auto`` client then mounts by itself),
  ``{"error": message}`` (the request is malformed); or, from the forked child,
  ``{"pid": int, "log": path}`` first, then ``{"ready": true}`` or ``{"error": message}``.
  End of stream before either: the child died; its log says why.

Security: the socket's directory is made mode 0700 and the socket 0600, and each peer's
``SO_PEERCRED`` uid must be root's or the service's own: a mount request runs arbitrary mount
configs (cache directories, access traces) with the service's privileges. Requests are bounded
(:data:`MAX_REQUEST` bytes, :data:`REQUEST_TIMEOUT` seconds to arrive) and validated field by
field before anything is forked.

Errors: :class:`ServiceUnavailable` when nothing usable answers at the socket (the CLI falls
back to forking its own daemon unless told ``--service always``); a mount that fails in the
child raises :class:`~nydusfs.errors.NydusfsError` with the child's one-line message, exactly
as :func:`nydusfs.mount.mount_background` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from nydusfs.errors import NydusfsError

if TYPE_CHECKING:
    from nydusfs.mount import RemoteOptions

__all__ = ["DEFAULT_SOCKET", "ENV_MODE", "ENV_SOCKET", "MODES", "MountRequest",
           "ServiceUnavailable", "mount_via_service", "preload", "run_service", "socket_path"]

DEFAULT_SOCKET = Path("/run/nydusfs/service.sock")
ENV_SOCKET = "NYDUSFS_SERVICE_SOCKET"
ENV_MODE = "NYDUSFS_SERVICE"
MODES = ("auto", "always", "never")
# The environment a mount reads (credentials files, registry and S3 credentials): the child
# takes the client's values for these, and drops the service's own where the client has none.
FORWARDED_ENV = ("HOME", "DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "TMPDIR")
FORWARDED_PREFIXES = ("NYDUSFS_", "AWS_")
MAX_REQUEST = 1 << 20
REQUEST_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5.0
READY_TIMEOUT = 60.0  # as mount_background's
# What a mount imports, imported once by the service (the storage backends by name, below).
PRELOAD = (
    "aiohttp", "blake3", "zstandard", "yaml", "pyfuse3", "pyfuse3.asyncio", "uvloop",
    "prometheus_client", "nydusfs.config", "nydusfs.format.reader", "nydusfs.fs.model",
    "nydusfs.fs.fuse", "nydusfs.fs.api", "nydusfs.fs.prefetch", "nydusfs.metrics",
    "nydusfs.storage", "nydusfs.storage.cache", "nydusfs.oci.client", "nydusfs.oci.image",
    "nydusfs.oci.reference", "nydusfs.eventloop", "nydusfs.mount",
)


class ServiceUnavailable(NydusfsError):
    """No mount service answers at the socket, or it will not serve this client (another user
    or namespace); ``auto`` clients then mount by themselves."""


def socket_path(explicit: Path | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The service socket: ``explicit``, else ``$NYDUSFS_SERVICE_SOCKET``, else the default."""
    env = os.environ if env is None else env
    if explicit is not None:
        return explicit
    return Path(env[ENV_SOCKET]) if env.get(ENV_SOCKET) else DEFAULT_SOCKET


def _namespaces() -> dict[str, int]:
    """This process's mount and network namespace ids: a mount made by the service is seen by
    the client only if both share the mount namespace, and reaches the same registry only if
    they share the network namespace."""
    out = {}
    for ns in ("mnt", "net"):
        try:
            out[ns] = os.stat(f"/proc/self/ns/{ns}").st_ino
        except OSError:
            out[ns] = 0
    return out


# --------------------------------------------------------------------------- the request


@dataclass(frozen=True, slots=True)
class MountRequest:
    """One mount request, as sent over the socket and validated by the service."""

    image: str
    mountpoint: str
    config: str | None
    remote: dict[str, Any]
    cwd: str
    env: dict[str, str]
    started: float
    ns: dict[str, int]

    @classmethod
    def parse(cls, line: bytes) -> MountRequest:
        """Validate a request line; a :class:`NydusfsError` names the bad field."""
        try:
            doc = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NydusfsError(f"mount request: not JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("op") != "mount":
            raise NydusfsError("mount request: expected an object with op=mount")

        def field(name: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
            value = doc.get(name)
            if value is None and optional:
                return None
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise NydusfsError(f"mount request: {name}: missing or of the wrong type")
            return value

        env = field("env", dict)
        ns = field("ns", dict)
        remote = field("remote", dict)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise NydusfsError("mount request: env: expected string values")
        if not all(isinstance(v, int) for v in ns.values()):
            raise NydusfsError("mount request: ns: expected integers")
        for path in ("mountpoint", "cwd"):
            if not os.path.isabs(field(path, str)):
                raise NydusfsError(f"mount request: {path}: expected an absolute path")
        config = field("config", str, optional=True)
        if config is not None and not os.path.isabs(config):
            raise NydusfsError("mount request: config: expected an absolute path")
        return cls(image=field("image", str), mountpoint=doc["mountpoint"], config=config,
                   remote=remote, cwd=doc["cwd"], env=env,
                   started=float(field("started", (int, float))), ns=ns)

    def remote_options(self) -> RemoteOptions:
        from nydusfs.mount import RemoteOptions

        kw = dict(self.remote)
        try:
            for key in ("ca_file", "auth_file"):
                if kw.get(key) is not None:
                    kw[key] = Path(kw[key])
            return RemoteOptions(**kw)
        except TypeError as exc:
            raise NydusfsError(f"mount request: remote: {exc}") from exc


# --------------------------------------------------------------------------- the client


def mount_via_service(sock: Path, image: str, mountpoint: Path, config: Path | None,
                      remote: RemoteOptions, *, started: float) -> int:
    """Ask the service at ``sock`` for the mount; return 0 once it is ready (prints the
    daemon's PID as :func:`~nydusfs.mount.mount_background` does).

    Raises :class:`ServiceUnavailable` when nothing listens there or the service refuses this
    client (nothing was mounted: the caller may mount by itself), and
    :class:`~nydusfs.errors.NydusfsError` with the child's message when the mount failed.
    Cheap on purpose: no import beyond the standard library's socket and json.
    """
    text = os.fspath(image)
    if os.path.exists(text) or text.startswith(("/", ".")):
        text = os.path.abspath(text)  # a bootstrap file: the service has another cwd
    request = {
        "op": "mount", "image": text, "mountpoint": os.path.abspath(mountpoint),
        "config": os.path.abspath(config) if config is not None else None,
        "remote": {k: (os.fspath(v) if isinstance(v, Path) else v)
                   for k, v in asdict(remote).items()},
        "cwd": os.getcwd(), "env": _forwarded_env(os.environ), "started": started,
        "ns": _namespaces(),
    }
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(CONNECT_TIMEOUT)
        try:
            conn.connect(os.fspath(sock))
        except OSError as exc:  # absent, refused, not a socket, not allowed
            raise ServiceUnavailable(f"no mount service at {sock}: "
                                     f"{exc.strerror or exc}") from exc
        conn.sendall(json.dumps(request).encode() + b"\n")
        conn.settimeout(READY_TIMEOUT)
        reader = conn.makefile("rb")
        pid = 0
        try:
            pid, log = _answer(reader, sock, first=True)
            try:
                _answer(reader, sock, first=False)
            except NydusfsError as exc:
                message = str(exc) or _log_tail(log)
                _unlink(log)
                raise NydusfsError(message) from None
        except TimeoutError as exc:
            _kill(pid)
            raise NydusfsError(f"mount daemon not ready after {READY_TIMEOUT:.0f} s") from exc
    finally:
        conn.close()
    print(f"mounted {image} at {mountpoint} (daemon pid {pid}, log {log})")
    return 0


def _answer(reader: Any, sock: Path, *, first: bool) -> tuple[int, str]:
    """Read one answer line; the first is the child's ``pid``/``log``, the second its result.

    An error answer raises :class:`NydusfsError` with its message (an empty message: the
    child died, its log says why), a refusal :class:`ServiceUnavailable`; ``TimeoutError``
    passes through."""
    try:
        line = reader.readline(MAX_REQUEST)
    except ConnectionError:
        line = b""
    if not line:
        if first:
            raise NydusfsError(f"mount service at {sock} closed the connection without an "
                               "answer (see its output)")
        raise NydusfsError("")
    try:
        doc = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        doc = None
    if not isinstance(doc, dict):
        raise NydusfsError(f"mount service at {sock}: unreadable answer {line[:80]!r}")
    if "refused" in doc:
        raise ServiceUnavailable(f"mount service at {sock} refused: {doc['refused']}")
    if "error" in doc:
        raise NydusfsError(str(doc["error"]))
    if first and isinstance(doc.get("pid"), int) and isinstance(doc.get("log"), str):
        return doc["pid"], doc["log"]
    if not first and doc.get("ready") is True:
        return 0, ""
    raise NydusfsError(f"mount service at {sock}: unexpected answer {line[:80]!r}")


def _log_tail(log: str) -> str:
    """A dead child's error: the last line of its log, as mount_background reports it."""
    try:
        lines = Path(log).read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    last = lines[-1].removeprefix("nydusfs: error: ") if lines else ""
    return last or "mount daemon exited before the mount was ready"


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _kill(pid: int) -> None:
    if pid <= 0:
        return
    import signal

    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)  # the service reaps it


def _forwarded_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items()
            if k in FORWARDED_ENV or k.startswith(FORWARDED_PREFIXES)}


# --------------------------------------------------------------------------- the service


def preload() -> list[str]:
    """Import what a mount needs (and every storage backend); the modules that failed to
    import (an optional dependency missing), which a mount then imports, and fails, itself."""
    import gc
    import importlib

    missing = []
    names = list(PRELOAD)
    try:
        from nydusfs.storage import BACKENDS

        names += [target.split(":", 1)[0] for target in BACKENDS.values()]
    except ImportError:
        pass
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    try:  # the CA bundle, loaded once here rather than in every mount (~20 ms each)
        from nydusfs.oci.client import default_ssl_context

        default_ssl_context()
    except ImportError:
        pass
    # The children share these pages with the service until they write them: keep the
    # collector from touching (and so copying) every preloaded object in every child.
    gc.collect()
    gc.freeze()
    return missing


class _Listener:
    """The listening socket: its directory made 0700, the socket 0600, a stale socket file
    (nothing answering) replaced, a live one refused."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if path.is_socket() or path.exists():
                if not path.is_socket():
                    raise NydusfsError(f"{path}: exists and is not a socket")
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(os.fspath(path))
                except OSError:
                    path.unlink()  # stale: its service is gone
                else:
                    raise NydusfsError(f"{path}: a mount service is already running there")
                finally:
                    probe.close()
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)  # no moment when the socket is open to others
            try:
                self.sock.bind(os.fspath(path))
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            self.sock.listen(64)
        except OSError as exc:
            raise NydusfsError(f"{path}: cannot listen: {exc.strerror or exc}") from exc
        self.ino = path.stat().st_ino

    def close(self) -> None:
        self.sock.close()
        try:  # only our socket file: a successor may have replaced it
            if self.path.stat().st_ino == self.ino:
                self.path.unlink()
        except OSError:
            pass


def run_service(path: Path) -> int:
    """``nydusfs service``: preload, listen at ``path``, fork a mount daemon per request,
    until SIGTERM or SIGINT (the mounts stay). Returns the exit status (0)."""
    import selectors
    import signal

    missing = preload()
    listener = _Listener(path)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    pending: set[int] = set()

    def on_signal(signum: int, frame: object) -> None:
        pending.add(signum)

    old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    handlers = {sig: signal.signal(sig, on_signal)
                for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT)}
    children: set[int] = set()
    sel = selectors.DefaultSelector()
    sel.register(listener.sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    _say(f"pid {os.getpid()}, listening on {path}"
         + (f" (not preloaded: {', '.join(missing)})" if missing else ""))
    try:
        while True:
            for key, _ in sel.select():
                if key.fileobj is listener.sock:
                    _accept(listener, children, (wake_r, wake_w, sel.fileno()))
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            if signal.SIGCHLD in pending:
                pending.discard(signal.SIGCHLD)
                _reap(children)
            if pending & {signal.SIGTERM, signal.SIGINT}:
                break
    finally:
        sel.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)
        listener.close()
        _reap(children)
    _say(f"stopped ({len(children)} mount daemons still running)")
    return 0


def _say(message: str) -> None:
    """A line on the service's output; an output that went away does not stop the service."""
    with contextlib.suppress(OSError):
        print(f"nydusfs service: {message}", flush=True)


def _reap(children: set[int]) -> None:
    """Collect every exited child (no zombies); say how the unusual ones ended."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        if os.WIFSIGNALED(status):
            _say(f"mount daemon {pid} killed by signal {os.WTERMSIG(status)}")


def _accept(listener: _Listener, children: set[int], private: tuple[int, ...]) -> None:
    """One connection: read and check its request, fork its mount daemon. Never raises for
    the client's faults (the service outlives them)."""
    try:
        conn, _ = listener.sock.accept()
    except OSError:
        return
    try:
        conn.settimeout(REQUEST_TIMEOUT)
        request = _receive(conn)
        if request is None:
            return
        log = _log_file(request.env.get("TMPDIR"))
        try:
            children.add(_fork_child(conn, listener, log, request, private))
        except OSError:
            os.unlink(log[1])
            raise
        finally:
            os.close(log[0])
    except NydusfsError as exc:
        _send(conn, {"error": str(exc)})
    except OSError as exc:  # the fork or the log file failed: the service goes on
        _send(conn, {"error": f"mount service: {exc}"})
    finally:
        conn.close()


def _receive(conn: socket.socket) -> MountRequest | None:
    """The request on ``conn``, or None once a refusal was sent back."""
    uid = _peer_uid(conn)
    if uid not in (0, os.geteuid()):
        _send(conn, {"refused": f"uid {uid} may not use this service"})
        return None
    line = b""
    try:
        reader = conn.makefile("rb")
        line = reader.readline(MAX_REQUEST + 1)
    except OSError:
        return None  # gone or too slow: nobody to answer
    if not line.endswith(b"\n"):
        raise NydusfsError("mount request: too long or cut short")
    request = MountRequest.parse(line)
    here = _namespaces()
    for ns in ("mnt", "net"):
        if request.ns.get(ns) != here[ns]:
            which = "mount" if ns == "mnt" else "network"
            _send(conn, {"refused": f"the client is in another {which} namespace"})
            return None
    return request


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _send(conn: socket.socket, doc: dict[str, Any]) -> bool:
    try:
        conn.sendall(json.dumps(doc).encode() + b"\n")
        return True
    except OSError:
        return False


def _log_file(tmpdir: str | None) -> tuple[int, str]:
    """A new log file for a daemon, where the client's ``mount_background`` would put it."""
    import tempfile

    where = tmpdir if tmpdir and os.path.isdir(tmpdir) else None
    return tempfile.mkstemp(prefix="nydusfs-mount-", suffix=".log", dir=where)


def _fork_child(conn: socket.socket, listener: _Listener, log: tuple[int, str],
                request: MountRequest, private: tuple[int, ...]) -> int:
    received = time.time()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    pid = os.fork()
    if pid == 0:
        _child(conn, listener, log, request, private, received)
    return pid


def _child(conn: socket.socket, listener: _Listener, log: tuple[int, str],
           request: MountRequest, private: tuple[int, ...], received: float) -> NoReturn:
    """The forked mount daemon: the client's cwd and environment, detached, then the mount;
    its answers go to ``conn``. Exits with ``os._exit`` (the service's atexit is not ours)."""
    import signal

    status = 1
    fd = conn.fileno()
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        listener.sock.close()
        for private_fd in private:
            os.close(private_fd)
        conn.settimeout(None)
        _send(conn, {"pid": os.getpid(), "log": log[1]})
        try:
            from nydusfs.mount import detach, mount_foreground

            for key in [k for k in os.environ if k in FORWARDED_ENV
                        or k.startswith(FORWARDED_PREFIXES)]:
                del os.environ[key]
            os.environ.update(request.env)
            try:
                os.chdir(request.cwd)
            except OSError:
                os.chdir("/")
            remote = request.remote_options()
            fd = detach(fd, log[0])
            status = mount_foreground(
                request.image, Path(request.mountpoint),
                Path(request.config) if request.config is not None else None,
                log_file=Path(log[1]), remote=remote, started=request.started,
                on_ready=lambda: _answer_ready(fd), marks={"service_request": received})
        except (NydusfsError, OSError) as exc:
            print(f"nydusfs: error: {exc}", file=sys.stderr)
            _reply(fd, {"error": str(exc)})
        except BaseException:  # a bug: its traceback in the log, the client reads the tail
            import traceback

            traceback.print_exc()
    finally:
        from nydusfs.mount import exit_daemon

        exit_daemon(status)


def _reply(fd: int, doc: dict[str, Any]) -> None:
    """Send ``doc`` on the client connection (by descriptor: ``detach`` may have moved it)
    and close it; a client that went away is not an error of the mount."""
    if fd < 0:
        return
    with contextlib.suppress(OSError):
        os.write(fd, json.dumps(doc).encode() + b"\n")
    with contextlib.suppress(OSError):
        os.close(fd)


def _answer_ready(fd: int) -> None:
    _reply(fd, {"ready": True})
