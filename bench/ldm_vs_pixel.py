"""Latent diffusion against pixel-space diffusion at the same output size: train-step time and peak memory.

Two settings, each side by side in one process (round-robin after warm-up, so machine noise hits
all variants alike; the median step is reported), peak memory per variant in a fresh subprocess:

- ``2d``: 1 x 128 x 128 images, batch 8;
- ``3d``: 1 x 64^3 volumes, batch 2.

Variants of each setting, one UNet architecture (width, levels, blocks, attention at the same
relative depth) so that only the input differs:

- ``pixel``: the ADM UNet on images (AdamW step on the v-prediction loss);
- ``ldm``: the same UNet on 3-channel latents 4x smaller per side, *including* the frozen
  autoencoder's encoder forward on the batch of images;
- ``ldm_cached``: the same without the encoder (latents pre-encoded once, as the federated sites
  do: the first stage is frozen, so a site encodes its data once per autoencoder).

    python bench/ldm_vs_pixel.py [--settings 2d,3d] [--reps 5] [--device auto] [--threads 0]

Prints one JSON object with times, memory and the LDM/pixel ratios.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from bench.common import bench_parser, bench_setup, peak_memory_in_subprocesses, peak_memory_mib  # noqa: E402
from meddiff.recipes.build import build_diffusion  # noqa: E402
from configs import load_config  # noqa: E402
from meddiff.nets import ADMUNet  # noqa: E402
from meddiff.nets.autoencoder import KLAutoencoder  # noqa: E402
from meddiff.train import train_step  # noqa: E402

SETTINGS = {
    "2d": {"dims": 2, "size": 128, "batch": 8, "model_channels": 32, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 2},
    "3d": {"dims": 3, "size": 64, "batch": 2, "model_channels": 16, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 1},
}
AUTOENCODER = {"latent_channels": 3, "channels": (32, 64, 64), "norm_groups": 16}  # 4x smaller per side
VARIANTS = ("pixel", "ldm", "ldm_cached")


def make_step(setting: str, variant: str, device: torch.device):
    s = SETTINGS[setting]
    torch.manual_seed(0)
    latent = variant != "pixel"
    factor = 2 ** (len(AUTOENCODER["channels"]) - 1)
    side = s["size"] // factor if latent else s["size"]
    channels = AUTOENCODER["latent_channels"] if latent else 1
    unet = ADMUNet(spatial_dims=s["dims"], in_channels=channels, out_channels=channels, model_channels=s["model_channels"],
                   channel_mult=s["channel_mult"], num_res_blocks=s["num_res_blocks"],
                   attention_levels=(len(s["channel_mult"]) - 1,), num_head_channels=32, norm_groups=16).to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    diffusion = build_diffusion(load_config(None, ["diffusion.prediction_type=v"]).diffusion)
    images = torch.randn(s["batch"], 1, *(s["size"],) * s["dims"], device=device).clamp(-1, 1)
    encoder = None
    if variant == "ldm":
        encoder = KLAutoencoder(spatial_dims=s["dims"], in_channels=1, **AUTOENCODER).to(device).eval()
        for p in encoder.parameters():
            p.requires_grad_(False)
    cached = torch.randn(s["batch"], channels, *(side,) * s["dims"], device=device)
    gen = torch.Generator(device=device).manual_seed(1)
    n_params = sum(p.numel() for p in unet.parameters())

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if encoder is not None:
            with torch.no_grad():
                x0 = encoder.encode(images)[0]
        else:
            x0 = cached if latent else images
        train_step(unet, diffusion, optimizer, x0, None, generator=gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step, n_params, tuple(cached.shape[1:]) if latent else tuple(images.shape[1:])


def main() -> None:
    ap = bench_parser(__doc__, reps=5, warmup=1)
    ap.add_argument("--settings", default="2d,3d")
    args = ap.parse_args()
    device = bench_setup(args)
    if args.memory_of:
        setting, variant = args.memory_of.split(":")
        step, _, _ = make_step(setting, variant, device)
        print(json.dumps({"peak_mib": peak_memory_mib(step, device, repeats=2)}))
        return

    results = {}
    for setting in [s for s in args.settings.split(",") if s]:
        steps, info = {}, {}
        for v in VARIANTS:
            steps[v], n_params, shape = make_step(setting, v, device)
            info[v] = {"unet_params_millions": round(n_params / 1e6, 3), "unet_input": list(shape)}
            for _ in range(args.warmup):
                steps[v]()
        times = {v: [] for v in VARIANTS}
        for _ in range(args.reps):
            for v in VARIANTS:
                times[v].append(steps[v]())
        del steps
        median = {v: statistics.median(t) for v, t in times.items()}
        memory = {k.split(":")[1]: v for k, v in
                  peak_memory_in_subprocesses(__file__, [f"{setting}:{v}" for v in VARIANTS], args, device).items()}
        s = SETTINGS[setting]
        results[setting] = {
            "output": [1] + [s["size"]] * s["dims"], "batch": s["batch"], "variants": info,
            "median_step_s": {v: round(t, 4) for v, t in median.items()},
            "peak_memory_mib": memory,
            "time_ratio_to_pixel": {v: round(median[v] / median["pixel"], 3) for v in VARIANTS if v != "pixel"},
            "memory_ratio_to_pixel": {v: round(memory[v] / memory["pixel"], 3) for v in VARIANTS if v != "pixel"},
            "memory_saving_percent": {v: round(100 * (1 - memory[v] / memory["pixel"]), 1) for v in VARIANTS if v != "pixel"},
        }
    print(json.dumps({"benchmark": "ldm_vs_pixel", "device": str(device), "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "reps": args.reps, "autoencoder": {**AUTOENCODER, "downsampling": 4},
                      "reference": "latent diffusion reported about 64% less memory than pixel space; target: better",
                      "settings": results}, indent=2))


if __name__ == "__main__":
    main()
