"""The one memory meter: what the trainer logs, what ``stepdistill bench`` reports and what the profiling tools
(:mod:`stepdistill.profiling.memory`, :mod:`stepdistill.profiling.gpu_check`) measure all read memory here.

Three readings:

* :func:`process_peak`: the process's peak so far. CUDA: ``torch.cuda.max_memory_allocated`` (the allocator's
  peak since the last reset); CPU: the resident-memory high-water mark (``VmHWM`` in ``/proc/self/status``, reset
  by :func:`reset_peak`; ``ru_maxrss`` where there is no ``/proc``, which never resets).
* :func:`rss_mb`: resident memory now (``/proc/self/statm``; the peak where there is no ``/proc``).
* :class:`PeakMemory`: the peak *increase* over the enclosed code. CUDA: the allocator's peak minus what was
  allocated on entry (``cuda_max_memory_allocated_delta``; activations and workspaces, weights excluded). CPU: the
  resident set sampled every ~1 ms by a thread after ``malloc_trim(0)`` returns freed memory to the OS
  (``rss_peak_delta_sampled``); without ``/proc`` (macOS, Windows), ``ru_maxrss`` deltas (``ru_maxrss_delta``),
  which only see growth of the process-lifetime peak and so often read 0. CPU numbers are approximate: sampling
  can miss very short peaks.
"""
from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading
from pathlib import Path

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = Path("/proc/self/statm")


def _is_cuda(device) -> bool:
    return getattr(device, "type", str(device)) == "cuda"


def maxrss_bytes() -> int:
    """The process-lifetime peak resident set (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def proc_kb_field(path: str, field: str) -> float | None:
    """``field`` (a kB line such as ``VmHWM:``) of a /proc file in MiB, or None off Linux."""
    try:
        for line in open(path):
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident memory now (Linux /proc; the process peak elsewhere)."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, ValueError):
        return maxrss_bytes()


def rss_mb() -> float:
    return rss_bytes() / 2**20


def peak_rss_mb() -> float:
    """Resident-memory high-water mark since the last :func:`reset_peak` (VmHWM), else the process peak."""
    hwm = proc_kb_field("/proc/self/status", "VmHWM:")
    return hwm if hwm is not None else maxrss_bytes() / 2**20


def reset_peak(device=None, cpu: bool = True) -> bool:
    """Start a new peak: the CUDA allocator's peak on ``device``, and (``cpu``) the kernel's resident-memory
    high-water mark (Linux: ``5`` to /proc/self/clear_refs), so that a peak covers what follows only (not, say, a
    model built in float32 and then cast to bfloat16). Returns whether the CPU mark was reset."""
    if device is not None and _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
    if not cpu:
        return False
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def process_peak(device) -> dict:
    """The process's peak memory so far: the CUDA allocator's peak on GPU, the resident high-water mark on CPU."""
    if _is_cuda(device):
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_memory_kind": "cuda_allocated"}
    return {"peak_memory_mb": peak_rss_mb(), "peak_memory_kind": "cpu_rss"}


def malloc_trim() -> None:
    """Hand memory freed by earlier work back to the OS (glibc), so an RSS delta starts from what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Context manager: ``peak_delta``, the peak memory increase (bytes) of the enclosed code; ``method`` says how
    it was measured (see the module docstring)."""

    def __init__(self, device: torch.device, interval_s: float = 0.001):
        self.device = device
        self.interval = interval_s
        self.peak_delta: int | None = None
        if _is_cuda(device):
            self.method = "cuda_max_memory_allocated_delta"
        elif _STATM.exists():
            self.method = "rss_peak_delta_sampled"
        else:
            self.method = "ru_maxrss_delta"

    def __enter__(self):
        if self.method.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.method == "rss_peak_delta_sampled":
            malloc_trim()
            self._base = self._peak = rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        else:
            self._base = maxrss_bytes()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        if self.method.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            self.peak_delta = int(torch.cuda.max_memory_allocated(self.device) - self._base)
        elif self.method == "rss_peak_delta_sampled":
            self._peak = max(self._peak, rss_bytes())
            self._stop.set()
            self._thread.join()
            self.peak_delta = max(0, int(self._peak - self._base))
        else:
            self.peak_delta = max(0, maxrss_bytes() - self._base)
        return False


def memory_method(device: torch.device) -> str:
    """How :class:`PeakMemory` measures on ``device``."""
    return PeakMemory(device).method
