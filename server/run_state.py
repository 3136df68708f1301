"""What the server knows about a run beyond the weights, and how it survives in checkpoints.

The study id names the sites' privacy enrolment; the site ledgers are the server's copy of every
DP site's accounting (sent back to the sites, which adopt it when it holds more than their own
disk: a moved or copied run never restarts a site's accounting at zero); refused sites are those
whose budget or policy no longer allows a round. Where the sites keep their state is *not*
stored: in simulation it is always ``<run dir>/site_state``, so a moved run finds its ledgers.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from flwr.app import Message

from configs import ExperimentConfig, config_to_dict
from meddiff.checkpoint import save_checkpoint
from meddiff.recipes.phases import phase_named
from privacy.report import update_site_ledgers
from protocol import reply_ledger
from server.phase import PhaseRun
from server.strategy import base_strategy, strategy_state

log = logging.getLogger("meddiff.server")


@dataclass
class RunState:
    study_id: str
    history: list[dict] = field(default_factory=list)
    ledgers: dict = field(default_factory=dict)
    refused_sites: set[str] = field(default_factory=set)
    refused_nodes: set[int] = field(default_factory=set)
    central: dict = field(default_factory=dict)
    node_sites: dict[int, int] = field(default_factory=dict)
    failed_streak: int = 0
    segmentation: list[dict] = field(default_factory=list)  # the sites' segmentation utility, by round

    @classmethod
    def new(cls, run_dir: Path, central: dict) -> "RunState":
        return cls(study_id=f"{run_dir.name}-{time.strftime('%Y%m%dT%H%M%S')}", central=central)

    def to_checkpoint(self) -> dict:
        """Plain strings for a checkpoint's ``extra`` (``torch.load(weights_only=True)``-safe)."""
        return {"history": json.dumps({"rounds": self.history}), "study": json.dumps({"study-id": self.study_id}),
                "privacy_ledgers": json.dumps(self.ledgers), "refused_sites": json.dumps(sorted(self.refused_sites)),
                "central_dp": json.dumps(self.central), "segmentation": json.dumps(self.segmentation)}

    @classmethod
    def from_checkpoint(cls, extra: dict, default_central: dict) -> "RunState":
        study = json.loads(extra.get("study", "{}"))
        if "study-id" not in study:
            raise ValueError("the checkpoint names no study; it was not written by a federated run")
        return cls(study_id=study["study-id"], history=json.loads(extra.get("history", '{"rounds": []}'))["rounds"],
                   ledgers=json.loads(extra.get("privacy_ledgers", "{}")),
                   refused_sites=set(json.loads(extra.get("refused_sites", extra.get("exhausted_sites", "[]")))),
                   central=json.loads(extra.get("central_dp", json.dumps(default_central))),
                   segmentation=json.loads(extra.get("segmentation", "[]")))

    def merge_privacy(self, updates: Iterable[Message], refusals: Iterable[Message]) -> None:
        """Keep the newest ledger each DP reply carries; remember the sites that refused."""
        found = {}
        for reply in updates:
            name, text = _ledger_of(reply)
            if name:
                found[name] = text
        for reply in refusals:
            name, text = _ledger_of(reply)
            if name:
                found[name] = text
            self.refused_nodes.add(reply.metadata.src_node_id)
            self.refused_sites.add(name or f"node {reply.metadata.src_node_id}")
        self.ledgers = update_site_ledgers(self.ledgers, found)


def _ledger_of(reply: Message) -> tuple[str, str]:
    """``(site, ledger JSON)`` carried by a DP reply, or ``("", "")``."""
    text = reply_ledger(reply)
    if text is None:
        return "", ""
    try:
        return str(json.loads(text)["site"]), text
    except (json.JSONDecodeError, KeyError, TypeError):
        log.warning("node %s sent an unreadable privacy ledger; ignored", reply.metadata.src_node_id)
        return "", ""


def record_config(run_dir: Path, cfg_yaml: str, ckpt) -> None:
    """``config.yaml`` is the config the run started with and is never rewritten; a resume that
    changes what it may (rounds, outputs) records its config beside it."""
    path = run_dir / "config.yaml"
    if not path.exists():
        path.write_text(cfg_yaml)
    elif path.read_text() != cfg_yaml:
        if ckpt is None:
            raise ValueError(f"{run_dir} already holds a run with another config; resume it with resume-from, "
                             "or choose another run directory")
        (run_dir / f"config_resumed_{phase_named(ckpt.extra.get('phase')).name}_{ckpt.step:04d}.yaml").write_text(cfg_yaml)


def save_round_checkpoint(ckpt_dir: Path, cfg: ExperimentConfig, run: PhaseRun, rnd: int, report: list[dict],
                          state: RunState, *, initial=None, codec=None) -> None:
    """``<phase prefix>_<round>.pt`` and ``last.pt``: global and EMA weights, strategy state, round,
    phase, config, per-site metrics, the run state, RNG state, the initial weights' record and, for a
    phase on latents, the autoencoder."""
    extra = {"round": rnd, "phase": run.phase.name, "strategy_state": strategy_state(base_strategy(run.strategy)),
             "site_metrics": json.dumps(report, default=float), "torch_rng": torch.get_rng_state(), **state.to_checkpoint()}
    if run.ema is not None:
        extra["ema_updates"] = run.ema.num_updates
    if initial is not None:
        extra["init_from"] = json.dumps(initial.record())
    if run.phase.trains_on_latents(cfg) and codec is not None:
        extra["autoencoder"] = codec.to_payload()
    for name in (f"{run.phase.checkpoint_prefix}_{rnd:04d}.pt", "last.pt"):
        save_checkpoint(ckpt_dir / name, model_state=run.global_state, ema_state=run.ema.state_dict() if run.ema else None,
                        config=config_to_dict(cfg), step=rnd, extra=extra)
