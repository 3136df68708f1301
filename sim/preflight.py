"""Checks that ``meddiff simulate`` makes before it starts Flower, so that an impossible setting or
a bad resume is a clear error naming the key or the file, not a hang or a traceback in the logs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from configs import ConfigError, ExperimentConfig, load_config_dict
from configs.compare import resume_conflicts
from configs.load import read_yaml_mapping
from meddiff.checkpoint import Checkpoint, load_checkpoint
from meddiff.recipes.initial import load_initial_weights, start_from
from meddiff.recipes.phases import private_plan, study_phases
from meddiff.recipes.sites import phantom_site_plan, site_dataset
from privacy.calibration import calibrate_study, site_delta
from privacy.patients import site_units


def check_federation(cfg: ExperimentConfig) -> None:
    """Site counts a simulation can never satisfy."""
    fed = cfg.federation
    if fed.min_train_nodes > fed.num_sites:
        raise ConfigError(f"'federation.min_train_nodes' ({fed.min_train_nodes}) is larger than 'federation.num_sites' "
                          f"({fed.num_sites}): no round could ever start; lower min_train_nodes or add sites")
    sampled = int(fed.num_sites * fed.fraction_train)
    if sampled < fed.min_train_nodes:
        raise ConfigError(f"'federation.fraction_train' ({fed.fraction_train:g}) samples {sampled} of {fed.num_sites} sites "
                          f"per round, fewer than 'federation.min_train_nodes' ({fed.min_train_nodes}); raise "
                          f"fraction_train to at least {fed.min_train_nodes / fed.num_sites:.3g}")


def site_sizes(cfg: ExperimentConfig, manifest: Optional[dict]) -> dict[str, int]:
    """Privacy units of every simulated site's training data, patients or records (what each site
    calibrates its DP on; phantoms are one image per patient)."""
    n, pc = cfg.federation.num_sites, cfg.privacy
    if manifest is None:
        return {f"site_{i}": phantom_site_plan(i, n, cfg)["num_train"] for i in range(n)}
    return {s["name"]: site_units(site_dataset(manifest, i, cfg, split="train"), pc.unit, pc.records_per_patient).count
            for i, s in enumerate(manifest["sites"])}


def check_privacy_plan(cfg: ExperimentConfig, sizes: dict[str, int]) -> dict[str, float]:
    """Every site can calibrate a sigma for the study's planned steps within the budget;
    ``{site: sigma}`` (empty without DP)."""
    if not cfg.privacy.enabled:
        return {}
    plan, sigmas = private_plan(cfg), {}
    steps = ", ".join(f"{phase}: {b} per batch x {n} steps" for phase, (b, n) in plan.items())
    for site, n in sizes.items():
        try:
            delta = site_delta(cfg.privacy, n, site)
            sigmas[site], _ = calibrate_study(budget=cfg.privacy.target_epsilon, delta=delta, num_examples=n, plan=plan)
        except ValueError as exc:
            raise ConfigError(f"'privacy.target_epsilon' ({cfg.privacy.target_epsilon:g}) cannot cover the planned DP "
                              f"steps ({steps}) of {site} ({n} patients or records, its privacy units) at any noise level: {exc}; raise the budget, or "
                              "lower federation.num_rounds / federation.local_steps") from None
    return sigmas


def check_resume(cfg: ExperimentConfig, run_dir: Path, resume_from: str) -> Checkpoint:
    """The checkpoint exists, reads, and comes from a study this config may continue."""
    ckpt = load_checkpoint(resume_from)
    try:
        stored = load_config_dict(ckpt.config)
    except ConfigError as exc:
        raise ConfigError(f"{resume_from}: its stored config is not valid for this meddiff version: {exc}") from None
    conflicts = resume_conflicts(stored, cfg)
    if conflicts:
        raise ConfigError(f"cannot resume from {resume_from}: this config differs from the checkpoint's in what a resume "
                          f"may not change: {'; '.join(conflicts)}")
    if "study" not in ckpt.extra:
        raise ConfigError(f"{resume_from}: not a federated round checkpoint (it names no study); resume from "
                          "<run>/checkpoints/round_*.pt")
    existing = run_dir / "config.yaml"
    if existing.is_file():
        conflicts = resume_conflicts(load_config_dict(read_yaml_mapping(existing)), cfg)
        if conflicts:
            raise ConfigError(f"{run_dir} holds a run of another study ({'; '.join(conflicts)}); resume into a new "
                              "--run-dir, or into the run the checkpoint belongs to")
    return ckpt


def check_fresh_run_dir(run_dir: Path) -> None:
    if (run_dir / "metrics.csv").is_file() or (run_dir / "checkpoints").is_dir():
        raise ConfigError(f"{run_dir} already holds a federated run; continue it with --resume-from "
                          f"{run_dir / 'checkpoints' / 'last.pt'}, or choose another --run-dir / output.name")


def check_initial_weights(cfg: ExperimentConfig) -> None:
    """``train.init_from`` exists, reads, and fits every phase it starts (the differing keys named)."""
    try:
        initial = load_initial_weights(cfg)
        for phase in study_phases(cfg) if initial is not None else ():
            start_from(phase.build_model(cfg), phase, initial)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
