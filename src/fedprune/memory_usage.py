"""This process's memory, for reports and benchmarks: current and peak resident set size.

Linux keeps the peak (``VmHWM`` in ``/proc/self/status``) and lets a process reset it
(writing ``5`` to ``/proc/self/clear_refs``), so a step's own peak can be measured: note the
resident memory, reset, run the step, read the peak. Elsewhere the peak falls back to
``getrusage`` (never reset) and the current size to psutil.
"""
from __future__ import annotations

import resource
import sys


def _status_bytes(field: str) -> int | None:
    """``field`` (``VmRSS``, ``VmHWM``) of ``/proc/self/status`` in bytes, or None where there is none."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    """Resident set size now."""
    rss = _status_bytes("VmRSS")
    if rss is None:
        import psutil

        rss = psutil.Process().memory_info().rss
    return rss


def peak_rss_bytes() -> int:
    """Largest resident set size since the process started or since :func:`reset_peak_rss`."""
    peak = _status_bytes("VmHWM")
    if peak is None:  # no procfs: getrusage's peak (kilobytes on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return peak


def reset_peak_rss() -> bool:
    """Restart the peak at the current size (Linux); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
