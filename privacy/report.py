"""The server's per-site privacy ledgers and the privacy-budget report of a run.

Each DP site sends its ledger (accountant history, delta, budget, calibration, per-round epsilon;
no data) with every train reply. The server keeps the latest one per site in
``<run>/privacy/site_ledgers.json`` and in every checkpoint, and ``meddiff privacy report RUN_DIR``
(also written at the end of every DP run) turns them into ``privacy_report.{json,md,png}``.

The report recomputes every epsilon from the ledger's history alone (a fresh Opacus RDP
accountant), so an auditor can reproduce it, and asks the PRV accountant for a second opinion,
flagged when the two differ by more than 5%.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Mapping, Optional

from configs import load_config
from meddiff.checkpoint import atomic_write_text
from meddiff.recipes.build import trainable_parameters
from meddiff.recipes.initial import RECORD_FILE as INITIAL_RECORD
from meddiff.recipes.phases import phase_named
from privacy.accounting import epsilon_of, prv_epsilon_of, total_steps
from privacy.guarantee import GROUP_CAVEAT, covered, guarantee_lines, unit_summary

LEDGERS_FILE = Path("privacy") / "site_ledgers.json"
CENTRAL_FILE = Path("privacy") / "central.json"
PRV_TOLERANCE = 0.05

NOT_COVERED = (
    GROUP_CAVEAT,
    "The held-out evaluation loss each site reports is computed without DP on records that are not in its "
    "training set.",
    "Anything trained without DP, for example an autoencoder pre-trained or trained as 'not private', and any "
    "public data.",
    "For latent diffusion, the latent scale factor: each site's count, sum and sum of squares of its training "
    "latents, sent once without noise (three numbers per site).",
    "Choices made by looking at the data (hyperparameter tuning, data selection) outside this accounting.",
    "Attacks on the random number generator itself: the noise comes from PyTorch's generator seeded from the OS "
    "entropy pool (unpredictable to the server), not from a cryptographically secure stream (Opacus secure_mode).",
)


def update_site_ledgers(ledgers: dict, replies_ledgers: Mapping[str, str]) -> dict:
    """Merge the ledgers from this round's replies (``{site: ledger JSON}``) into ``ledgers``;
    a ledger with fewer steps than the one held never replaces it."""
    for site, text in replies_ledgers.items():
        data = json.loads(text)
        held = ledgers.get(site)
        if held is None or total_steps(data["history"]) >= total_steps(held["history"]):
            ledgers[site] = data
    return ledgers


def save_site_ledgers(run_dir: str | Path, ledgers: dict, *, refused: Optional[list[str]] = None) -> Path:
    """The server's copy of every DP site's ledger, and the sites that refused a round (any reason)."""
    return atomic_write_text(Path(run_dir) / LEDGERS_FILE,
                             json.dumps({"sites": ledgers, "refused": sorted(refused or [])}, indent=2))


def site_summary(ledger: dict) -> dict:
    """One site's figures, every epsilon recomputed from the history."""
    history = [tuple(h) for h in ledger["history"]]
    delta, budget = float(ledger["delta"]), float(ledger["budget"])
    rdp = epsilon_of(history, delta)
    prv = prv_epsilon_of(history, delta)
    differs = None if prv is None or rdp == 0 else abs(prv - rdp) / rdp
    rounds = ledger.get("rounds", [])
    cals = ledger.get("calibrations", [])
    last = cals[-1] if cals else {}
    clip = [r["clip_fraction"] for r in rounds if "clip_fraction" in r]
    reported = float(ledger.get("epsilon", rdp))
    return {
        "site": ledger["site"],
        "epsilon": rdp,
        "epsilon_reported_by_site": reported,
        "reported_matches_history": math.isclose(reported, rdp, rel_tol=1e-6, abs_tol=1e-9),
        "delta": delta,
        "budget": budget,
        "remaining": max(0.0, budget - rdp),
        "steps": total_steps(history),
        "noise_multiplier": last.get("noise_multiplier"),
        "sample_rate": last.get("sample_rate"),
        "max_grad_norm": last.get("max_grad_norm"),
        "batch_size": last.get("batch_size"),
        "num_examples": last.get("num_examples"),
        "clip_fraction_mean": sum(clip) / len(clip) if clip else None,
        "clip_fraction_last": clip[-1] if clip else None,
        "accountant": "rdp",
        "prv_epsilon": prv,
        "prv_relative_difference": differs,
        "prv_flag": (prv is None) or (differs is not None and differs > PRV_TOLERANCE),
        "rounds": [{"study": r.get("study"), "phase": phase_named(r.get("phase")).name, "round": r["round"], "steps": r["steps"],
                    "epsilon": r["epsilon"], "clip_fraction": r.get("clip_fraction")} for r in rounds],
        "steps_by_phase": _steps_by_phase(rounds),
        "calibrations": cals,
        "history": [list(h) for h in history],
        **unit_summary(ledger, rdp, delta),  # what the epsilon protects: unit, patients, k, the guarantee in words
    }


def _steps_by_phase(rounds: list[dict]) -> dict[str, int]:
    out: Counter = Counter()
    for r in rounds:
        out[phase_named(r.get("phase")).name] += int(r["steps"])
    return dict(out)


def phase_statements(run_dir: Path) -> list[dict]:
    """What each training phase of the run covers, in plain words (from the run's ``config.yaml``)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    cfg = yaml.safe_load(path.read_text()) if path.is_file() else {}
    ae = (cfg or {}).get("autoencoder") or {}
    diffusion = {"phase": "diffusion", "private": True,
                 "statement": "The denoising UNet is trained with DP-SGD at every site; its steps are in each site's ledger."}
    if not ae.get("enabled"):
        return [diffusion]
    mode = ae.get("mode", "dp")
    diffusion["statement"] = ("Phase 2, the latent UNet, is trained with DP-SGD at every site on its images' latents (each "
                              "image is one record); its steps are in each site's ledger.")
    first = {
        "dp": ("Phase 1, the autoencoder, is trained with DP-SGD at every site; its steps are composed with phase 2's in "
               "one accountant history per site, so the epsilon above covers the whole pipeline, decoder included.", True),
        "not_private": ("Phase 1, the autoencoder, was trained on the sites' data WITHOUT differential privacy "
                        "(autoencoder.mode: not_private). The autoencoder, and the decoder every released sample passes "
                        "through, are NOT covered by the epsilon above: they can reveal training images. Only the phase-2 "
                        "UNet updates are protected.", False),
        "public": ("Phase 1, the autoencoder, was pre-trained on public data (or loaded) and never saw site data; it "
                   "adds no privacy cost and needs none.", True),
    }[mode]
    return [{"phase": "autoencoder", "mode": mode, "private": first[1], "statement": first[0]}, diffusion]


def save_central(run_dir: str | Path, central: dict) -> Path:
    return atomic_write_text(Path(run_dir) / CENTRAL_FILE, json.dumps(central, indent=2))


def central_summary(central: dict) -> dict:
    """User-level DP of the central mechanism (McMahan et al. 2018, DP-FedAvg): each release adds
    Gaussian noise of std ``sigma * S / m`` to the mean of ``m`` clipped site updates, so it is a
    Gaussian mechanism with noise multiplier sigma on one site's whole contribution. No
    amplification by sampling is claimed (Flower samples a fixed number of sites, not Poisson;
    Flower's own accountant makes the same choice). For adaptive clipping, Flower enlarges the
    update noise so that, together with the noisy clipped count, the release costs exactly sigma
    (Andrew et al. 2021, Thm. 1)."""
    q = 1.0
    history = [(central["noise_multiplier"], q, central["releases"])] if central["releases"] else []
    delta = min(1e-5, 1.0 / (10 * max(central["num_sites"], 1)))
    eps = epsilon_of(history, delta) if central["noise_multiplier"] > 0 else math.inf
    central = {**central, "sites_per_round": central.get("sites_per_round", central.get("sampled_sites"))}
    return {**central, "sample_rate": q, "delta": delta, "epsilon": eps, "history": [list(h) for h in history],
            "unit": "one site (all of its data)"}


def privacy_report(run_dir: str | Path) -> dict:
    """The report of a run directory (reads ``privacy/site_ledgers.json`` and ``privacy/central.json``)."""
    run_dir = Path(run_dir)
    path, central_path = run_dir / LEDGERS_FILE, run_dir / CENTRAL_FILE
    if not path.exists() and not central_path.exists():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a run with privacy.enabled=true or "
                                "privacy.central_dp (or no DP site has replied yet)")
    data = json.loads(path.read_text()) if path.exists() else {"sites": {}}
    sites = [site_summary(data["sites"][name]) for name in sorted(data["sites"])]
    central = central_summary(json.loads(central_path.read_text())) if central_path.exists() else None
    refused = data.get("refused", data.get("exhausted", []))  # "exhausted": runs written before refusals had reasons
    return {"run_dir": str(run_dir), "sites": sites, "central": central, "refused": refused,
            "phases": phase_statements(run_dir), "initial_weights": _initial_weights(run_dir),
            "trainable": _trainable(run_dir),
            "guarantee": {"covers": covered(sites), "does_not_cover": list(NOT_COVERED)},
            "audit": "epsilon = opacus.accountants.RDPAccountant with .history = the site's history, "
                     ".get_epsilon(delta); nothing else enters it"}


def _initial_weights(run_dir: Path) -> Optional[dict]:
    """The record of ``train.init_from`` in the run directory, if the run started from a checkpoint."""
    path = run_dir / INITIAL_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _trainable(run_dir: Path) -> Optional[dict]:
    """What the sites' denoiser trained (``train.trainable``), from the run's ``config.yaml``."""
    path = run_dir / "config.yaml"
    return trainable_parameters(load_config(path)) if path.is_file() else None


def write_privacy_report(run_dir: str | Path) -> dict[str, Path]:
    """Write ``privacy_report.json``, ``.md`` and ``.png`` into the run directory."""
    run_dir = Path(run_dir)
    report = privacy_report(run_dir)
    out = {"json": run_dir / "privacy_report.json", "md": run_dir / "privacy_report.md", "png": run_dir / "privacy_report.png"}
    out["json"].write_text(json.dumps(report, indent=2))
    out["md"].write_text(_markdown(report))
    _plot(report, out["png"])
    return out


def _fmt(v, spec=".4g") -> str:
    return "n/a" if v is None else format(v, spec)


def _markdown(report: dict) -> str:
    lines = ["# Privacy-budget report", "", f"Run: `{report['run_dir']}`", "",
             "| site | epsilon (RDP) | delta | budget | remaining | sigma | sample rate | steps | C | clip fraction (mean) | PRV epsilon | PRV check |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in report["sites"]:
        if s["prv_epsilon"] is None:
            check = "PRV failed (RDP stands)"
        else:
            check = f"{'FLAG ' if s['prv_flag'] else 'ok '}{100 * (s['prv_relative_difference'] or 0):.1f}%"
        lines.append(f"| {s['site']} | {s['epsilon']:.4f} | {s['delta']:.2e} | {s['budget']:g} | {s['remaining']:.4f} | "
                     f"{_fmt(s['noise_multiplier'])} | {_fmt(s['sample_rate'])} | {s['steps']} | {_fmt(s['max_grad_norm'])} | "
                     f"{_fmt(s['clip_fraction_mean'], '.3f')} | {_fmt(s['prv_epsilon'])} | {check} |")
    if report["refused"]:
        lines += ["", f"Sites that refused a round (budget spent, or a policy such as DP-only): {', '.join(report['refused'])}."]
    bad = [s["site"] for s in report["sites"] if not s["reported_matches_history"]]
    lines += ["", "Every epsilon above is recomputed from the site's accountant history alone. "
              + (f"**Mismatch** between the epsilon reported by {', '.join(bad)} and its history." if bad
                 else "Each site's reported epsilon matches its history.")]
    c = report.get("central")
    if c:
        lines += ["", "## Central DP (user-level)", "",
                  f"Flower's client-side {c['mode']} clipping: {c['releases']} noisy releases, noise multiplier "
                  f"{c['noise_multiplier']:g}, clipping norm {c['clipping_norm']:g}"
                  + (" (initial; adapted each round)" if c["mode"] == "adaptive" else "")
                  + f", {c['sites_per_round']} of {c['num_sites']} sites per round: epsilon {c['epsilon']:.4g} at delta "
                  f"{c['delta']:.1e} for {c['unit']}. With 3 to 10 hospitals this guarantee is weak or the noise "
                  "(std sigma x S / m on the mean update) swamps the signal; record-level DP at each site is the "
                  "meaningful guarantee there."]
    init = report.get("initial_weights")
    if init:
        lines += ["", "## Initial weights", "", f"`{init['path']}` (sha256 `{init['sha256']}`): {init['note']}."]
    t = report.get("trainable")
    if t:
        lines += ["", "## Trainable parameters", "", f"`train.trainable: {t['mode']}`"
                  + (f" (rank {t['lora_rank']})" if t["lora_rank"] else "")
                  + f": the denoiser trains {t['trainable']:,} of {t['total']:,} parameters "
                  f"({100 * t['trainable'] / t['total']:.1f}%); a site's update carries {t['update_tensors']} of "
                  f"{t['tensors']} tensors. Only those receive per-example gradients, clipping and noise; the "
                  "frozen ones are never trained on site data and never leave the server."]
    lines += ["", "## What each phase covers", ""]
    lines += [f"- **{p['phase']}**{'' if p['private'] else ' (NOT PRIVATE)'}: {p['statement']}" for p in report["phases"]]
    if len(report["phases"]) > 1:
        lines += ["", "| site | steps by phase |", "| --- | --- |"]
        lines += [f"| {s['site']} | {', '.join(f'{k}: {v}' for k, v in s['steps_by_phase'].items())} |" for s in report["sites"]]
    lines += ["", "## Epsilon by round", "", "| site | study | phase | round | steps | epsilon | clip fraction |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in report["sites"]:
        for r in s["rounds"]:
            lines.append(f"| {s['site']} | {r['study']} | {r['phase']} | {r['round']} | {r['steps']} | {r['epsilon']:.4f} | "
                         f"{_fmt(r['clip_fraction'], '.3f')} |")
    lines += ["", "## What each site's epsilon protects", "", *guarantee_lines(report["sites"])]
    lines += ["", "## What the guarantee covers", "", report["guarantee"]["covers"], "", "## What it does not cover", ""]
    lines += [f"- {item}" for item in report["guarantee"]["does_not_cover"]]
    lines += ["", "## Reproducing it", "", f"`{report['audit']}`; the histories are in `privacy_report.json`.", ""]
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for s in report["sites"]:
        one_run = len({(r["study"], r["phase"]) for r in s["rounds"]}) <= 1
        xs = [r["round"] for r in s["rounds"]] if one_run else list(range(1, len(s["rounds"]) + 1))
        line, = ax.plot(xs, [r["epsilon"] for r in s["rounds"]], marker="o", label=f"{s['site']} (budget {s['budget']:g})")
        ax.axhline(s["budget"], color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.set_xlabel("round (or, across studies or phases, the site's n-th round)")
    ax.set_ylabel("epsilon (RDP)")
    ax.set_title("Per-site privacy spending")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
