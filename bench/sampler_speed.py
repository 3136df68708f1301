"""Wall-clock of DDIM with 50 steps against DDPM with 1000 steps on the default ADM.

Both samplers run the same model on the same batch, alternately, in one process; the ratio of
the medians is reported. The model is the default config's UNet (untrained weights: speed does not
depend on them). Prints one JSON object.

    python bench/sampler_speed.py [--reps 3] [--batch 16] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from configs import load_config  # noqa: E402
from meddiff.recipes.build import build_diffusion, build_unet_from_section, sample_shape  # noqa: E402
from meddiff.device import resolve_device  # noqa: E402
from meddiff.sampling import DDIMSampler, DDPMSampler, generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml"))
    args = ap.parse_args()
    cfg = load_config(args.config)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_unet_from_section(cfg.model, cfg.data.image_size).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-zero outputs, as after training
            p.normal_(0, 0.02)
    diffusion = build_diffusion(cfg.diffusion)
    runs = {"ddim50": (DDIMSampler(diffusion), 50), "ddpm1000": (DDPMSampler(diffusion), 1000)}
    shape = sample_shape(cfg, args.batch)
    y = torch.arange(args.batch) % cfg.model.num_classes if cfg.model.num_classes else None

    def once(name):
        sampler, steps = runs[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(model, sampler, shape=shape, num_inference_steps=steps, y=y, generator=torch.Generator().manual_seed(0),
                 device=device, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    once("ddim50")  # warm-up
    times = {name: [] for name in runs}
    for _ in range(args.reps):
        for name in runs:
            times[name].append(once(name))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "benchmark": "sampler_speed",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "image_size": cfg.data.image_size,
        "params_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "reps": args.reps,
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "per_model_call_ms": {"ddim50": round(1000 * med["ddim50"] / 50, 2), "ddpm1000": round(1000 * med["ddpm1000"] / 1000, 2)},
        "speedup_ddim50_vs_ddpm1000": round(med["ddpm1000"] / med["ddim50"], 2),
        "target_speedup": 18.0,
    }, indent=2))


if __name__ == "__main__":
    main()
