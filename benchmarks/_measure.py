"""Peak-memory measurement shared by the benchmarks that run each step in a child process
(`skm_vs_coremltools.py`, `gptq_vs_coremltools.py`): the child's own peak over a timed call
(`PeakMemory`), and the parent's sampler of the child's process tree (`TreeSampler`)."""
from __future__ import annotations

import ctypes
import gc
import os
import re
import sys
from pathlib import Path

SAMPLE_INTERVAL_S = 0.05
RESCAN_EVERY = 20  # look for new descendant processes once a second


def _status_kb(field: str, pid: str = "self") -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _descendants(root: int) -> list[int]:
    """Pids of every live process below `root` (by scanning /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class PeakMemory:
    """Peak RSS of this process over a `with` block, and a marker for the parent's sampler of its descendants.

    This process: the kernel's VmHWM, reset at entry (/proc/self/clear_refs) so it covers the block only,
    read at exit; exact. Processes the block starts (Core ML Tools' k-means workers): the parent samples the
    RSS of this process and its descendants while the marker file says "start" (see `TreeSampler`); no
    thread runs here (a sampling thread fights the timed call for the GIL and slowed it measurably).
    Linux only; elsewhere ru_maxrss, which cannot be reset (the whole child's peak).
    """

    marker: Path | None = None  # set by child_main

    def __init__(self) -> None:
        self.linux = Path("/proc/self/status").exists()
        self.reset = False
        self.start_bytes = 0
        self.self_peak = 0

    def _mark(self, text: str) -> None:
        if self.marker is not None:
            self.marker.write_text(text)

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.linux:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.reset = True
            except OSError:
                pass
            self.start_bytes = _status_kb("VmRSS") * 1024
        self._mark("start")
        return self

    def __exit__(self, *exc) -> None:
        self._mark("end")
        if self.linux:
            self.self_peak = _status_kb("VmHWM") * 1024
        else:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024
            self.self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def as_dict(self) -> dict:
        return {"peak_rss_bytes": self.self_peak, "self_peak_rss_bytes": self.self_peak,
                "rss_at_start_bytes": self.start_bytes, "high_water_mark_reset": self.reset}


class TreeSampler:
    """In the parent: the largest sum of RSS over a child and its descendants, sampled every
    SAMPLE_INTERVAL_S while the child's marker file says "start" (new descendants looked for once a second)."""

    def __init__(self, pid: int, marker: Path) -> None:
        self.pid, self.marker = pid, marker
        self.enabled = Path(f"/proc/{pid}/statm").exists()
        self.peak = 0
        self.max_processes = 0
        self._tick = 0
        self._others: list[int] = []

    def sample(self) -> None:
        if not self.enabled:
            return
        try:
            active = self.marker.read_text() == "start"
        except OSError:
            active = False
        if not active:
            return
        if self._tick % RESCAN_EVERY == 0:  # a /proc scan costs milliseconds; reading known pids' RSS, microseconds
            self._others = _descendants(self.pid)
        self._tick += 1
        self.max_processes = max(self.max_processes, 1 + len(self._others))
        self.peak = max(self.peak, _rss_bytes(self.pid) + sum(_rss_bytes(p) for p in self._others))


# --------------------------------------------------------------------------------------------- children

def _ru_maxrss_kb() -> dict:
    import resource

    return {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}
