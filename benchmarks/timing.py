"""Timing and CPU memory measurement shared by the benchmark scripts: interleaved repetitions, medians,
resident-set peaks.

A busy neighbour process can double one timing on a 2-core machine; timing the candidates in alternation
makes such a burst hit all of them alike, and the median ignores the worst repetitions.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median milliseconds of each callable, timed in alternation after ``warmup`` untimed calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mark() -> int:
    """Reset the kernel's resident-set high-water mark (``VmHWM``) to the current resident set, through
    ``/proc/self/clear_refs``, and return that resident set (KiB): the base of :func:`rss_peak_mib`."""
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return before


def rss_peak_mib(mark: int) -> float:
    """MiB the process's resident set peaked above ``mark`` since :func:`rss_mark`: every byte touched,
    which ``tracemalloc`` cannot see in torch's CPU allocator."""
    return (_status_kib("VmHWM") - mark) / 1024
