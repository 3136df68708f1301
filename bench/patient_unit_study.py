"""Patient-level against record-level DP at the same patient-level epsilon, on 2-D slices of the
template brain cohort (the MNI152 template of ``../shared/data``, as `meddiff data from-template`
writes it), at one site.

- ``patient``: ``privacy.unit: patient`` at epsilon 10 per patient, k = 4 slices of each sampled
  patient per step, ``batch / 4`` expected patients per step;
- ``record``: ``privacy.unit: record`` at epsilon ``10 / k_max`` per slice, which by group privacy
  (Dwork & Roth 2014, Thm. 2.2) is what bounds a patient with ``k_max`` slices by epsilon 10
  (with a larger delta); ``batch`` expected slices per step (the same records per step);
- ``nondp``: the same steps without DP, for reference.

Each trains the default ADM for the same number of steps from the same start, then reports the
held-out loss (fixed t and noise) on slices of held-out patients and writes a grid of samples;
the three grids side by side and the figures go to ``bench/results/patient_unit_study/``.

    python bench/patient_unit_study.py [--steps 150] [--device auto]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import pick_device, side_by_side  # noqa: E402
from client.local import local_evaluate, local_train
from configs import load_config
from meddiff.data.adapters import index_dataset
from meddiff.data.cache import MedicalDataset
from meddiff.data.template import write_template_cohort
from meddiff.outputs import save_grid_png
from meddiff.recipes.build import build_diffusion, build_sampler, build_unet
from meddiff.recipes.phases import DIFFUSION
from meddiff.sampling.generate import generate
from privacy.site import SitePrivacy

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO.parent / "shared" / "data" / "mni152_t1_1mm.nii.gz"
OUT = REPO / "runs" / "bench" / "patient_unit_study"
RESULTS = REPO / "bench" / "results" / "patient_unit_study"
EPSILON_PER_PATIENT = 10.0


def _cohort(root: Path, num_patients: int, held_out: int):
    write_template_cohort(TEMPLATE, root / "cohort", num_patients=num_patients, spacing=6.0, seed=0)
    base = ["data.dataset=brats", f"data.path={root / 'cohort'}", f"data.cache_dir={root / 'cache'}", "privacy.enabled=true",
            "federation.num_rounds=1", "train.threads=0"]
    cfg = load_config(REPO / "configs" / "default.yaml", base)
    records = index_dataset(cfg.data).records
    train = MedicalDataset(records[held_out:], cfg.data, spatial_dims=2, train=True)
    test = MedicalDataset(records[:held_out], cfg.data, spatial_dims=2)
    return base, train, test


def _samples(cfg, state: dict, path: Path, device: torch.device) -> str:
    model = build_unet(cfg).to(device)
    model.load_state_dict(state)
    diffusion = build_diffusion(cfg.diffusion)
    y = torch.arange(16) % cfg.model.num_classes if cfg.model.num_classes else None
    images = generate(model, build_sampler(cfg.sampler, diffusion), shape=[16, 1, cfg.data.image_size, cfg.data.image_size],
                      num_inference_steps=cfg.sampler.num_inference_steps, y=y, device=device, progress=False,
                      generator=torch.Generator().manual_seed(0))
    return str(save_grid_png(images.cpu(), path, nrow=4, upscale=2))


def _run(base: list[str], unit: str, train, test, *, steps: int, epsilon: float, batch: int, start: dict,
         root: Path, device: torch.device) -> dict:
    cfg = load_config(REPO / "configs" / "default.yaml", base + [f"federation.local_steps={steps}",
                                                                 f"train.batch_size={batch}"])
    privacy = None
    if unit != "nondp":
        cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, unit=unit, target_epsilon=epsilon))
        privacy = SitePrivacy.open(cfg, site="site_0", train_set=train, state_dir=root / f"state_{unit}", budget=epsilon,
                                   study=unit)
    else:
        cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, enabled=False))
    state, metrics = local_train(cfg, start, train, server_round=1, site_index=0, privacy=privacy, phase=DIFFUSION)
    held_out = local_evaluate(cfg, state, test, site_index=0)["eval_loss"]
    out = {"held_out_loss": round(held_out, 4), "train_loss": round(metrics["train_loss"], 4), "steps": int(metrics["steps"]),
           "seconds": round(metrics["seconds"], 1), "samples": _samples(cfg, state, OUT / f"{unit}.png", device)}
    if privacy is not None:
        cal = privacy.calibration
        out.update({"epsilon": round(metrics["epsilon"], 4), "delta": privacy.ledger.delta, "sigma": round(cal.noise_multiplier, 4),
                    "sample_rate": round(cal.sample_rate, 5), "units": cal.num_examples, "batch_size": batch,
                    "unit": cal.unit})
    return out


def cohort_study(*, steps: int, device: torch.device, num_patients: int = 24, held_out: int = 4) -> dict:
    """Train and compare the three studies; ``{"patients", "slices", "k_max", "patient", "record", "nondp"}``."""
    if not TEMPLATE.is_file():
        return {"skipped": f"{TEMPLATE} is absent"}
    with tempfile.TemporaryDirectory(prefix="pu-study-") as tmp:
        root = Path(tmp)
        base, train, test = _cohort(root, num_patients, held_out)
        k_max = max(train.patient_ids.count(p) for p in set(train.patient_ids))
        batch = load_config(REPO / "configs" / "default.yaml", []).train.batch_size
        torch.manual_seed(0)
        start = {k: v.clone() for k, v in build_unet(load_config(REPO / "configs" / "default.yaml", base)).state_dict().items()}
        common = dict(steps=steps, start=start, root=root, device=device)
        result = {"patients": num_patients - held_out, "held_out_patients": held_out, "slices": len(train),
                  "held_out_slices": len(test), "k_max": k_max, "epsilon_per_patient": EPSILON_PER_PATIENT}
        result["patient"] = _run(base, "patient", train, test, epsilon=EPSILON_PER_PATIENT, batch=batch // 4, **common)
        result["record"] = _run(base, "record", train, test, epsilon=EPSILON_PER_PATIENT / k_max, batch=batch, **common)
        result["nondp"] = _run(base, "nondp", train, test, epsilon=0.0, batch=batch, **common)
    write_results(result)
    return result


def write_results(result: dict) -> None:
    """The figures as JSON and the three sample grids side by side, in ``RESULTS``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cohort_study.json").write_text(json.dumps(result, indent=2) + "\n")
    eps = result["epsilon_per_patient"]
    labels = {"patient": f"patient unit, epsilon {eps:g} per patient",
              "record": f"record unit, epsilon {eps / result['k_max']:.2f} per slice\n(group bound for {result['k_max']} slices)",
              "nondp": "no DP"}
    side_by_side({f"{text}\nheld-out loss {result[arm]['held_out_loss']:.3f}": result[arm]["samples"] for arm, text in labels.items()},
                 RESULTS / "side_by_side.png", title=f"Template brain cohort, {result['slices']} slices of {result['patients']} patients, one site")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    print(json.dumps(cohort_study(steps=args.steps, device=pick_device(args.device)), indent=2))
