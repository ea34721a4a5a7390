"""Shared helpers for the benchmarks in bench/: medians, machine facts, result files.

Benchmarks are not tests. Each one measures a ratio against a baseline run in the same session
(the machine is noisy, absolute times are not comparable across runs) and writes its raw samples
to ``bench/.cache/results/<name>.json``; ``report.py`` turns those into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BENCH_DIR",
    "CACHE_DIR",
    "REPO_DIR",
    "RESULTS_DIR",
    "can_run",
    "drop_caches",
    "load_result",
    "machine_info",
    "median",
    "save_result",
    "source_revision",
    "stop_process",
    "tool_version",
]

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
CACHE_DIR = BENCH_DIR / ".cache"
RESULTS_DIR = CACHE_DIR / "results"


def median(samples: Sequence[float]) -> float:
    if not samples:
        raise ValueError("no samples")
    return float(statistics.median(samples))


def drop_caches() -> bool:
    """Drop the page cache (root only); False when the kernel refused. Never raises."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not available"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "not available"


def machine_info() -> dict[str, Any]:
    """Facts that explain a number: cores, kernel, Python, memory, date, checkout measured."""
    mem_total = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count() or 0,
        "cpu": cpu,
        "mem_bytes": mem_total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_impl": sys.implementation.name,
        "revision": source_revision(),
    }


def tool_version(cmd: list[str]) -> str:
    return _first_line(cmd)


def source_revision() -> str:
    """The checkout measured: ``git describe`` (``-dirty`` with local changes), or a note."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_DIR), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown revision"
    rev = out.stdout.strip()
    return f"git {rev}" if out.returncode == 0 and rev else "uncommitted tree"


def save_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def load_result(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / f"{name}.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def can_run(name: str, tools: Sequence[str] = ()) -> bool:
    """Whether benchmark ``name`` can run here: root, ``/dev/fuse`` and every one of
    ``tools`` on PATH; if not, say what is missing on stderr."""
    import shutil

    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print(f"{name}: needs root and /dev/fuse", file=sys.stderr)
        return False
    for tool in tools:
        if shutil.which(tool) is None:
            print(f"{name}: {tool} not found (`make setup`)", file=sys.stderr)
            return False
    return True


def stop_process(proc: subprocess.Popen[Any], grace: float) -> int | None:
    """Stop a process started here, by PID: SIGTERM, SIGKILL after ``grace`` seconds; its exit
    status (``None`` if it could not be waited for)."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)
        except ProcessLookupError:
            pass
    return proc.returncode


def process_alive(pid: int) -> bool:
    """Running: not gone and not a zombie (a mount daemon is not our child; nobody reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
