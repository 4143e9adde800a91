"""Measuring one benchmark step: wall time, rows/s and peak RSS of every process involved.

Peak RSS is sampled (every 50 ms) for this Python process with its children and for the PostgreSQL server
(the postmaster and all its backends), because a step's memory is spent in both; ``peak_total_mb`` is the
largest sum of the two at one instant (the machine's real peak; the two separate peaks may not coincide).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psutil

RESULTS_FILE = Path(__file__).parent / "results.jsonl"


@dataclass
class StepResult:
    step: str
    seconds: float = 0.0
    rows: int | None = None
    peak_rss_python_mb: float = 0.0
    peak_rss_server_mb: float = 0.0
    peak_total_mb: float = 0.0  # python tree + server tree, summed at the same instant
    reference: str | None = None  # the step this one is compared with (a floor or another library)
    notes: dict = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float | None:
        return self.rows / self.seconds if self.rows and self.seconds > 0 else None


def _memory(proc: psutil.Process) -> int:
    """Proportional set size where Linux gives it, else RSS.

    PostgreSQL's backends all map the same shared buffers: summing their RSS counts those pages once per
    backend that touched them (a 1M-customer dbt build summed to 7.5 GB on a 512 MB shared_buffers server).
    PSS shares each page among the processes mapping it, so the sum over a process tree is its real footprint.
    """
    try:
        with open(f"/proc/{proc.pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return proc.memory_info().rss


def _tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += _memory(proc)
        except psutil.NoSuchProcess:
            pass
    return total


def _python_tree(pid: int) -> tuple[int, dict[int, int]]:
    """Memory of process ``pid`` with all its descendants, and of each direct child's own subtree."""
    try:
        total = _memory(psutil.Process(pid))
        kids = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return 0, {}
    by_child = {kid.pid: _tree_rss(kid.pid) for kid in kids}
    return total + sum(by_child.values()), by_child


class _Sampler(threading.Thread):
    """Samples every ``interval`` s, or less often when a sample is dear: reading a process's PSS walks its
    page tables (~15 ms of CPU for a 2.5 GB process), and on a 2-core machine a sampler reading several
    large processes 20 times a second would take a noticeable share of a core from what it measures. The
    pause is at least 4x the last sample's own time (the sampler stays under ~20 % of one core)."""

    def __init__(self, server_pid: int | None, interval: float = 0.05):
        super().__init__(daemon=True)
        self.server_pid = server_pid
        self.interval = interval
        self.peak_python = 0
        self.peak_server = 0
        self.peak_total = 0
        self.peak_by_child: dict[int, int] = {}  # each direct child's subtree (concurrent task processes)
        self._halt = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._halt.is_set():
            started = time.perf_counter()
            python, by_child = _python_tree(me)  # this process and its children: concurrent tasks too
            server = _tree_rss(self.server_pid) if self.server_pid else 0
            self.peak_python = max(self.peak_python, python)
            self.peak_server = max(self.peak_server, server)
            self.peak_total = max(self.peak_total, python + server)
            for pid, size in by_child.items():
                self.peak_by_child[pid] = max(self.peak_by_child.get(pid, 0), size)
            self._halt.wait(max(self.interval, 4 * (time.perf_counter() - started)))

    def stop(self) -> None:
        self._halt.set()
        self.join()


def postmaster_pid(pgdata: Path) -> int | None:
    """The embedded server's pid (first line of postmaster.pid), or None for an external server."""
    try:
        return int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def measure(step: str, *, server_pid: int | None = None, reference: str | None = None) -> Iterator[StepResult]:
    """Time a block; the caller sets ``result.rows`` (and notes) inside it."""
    result = StepResult(step=step, reference=reference)
    sampler = _Sampler(server_pid)
    sampler.start()
    started = time.perf_counter()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - started
        sampler.stop()
        result.peak_rss_python_mb = sampler.peak_python / 2**20
        result.peak_rss_server_mb = sampler.peak_server / 2**20
        result.peak_total_mb = sampler.peak_total / 2**20
        if sampler.peak_by_child:
            result.notes["peak_by_child_mb"] = {pid: round(size / 2**20) for pid, size in sampler.peak_by_child.items()}


def machine() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit or "unknown",
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }


def format_table(results: list[StepResult]) -> str:
    by_name = {r.step: r for r in results}
    header = (f"{'step':<44} {'seconds':>9} {'rows':>12} {'rows/s':>12} {'py MB':>8} {'pg MB':>8} {'sum MB':>8}"
              "  vs reference")
    lines = [header, "-" * len(header)]
    for r in results:
        rate = f"{r.rows_per_s:,.0f}" if r.rows_per_s else ""
        rows = f"{r.rows:,}" if r.rows is not None else ""
        ratio = ""
        ref = by_name.get(r.reference) if r.reference else None
        if ref and ref.seconds > 0:
            ratio = f"{r.seconds / ref.seconds:.2f}x time of {ref.step}"
        lines.append(
            f"{r.step:<44} {r.seconds:>9.2f} {rows:>12} {rate:>12} "
            f"{r.peak_rss_python_mb:>8.0f} {r.peak_rss_server_mb:>8.0f} {r.peak_total_mb:>8.0f}  {ratio}"
        )
    return "\n".join(lines)


def append_results(results: list[StepResult], meta: dict, path: Path = RESULTS_FILE) -> None:
    """One JSON line per benchmark run: machine, parameters and every step."""
    record = {**machine(), **meta, "steps": [{**asdict(r), "rows_per_s": r.rows_per_s} for r in results]}
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
