"""Each round's evaluation: every site's held-out loss of the new global model, a federated FID
from the sites' feature statistics (no image leaves a site), and EMA sample grids."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from configs import ExperimentConfig
from meddiff.recipes.build import sample_spacing
from meddiff.ema import EMA
from meddiff.evaluate import build_encoder, federated_fid
from meddiff.latent import LatentCodec
from meddiff.outputs import write_samples
from meddiff.recipes.masks import study_masks
from meddiff.recipes.sample import sample_images
from protocol import NUM_EXAMPLES, EvaluateRes, RoundConfig
from server.replies import expect_reply

log = logging.getLogger("meddiff.server")


class Evaluation:
    def __init__(self, grid: Grid, cfg: ExperimentConfig, run_dir: Path, say: Callable[[str], None]):
        self.grid, self.cfg, self.run_dir, self.say = grid, cfg, run_dir, say
        self.codec: Optional[LatentCodec] = None
        self._masks: dict[int, Optional[torch.Tensor]] = {}  # the same study masks every round, built once

    def masks(self, num: int) -> Optional[torch.Tensor]:
        """``num`` masks to draw samples from (:func:`study_masks`), or None."""
        if num not in self._masks:
            self._masks[num] = study_masks(self.cfg, num)
        return self._masks[num]

    def held_out(self, strategy, rnd: int, global_state, round_config: RoundConfig, *,
                 with_fid: bool) -> tuple[list[dict], dict]:
        """``(rows, site_stats)``: each site's evaluate metrics and, when asked, its feature statistics."""
        config = replace(round_config, want_feature_stats=with_fid).to_record()
        messages = strategy.configure_evaluate(rnd, ArrayRecord(global_state), config, self.grid)
        rows, site_stats = [], {}
        for reply in self.grid.send_and_receive(messages=messages, timeout=self.cfg.federation.round_timeout):
            result, problem = expect_reply(reply, EvaluateRes, "an evaluate message")
            if problem:
                log.warning("round %d: node %s could not evaluate: %s", rnd, reply.metadata.src_node_id, problem)
                continue
            rows.append(dict(result.metrics))
            if with_fid and result.feature_stats is not None:
                site_stats[f"site_{result.site_index}"] = result.feature_stats
        return rows, site_stats

    def federated_fid(self, ema: EMA, model, site_stats: dict) -> dict:
        """FID of EMA samples against the merged site statistics (and per site)."""
        ev = self.cfg.evaluation
        ema.copy_to(model)
        samples = sample_images(model, self.cfg, num=ev.num_samples, device=torch.device("cpu"), seed=self.cfg.train.seed + 1,
                                progress=False, codec=self.codec, masks=self.masks(ev.num_samples))
        features = build_encoder(ev.encoder, ev.encoder_weights or None).encode(samples)
        result = federated_fid(features, site_stats)
        self.say(f"federated FID ({ev.encoder}) {result['fid_global']:.3f}; per site: "
                 + ", ".join(f"{k} {v:.3f}" for k, v in sorted(result["fid_per_site"].items())))
        return result

    def draw(self, ema: EMA, model, stem: str) -> torch.Tensor:
        """EMA samples of the config's sampler, written as ``samples/<stem>.png`` (and .npy / NIfTI)."""
        ema.copy_to(model)
        num = self.cfg.output.num_samples
        samples = sample_images(model, self.cfg, num=num, device=torch.device("cpu"), seed=self.cfg.train.seed,
                                progress=False, codec=self.codec, masks=self.masks(num))
        write_samples(samples, self.run_dir / "samples", stem, spacing=sample_spacing(self.cfg))
        return samples



def weighted_mean(rows: list[dict], key: str) -> float:
    n = sum(r.get(NUM_EXAMPLES, 0) for r in rows)
    return sum(r[key] * r[NUM_EXAMPLES] for r in rows) / n if n else float("nan")
