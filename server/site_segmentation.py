"""Each site's segmentation utility of the global mask-conditioned model, on the site's own data.

With ``evaluation.segmentation_steps`` > 0, after the last round of a phase whose examples carry
masks (and every ``evaluation.segmentation_every`` rounds), the server sends the EMA weights to
every live site in a segmentation QUERY (:class:`protocol.SegmentationQuery`). Each site
generates pairs from masks of its own training split, trains the real-only, synthetic-only and
real + synthetic segmenters, scores them and mask fidelity on its own held-out pairs
(:mod:`meddiff.recipes.site_segmentation`), and answers with Dice figures only. The entry this
module builds goes to ``metrics.csv`` (one row per site), TensorBoard, ``summary.json`` and the console.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from configs import ExperimentConfig
from meddiff.recipes.phases import TrainingPhase
from protocol import SEGMENTATION_COLUMNS, Failure, RoundConfig, SegmentationQuery, SegmentationRes
from server.phase import PhaseRun
from server.replies import append_traceback, expect_reply

log = logging.getLogger("meddiff.server")

#: The region of the one-number-per-column summaries (metrics.csv, the console): the whole tumour.
HEADLINE_REGION = "whole_tumour"
COLUMN_TITLES = {"real_only": "real only", "synthetic_only": "synthetic only", "real_plus_synthetic": "real + synthetic",
                 "mask_fidelity": "mask fidelity"}


class SiteSegmentation:
    """Asks the sites for their segmentation utility when it is due; remembers what it asked."""

    def __init__(self, grid: Grid, cfg: ExperimentConfig, run_dir: Path, say: Callable[[str], None]):
        self.grid, self.cfg, self.say = grid, cfg, say
        self.error_log = run_dir / "logs" / "site_errors.log"
        self._done: set[tuple[int, int]] = set()  # (phase order, round)

    def due(self, phase: TrainingPhase, rnd: int, *, last: bool) -> bool:
        """After ``phase``'s last round (``last``) or every ``evaluation.segmentation_every`` rounds,
        when the key is on and the phase trains on (image, mask) pairs; once per round."""
        ev = self.cfg.evaluation
        if not (ev.segmentation_steps and phase.packs_masks and rnd > 0) or (phase.order, rnd) in self._done:
            return False
        return last or bool(ev.segmentation_every and rnd % ev.segmentation_every == 0)

    def evaluate(self, run: PhaseRun, rnd: int, round_config: RoundConfig, nodes: list[int]) -> dict:
        """Send the EMA weights to ``nodes``; the entry ``{phase, round, region, segmenter_steps,
        sites: {site_i: {num_real_train, num_synthetic, num_real_test, seconds, scores}}}``."""
        self._done.add((run.phase.order, rnd))
        weights = run.global_state
        if run.ema is not None and run.sample_model is not None:
            run.ema.copy_to(run.sample_model)
            weights = run.sample_model.state_dict()
        content = SegmentationQuery(replace(round_config, server_round=rnd), weights).to_record()
        messages = [Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        results, timeout = [], self.cfg.federation.round_timeout
        replies = list(self.grid.send_and_receive(messages=messages, timeout=timeout))
        silent = sorted(set(nodes) - {r.metadata.src_node_id for r in replies})
        if silent:
            self.say(f"segmentation utility: node(s) {', '.join(map(str, silent))} did not answer within "
                     f"federation.round_timeout={timeout:g} s (raise it, or lower evaluation.segmentation_samples)")
        for reply in replies:
            result, problem = expect_reply(reply, SegmentationRes, "a segmentation query")
            if isinstance(result, Failure):
                append_traceback(self.error_log, f"segmentation utility after round {rnd}, site {result.site_index}",
                                 result.traceback)
            if problem:
                self.say(f"segmentation utility: node {reply.metadata.src_node_id} gave no figures: {problem}")
            elif isinstance(result, SegmentationRes):
                results.append(result)
        sites = {f"site_{r.site_index}": {"num_real_train": r.num_real_train, "num_synthetic": r.num_synthetic,
                                           "num_real_test": r.num_real_test, "seconds": r.seconds, "scores": r.scores}
                 for r in sorted(results, key=lambda r: r.site_index)}
        entry = {"phase": run.phase.name, "round": rnd, "region": headline_region(results),
                 "segmenter_steps": self.cfg.evaluation.segmentation_steps, "sites": sites}
        for line in filter(None, segmentation_table(entry)):  # line by line: `meddiff simulate` keeps prefixed lines
            self.say(line)
        return entry


def headline_region(results: list[SegmentationRes]) -> str:
    """The whole tumour, or the first region of masks without tumour channels."""
    regions = results[0].regions if results else [HEADLINE_REGION]
    return HEADLINE_REGION if HEADLINE_REGION in regions else regions[0]


def column_dice(site: dict, region: str) -> dict[str, Optional[float]]:
    """``{column: Dice of region}`` of one site's entry (None when no image held the region)."""
    return {c: site["scores"][c].get(region, {}).get("dice") for c in SEGMENTATION_COLUMNS}


def segmentation_table(entry: dict) -> list[str]:
    """The entry as a Markdown table: one row per site, the headline region's Dice per column."""
    region = entry["region"].replace("_", " ")
    lines = [f"segmentation utility after {entry['phase']} round {entry['round']}: {region} Dice on each site's own "
             f"held-out pairs ({entry['segmenter_steps']} segmenter steps; no image left a site)", "",
             "| site | " + " | ".join(COLUMN_TITLES[c] for c in SEGMENTATION_COLUMNS)
             + " | real / synthetic / held-out pairs |", "| --- " * (len(SEGMENTATION_COLUMNS) + 2) + "|"]
    for name, site in entry["sites"].items():
        dice = column_dice(site, entry["region"])
        lines.append(f"| {name} | " + " | ".join("—" if d is None else f"{d:.3f}" for d in dice.values())
                     + f" | {site['num_real_train']} / {site['num_synthetic']} / {site['num_real_test']} |")
    if not entry["sites"]:
        lines.append("| (no site answered) |" + " |" * (len(SEGMENTATION_COLUMNS) + 1))
    return lines


