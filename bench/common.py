"""Helpers shared by the benchmarks: device choice, peak memory of a step, and the pieces of the
quality benchmarks (domain encoder, bytes of a reply, site step time, membership inference, grids)."""

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


def domain_encoder(cfg, dataset_name: str, path, *, steps: int):
    """The project's domain encoder for ``cfg``'s data (a classifier of its labels), trained once
    and saved at ``path``; an existing file is reused. Returns ``path``."""
    from pathlib import Path

    from meddiff.evaluate.encoders import save_encoder, train_domain_encoder
    from meddiff.recipes.build import build_image_dataset

    path = Path(path)
    if not path.is_file():
        model, info = train_domain_encoder(build_image_dataset(cfg), in_channels=cfg.model.in_channels,
                                           num_classes=cfg.model.num_classes, steps=steps, progress=False)
        save_encoder(path, model, image_size=cfg.data.image_size, dataset=dataset_name, info=info)
    return path


def reply_bytes(cfg) -> int:
    """Bytes of the arrays in one site's training reply under ``cfg`` (its ``train.trainable`` and
    ``federation.transport_dtype``): what :func:`client.local.local_train` returns after one
    non-private step on a few random images, serialised as the reply serialises it."""
    import dataclasses

    from torch.utils.data import TensorDataset

    from client.local import local_train
    from meddiff.recipes.build import build_unet
    from protocol import state_to_arrays

    cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, enabled=False),
                              federation=dataclasses.replace(cfg.federation, local_steps=1),
                              train=dataclasses.replace(cfg.train, batch_size=4, init_from="", threads=0))
    n, size, channels = 8, cfg.data.image_size, cfg.model.in_channels
    data = TensorDataset(torch.rand(n, channels, *(size,) * cfg.model.spatial_dims) * 2 - 1,
                         torch.arange(n) % max(cfg.model.num_classes, 1))
    torch.manual_seed(cfg.train.seed)
    weights, _ = local_train(cfg, build_unet(cfg).state_dict(), data, server_round=1, site_index=0)
    return sum(len(a.data) for a in state_to_arrays(weights, cfg.federation.transport_dtype).values())


def site_step_seconds(run_dir) -> dict:
    """Mean seconds per optimizer step of the sites' local training in a federated run (its
    ``metrics.csv``: each site's ``seconds`` over its ``steps``, all rounds)."""
    import csv
    from pathlib import Path

    with open(Path(run_dir) / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["scope"].startswith("site_") and r.get("steps")]
    steps, seconds = sum(float(r["steps"]) for r in rows), sum(float(r["seconds"]) for r in rows)
    return {"step_s": round(seconds / steps, 3) if steps else None, "steps_all_sites": int(steps),
            "train_s_all_sites": round(seconds, 1)}


def side_by_side(grids: dict, path, *, title: str = "") -> None:
    """One PNG with the sample grids ``{label: png}`` side by side, each under its label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    cols = min(3, len(grids))
    rows = -(-len(grids) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.9 * rows + 0.4), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, png) in zip(axes.flat, grids.items()):
        ax.imshow(Image.open(png).convert("L"), cmap="gray", vmin=0, vmax=255)
        ax.set_title(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97) if title else None)
    fig.savefig(path)
    plt.close(fig)


def members_mia(ckpt, manifest_path, examples: int) -> dict:
    """Loss-based membership inference on a checkpoint: the training records of the manifest's sites
    (members) against the dataset's held-out split (non-members), ``examples`` of each, matched per class."""
    from torch.utils.data import ConcatDataset

    from meddiff.evaluate.federated import dataset_images
    from meddiff.recipes.build import build_diffusion
    from meddiff.recipes.evaluation import loss_attack, matched_indices, real_splits
    from meddiff.recipes.restore import model_from_checkpoint
    from meddiff.recipes.sites import load_manifest, site_dataset

    model, cfg, _ = model_from_checkpoint(ckpt)
    manifest = load_manifest(manifest_path)
    members = ConcatDataset([site_dataset(manifest, i, cfg) for i in range(len(manifest["sites"]))])
    test = real_splits(cfg)[1]
    pool = 4 * examples
    (_, member_y), (_, test_y) = dataset_images(members, pool), dataset_images(test, pool)
    return loss_attack(model, build_diffusion(cfg.diffusion), members, test, matched_indices(member_y, test_y, examples),
                       pool=pool, device="cpu", seed=0)
