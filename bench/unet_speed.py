"""Train-step time of our ADM UNet against MONAI's DiffusionModelUNet and diffusers' UNet2DModel.

All models: 1 channel, 32x32, batch 32, three levels with attention at 16x16 and 8x8, AdaGN
(scale-shift) time conditioning, parameter counts matched within 10%. One train step = forward,
MSE loss, backward and an AdamW step. The models run alternately in one process (round-robin,
after warm-up) so machine noise hits all of them alike; the median per model is reported, with
ratios. Peak memory is measured per model in a fresh subprocess (CUDA: max allocated; CPU: peak RSS
growth over the model's resident size).

    python bench/unet_speed.py [--reps 10] [--device auto] [--threads 0]

Prints one JSON object.
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

SIZE, BATCH = 32, 32


def build(name: str) -> torch.nn.Module:
    """The compared models.

    - ``diffusers`` / ``monai``: the references in their usual 3-level layout (64, 128, 128).
    - ``ours``: our ADM in ADM's own 32x32 layout (channel_mult (1, 2, 2, 2), as in Nichol &
      Dhariwal 2021's CIFAR-10 models) with BigGAN up/down-sampling, width set to match the
      parameter count.
    - ``ours_3level`` / ``ours_3level_conv_resample``: our ADM in the references' 3-level layout,
      which isolates the implementation from the layout.
    - ``diffusers_4level``: diffusers in the 4-level layout, which isolates the layout.
    """
    from diffusers import UNet2DModel
    from monai.networks.nets import DiffusionModelUNet

    from meddiff.nets import ADMUNet

    if name == "diffusers":
        return UNet2DModel(
            sample_size=SIZE, in_channels=1, out_channels=1, layers_per_block=2, block_out_channels=(64, 128, 128),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            resnet_time_scale_shift="scale_shift", attention_head_dim=32, norm_num_groups=32,
        )
    if name == "diffusers_4level":
        return UNet2DModel(
            sample_size=SIZE, in_channels=1, out_channels=1, layers_per_block=2, block_out_channels=(56, 112, 112, 112),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            resnet_time_scale_shift="scale_shift", attention_head_dim=28, norm_num_groups=28,
        )
    if name == "monai":
        return DiffusionModelUNet(
            spatial_dims=2, in_channels=1, out_channels=1, channels=(64, 128, 128), attention_levels=(False, True, True),
            num_res_blocks=2, num_head_channels=32, resblock_updown=True, norm_num_groups=32,
        )
    if name == "ours":
        return ADMUNet(model_channels=52, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_levels=(1, 2), num_head_channels=26)
    if name == "ours_3level":
        return ADMUNet(model_channels=60, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2), num_head_channels=30)
    if name == "ours_3level_conv_resample":
        return ADMUNet(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2),
                       num_head_channels=32, resblock_updown=False)
    raise ValueError(name)


MODELS = ("diffusers", "monai", "ours", "ours_3level", "ours_3level_conv_resample", "diffusers_4level")
OURS = ("ours", "ours_3level", "ours_3level_conv_resample")


def forward(name: str, model, x, t):
    out = model(x, t)
    return out.sample if name.startswith("diffusers") else out


def make_step(name: str, device: torch.device):
    torch.manual_seed(0)
    model = build(name).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(BATCH, 1, SIZE, SIZE, device=device)
    t = torch.randint(0, 1000, (BATCH,), device=device)
    target = torch.randn_like(x)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = (forward(name, model, x, t) - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return model, step


def measure_memory(name: str, device: torch.device) -> float:
    """Peak memory of three train steps beyond what the model, optimizer and data hold before, MiB."""
    _, step = make_step(name, device)
    return peak_memory_mib(step, device)


def main() -> None:
    args = bench_parser(__doc__, reps=10, warmup=2).parse_args()
    device = bench_setup(args)
    if args.memory_of:
        print(json.dumps({"peak_mib": measure_memory(args.memory_of, device)}))
        return

    steps, params = {}, {}
    for name in MODELS:
        model, step = make_step(name, device)
        params[name] = sum(p.numel() for p in model.parameters())
        for _ in range(args.warmup):
            step()
        steps[name] = step
    times = {name: [] for name in MODELS}
    for _ in range(args.reps):  # round-robin: noise hits every model alike
        for name in MODELS:
            times[name].append(steps[name]())
    median = {name: statistics.median(v) for name, v in times.items()}

    memory = peak_memory_in_subprocesses(__file__, MODELS, args, device)

    reference = min(("diffusers", "monai"), key=median.get)
    ref_params = params[reference]
    result = {
        "benchmark": "unet_train_step",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": BATCH,
        "resolution": SIZE,
        "attention_resolutions": [16, 8],
        "reps": args.reps,
        "params_millions": {k: round(v / 1e6, 3) for k, v in params.items()},
        "param_ratio_to_fastest_reference": {k: round(v / ref_params, 3) for k, v in params.items()},
        "median_step_s": {k: round(v, 4) for k, v in median.items()},
        "peak_memory_mib": memory,
        "fastest_reference": reference,
        "speedup_vs_fastest_reference": {k: round(median[reference] / median[k], 3) for k in OURS},
        "layout_effect_diffusers_4level_vs_3level": round(median["diffusers"] / median["diffusers_4level"], 3),
        "speedup_diffusers_vs_monai": round(median["monai"] / median["diffusers"], 3),
        "target_speedup": 1.2,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
