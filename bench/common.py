"""Helpers shared by the benchmarks: device choice and peak memory of a step."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Callable, Iterable

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


def bench_parser(doc: str, *, reps: int, warmup: int) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--reps``, ``--warmup``, ``--device``, ``--threads``, and
    the internal ``--memory-of`` used by :func:`peak_memory_in_subprocesses`."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    return ap


def bench_setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and resolve ``--device``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return pick_device(args.device)


def peak_memory_in_subprocesses(script: str, keys: Iterable[str], args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """``{key: peak MiB}``, each measured by ``script --memory-of key`` in a fresh process (so freed
    pages of earlier variants hide nothing); the script prints ``{"peak_mib": ...}`` for it."""
    out = {}
    for key in keys:
        cmd = [sys.executable, script, "--memory-of", key, "--device", str(device)]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[key] = round(json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"], 1)
    return out
