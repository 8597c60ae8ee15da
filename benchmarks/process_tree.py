"""Memory of a program and everything it started (driver, JVM, Python workers), sampled
from ``/proc`` in a background thread: RSS and PSS per process kind."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

MB = 1024 * 1024


# --- memory -----------------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command, which may contain spaces.
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    children = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _status_kb(pid: int, key: str) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def _pss_kb(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def _kind(pid: int, root: int) -> str:
    if pid == root:
        return "driver"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "other"
    head = Path(argv[0].decode(errors="replace")).name if argv and argv[0] else ""
    joined = b" ".join(argv)
    if head == "java":
        return "jvm"
    if b"pyspark" in joined or b"daemon" in joined or head.startswith("python"):
        return "python_worker"
    return f"other:{head or pid}"


@dataclass
class MemorySample:
    t: float  # seconds since the sampler started
    rss_mb: float
    pss_mb: float
    processes: int
    by_kind_rss_mb: dict[str, float] = field(default_factory=dict)


class ProcessTreeSampler(threading.Thread):
    """Every ``interval`` s: the RSS (and PSS, which splits pages shared by forked Python
    workers fairly) summed over a process and all its descendants, read from /proc."""

    def __init__(self, root_pid: int, interval: float = 0.5) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.root = root_pid
        self.interval = interval
        self.samples: list[MemorySample] = []
        self.stopping = threading.Event()
        self.started_at = time.monotonic()

    def sample(self) -> MemorySample:
        by_kind: dict[str, float] = {}
        rss = pss = 0
        pids = process_tree(self.root)
        for pid in pids:
            kb = _status_kb(pid, "VmRSS:")
            if not kb:
                continue  # exited meanwhile, or a zombie
            rss += kb
            pss += _pss_kb(pid)
            kind = _kind(pid, self.root)
            by_kind[kind] = by_kind.get(kind, 0.0) + kb / 1024
        return MemorySample(round(time.monotonic() - self.started_at, 2), round(rss / 1024, 1),
                            round(pss / 1024, 1), len(pids),
                            {k: round(v, 1) for k, v in sorted(by_kind.items())})

    def run(self) -> None:
        while not self.stopping.is_set():
            self.samples.append(self.sample())
            self.stopping.wait(self.interval)

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
