"""Helpers shared by the benchmarks: device choice and peak memory of a step."""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import torch


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_mib(step: Callable[[], object], device: torch.device, *, repeats: int = 3) -> float:
    """Peak memory of ``repeats`` calls of ``step`` beyond what is held before, in MiB.

    CUDA: ``max_memory_allocated``. CPU: resident set size sampled every millisecond by a thread
    (run it in a fresh process per variant, so earlier variants' freed pages do not hide growth).
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for _ in range(repeats):
        step()
    done.set()
    thread.join()
    return (peak[0] - base) / 2**20
