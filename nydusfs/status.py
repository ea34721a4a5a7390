"""Client side of ``nydusfs stat MOUNTPOINT``: ask the mount daemon's status API.

This is a CLI helper: plain blocking stdlib (``http.client`` over a Unix socket), no event
loop. It must never touch the mountpoint itself (a hung FUSE daemon would hang ``stat``);
the socket is found by name with :func:`nydusfs.fs.api.api_socket_path`. Every failure is a
:class:`~nydusfs.errors.NydusfsError` with one clear line.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Mapping
from pathlib import Path

from nydusfs.errors import NydusfsError
from nydusfs.fs.api import api_socket_path

__all__ = ["UnixHTTPConnection", "format_status", "query_status"]


class UnixHTTPConnection(http.client.HTTPConnection):
    """Blocking HTTP over a Unix socket (the status API here; also what the tests and the
    benchmarks use to ask a dfagent peer's local API)."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def query_status(
    mountpoint: Path, timeout: float = 5, *, socket_path: Path | None = None
) -> dict[str, object]:
    """GET /api/v1/status from the daemon serving ``mountpoint``."""
    path = socket_path if socket_path is not None else api_socket_path(mountpoint, create=False)
    conn = UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", "/api/v1/status")
        resp = conn.getresponse()
        body = resp.read()
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise NydusfsError(f"no nydusfs daemon for {mountpoint} (is it mounted?)") from e
    except PermissionError as e:
        raise NydusfsError(f"{path}: permission denied (the status API is root only)") from e
    except TimeoutError as e:
        raise NydusfsError(
            f"nydusfs daemon for {mountpoint} did not answer within {timeout:g}s"
        ) from e
    except (OSError, http.client.HTTPException) as e:
        raise NydusfsError(f"nydusfs daemon for {mountpoint}: status request failed: {e}") from e
    finally:
        conn.close()
    if resp.status != 200:
        raise NydusfsError(
            f"nydusfs daemon for {mountpoint}: status request gave HTTP {resp.status}"
        )
    try:
        data = json.loads(body)
    except ValueError as e:
        raise NydusfsError(f"nydusfs daemon for {mountpoint}: invalid status JSON: {e}") from e
    if not isinstance(data, dict):
        raise NydusfsError(f"nydusfs daemon for {mountpoint}: status is not a JSON object")
    return data


_HEAD = ("image", "mountpoint", "pid", "backend")


def format_status(d: Mapping[str, object]) -> str:
    """Human-readable status: the identity lines first, then one indented block per section."""
    lines: list[str] = []
    for key in _HEAD:
        if key in d:
            lines.append(f"{key}: {d[key]}")
    for key, value in d.items():
        if key in _HEAD:
            continue
        if key == "prefetch" and isinstance(value, Mapping):
            lines.append(f"prefetch: {_prefetch_line(value)}")
            lines.extend(_block(value, skip=_PREFETCH_SHOWN))
        elif isinstance(value, Mapping):
            lines.append(f"{key}:")
            lines.extend(_block(value))
        else:
            lines.append(f"{key}: {_value(key, value)}")
    return "\n".join(lines)


_PREFETCH_SHOWN = frozenset(
    {"state", "done_chunks", "total_chunks", "done_bytes", "total_bytes", "failed_chunks"}
)


def _prefetch_line(p: Mapping[str, object]) -> str:
    done, total = _int(p.get("done_chunks")), _int(p.get("total_chunks"))
    state = str(p.get("state", "unknown"))
    if total:
        pct = 100.0 * done / total
    else:
        pct = 100.0 if state in ("done", "finished", "complete", "completed") else 0.0
    parts = [state, f"{done}/{total} chunks ({pct:.1f}%)"]
    if "total_bytes" in p:
        parts.append(f"{_size(_int(p.get('done_bytes')))}/{_size(_int(p.get('total_bytes')))}")
    if "failed_chunks" in p:
        parts.append(f"{_int(p.get('failed_chunks'))} failed")
    return ", ".join(parts)


def _block(m: Mapping[str, object], skip: frozenset[str] = frozenset()) -> list[str]:
    return [f"  {k}: {_value(k, v)}" for k, v in m.items() if k not in skip]


def _value(key: str, v: object) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and "bytes" in key:
        return f"{v} ({_size(v)})"
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={x}" for k, x in v.items()) or "-"
    return str(v)


def _int(v: object) -> int:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
