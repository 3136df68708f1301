"""DP-SGD step time and memory over non-DP step time, on the default ADM.

Variants, each one logical batch of ``train.batch_size`` images at ``data.image_size`` (default
config: 32 x 32, batch 32, the default UNet), AdamW, v-prediction loss with K (t, noise) draws:

- ``nondp_k{K}``: the plain training step (the reference for K);
- ``hooks_k{K}``: Opacus hooks mode, per-row gradients collapsed to per-image before clipping;
- ``vmap_k{K}``: Opacus no_op mode, per-image gradients from ``torch.func.vmap`` over the whole
  model (``privacy.grad_sample_mode: vmap``);
- ``bk_k{K}``: Opacus no_op mode, per-image gradients by book-keeping (``privacy.grad_sample_mode:
  bk``, the default): a batched backward for activations, per-layer per-image weight gradients.
- ``{mode}_patient_k{K}``: the same mode at the patient unit (``privacy.unit: patient``): the same
  records per step, as ``batch / 4`` patients of k = 4 records each, one clipped gradient per
  patient (the records' per-image gradients averaged per patient before clipping); the target is
  at most 1.2x the record-unit step of the same mode and K.

With ``--cohort-study`` it also trains a 2-D slice study of the template brain cohort at one site
at epsilon 10 per patient, next to the record-unit study at the same patient-level epsilon
(epsilon 10 / k_max per slice, by group privacy), and reports their held-out losses and sample
grids (:mod:`bench.patient_unit_study`).

The variants run round-robin in one process after warm-up (machine noise hits all alike); the
median step is reported with the ratio to the non-DP step of the same K (variants of one K run
together; K groups one after the other, to bound memory). Peak memory is measured per variant
in a fresh subprocess.

    python bench/dp_overhead.py [--reps 8] [--device auto] [--threads 0] [--variants a,b] [--cohort-study]

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
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from bench.common import bench_parser, bench_setup, peak_memory_in_subprocesses, peak_memory_mib  # noqa: E402
from configs import load_config  # noqa: E402
from meddiff.recipes.build import build_diffusion, build_unet_from_section, build_optimizer  # noqa: E402
from meddiff.train import train_step  # noqa: E402
from privacy.engine import make_private  # noqa: E402
from privacy.patients import PatientSampler  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
VARIANTS = ("nondp_k1", "bk_k1", "hooks_k1", "vmap_k1", "bk_patient_k1", "hooks_patient_k1",
            "nondp_k4", "bk_k4", "hooks_k4", "vmap_k4", "bk_patient_k4", "hooks_patient_k4")
RECORDS_PER_PATIENT = 4


def make_step(variant: str, device: torch.device):
    cfg = load_config(DEFAULT_CONFIG, [])
    mode, k = variant.rsplit("_k", 1)
    k = int(k)
    torch.manual_seed(0)
    size, batch = cfg.data.image_size, cfg.train.batch_size
    model = build_unet_from_section(cfg.model, size).to(device).train()
    optimizer = build_optimizer(cfg.train, model.parameters())
    diffusion = build_diffusion(cfg.diffusion)
    x0 = torch.randn(batch, cfg.model.in_channels, size, size, device=device).clamp(-1, 1)
    y = (torch.arange(batch, device=device) % cfg.model.num_classes) if cfg.model.num_classes else None
    step_fn, private = train_step, None
    if mode != "nondp":
        loader = DataLoader(TensorDataset(x0.cpu(), torch.zeros(batch, dtype=torch.long)), batch_size=batch)
        patients = None
        if mode.endswith("_patient"):  # batch / 4 patients of 4 records: the same records per step
            mode = mode[:-len("_patient")]
            groups = [list(range(i, min(i + RECORDS_PER_PATIENT, batch))) for i in range(0, batch, RECORDS_PER_PATIENT)]
            patients = PatientSampler(groups, sample_rate=1.0, records_per_patient=RECORDS_PER_PATIENT,
                                      max_physical_batch_size=batch, generator=torch.Generator().manual_seed(2))
        private = make_private(model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0, noise_multiplicity=k,
                               grad_sample_mode=mode, patients=patients)
        model, optimizer, step_fn = private.model, private.optimizer, private.step_fn
        if patients is not None:  # what patient_batches sets before each physical batch: the patient of each record
            private.stats.groups = torch.arange(batch) // RECORDS_PER_PATIENT
    gen = torch.Generator(device=device).manual_seed(1)
    n_params = sum(p.numel() for p in (model._module if hasattr(model, "_module") else model).parameters())

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step_fn(model, diffusion, optimizer, x0, y, noise_multiplicity=k, generator=gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        optimizer.zero_grad(set_to_none=True)  # release per-sample gradients between steps (as the next step would)
        return elapsed

    return step, n_params, (size, batch)


def main() -> None:
    ap = bench_parser(__doc__, reps=8, warmup=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--cohort-study", action="store_true", help="also train the patient- vs record-unit cohort study")
    ap.add_argument("--study-steps", type=int, default=150, help="DP steps of each cohort study")
    args = ap.parse_args()
    device = bench_setup(args)
    if args.memory_of:
        step, _, _ = make_step(args.memory_of, device)
        print(json.dumps({"peak_mib": peak_memory_mib(step, device)}))  # from before the first step, as unet_speed
        return

    variants = [v for v in args.variants.split(",") if v]
    median = {}
    for k in sorted({v.rsplit("_k", 1)[1] for v in variants}):  # one K at a time bounds memory
        group = [v for v in variants if v.endswith(f"_k{k}")]
        steps = {}
        for v in group:
            steps[v], n_params, (size, batch) = make_step(v, device)
            for _ in range(args.warmup):
                steps[v]()
        times = {v: [] for v in group}
        for _ in range(args.reps):  # round-robin within the group: noise hits every variant alike
            for v in group:
                times[v].append(steps[v]())
        median.update({v: statistics.median(t) for v, t in times.items()})
        del steps
    memory = peak_memory_in_subprocesses(__file__, variants, args, device)
    ratio = {v: round(median[v] / median[f"nondp_k{v.rsplit('_k', 1)[1]}"], 3)
             for v in variants if not v.startswith("nondp") and f"nondp_k{v.rsplit('_k', 1)[1]}" in median}
    best = min(ratio, key=ratio.get) if ratio else None
    record_unit = {v: v.replace("_patient", "") for v in variants if "_patient" in v}
    patient = {v: round(median[v] / median[r], 3) for v, r in record_unit.items() if r in median}
    study = None
    if args.cohort_study:
        # loaded on demand: the study reads the MNI152 template and trains; the timing alone needs neither
        from bench.patient_unit_study import cohort_study

        study = cohort_study(steps=args.study_steps, device=device)
    print(json.dumps({
        "benchmark": "dp_overhead", "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "model": "ADM of configs/default.yaml", "params_millions": round(n_params / 1e6, 3), "resolution": size, "batch": batch,
        "reps": args.reps, "median_step_s": {v: round(t, 4) for v, t in median.items()},
        "ratio_to_nondp_same_k": ratio, "peak_memory_mib": memory,
        "memory_ratio_to_nondp_same_k": {v: round(memory[v] / max(memory[f"nondp_k{v.rsplit('_k', 1)[1]}"], 1e-9), 2)
                                         for v in ratio},
        "fastest_dp_variant": best, "target_ratio": 1.5,
        "patient_unit": {"records_per_patient": RECORDS_PER_PATIENT, "patients_per_step": batch // RECORDS_PER_PATIENT,
                         "ratio_to_record_unit_same_mode_and_k": patient, "target_ratio": 1.2,
                         "memory_ratio_to_record_unit": {v: round(memory[v] / max(memory[r], 1e-9), 2)
                                                         for v, r in record_unit.items() if r in memory}},
        "cohort_study": study,
    }, indent=2))


if __name__ == "__main__":
    main()
