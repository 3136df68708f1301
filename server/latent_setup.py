"""Between the two phases of federated latent diffusion: install the frozen autoencoder at every
site once (a Flower QUERY message) and set the latent scale factor from the sites' statistics.

The sites answer the install with the count, sum and sum of squares of their training latents;
the server merges them into ``1 / std`` (Rombach et al. 2022, Sec. 4.3.2) and sends the scale
alone. Phase-2 messages name the autoencoder by digest; a site that lost it says so and is sent
the weights again.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from configs import ExperimentConfig
from meddiff.build import build_autoencoder
from meddiff.latent import LatentCodec, LatentStats

log = logging.getLogger("meddiff.server")


class LatentSetup:
    """Sends the codec to the sites; counts the messages that carried its weights."""

    def __init__(self, grid: Grid, cfg: ExperimentConfig, payload: Callable[[], dict], say: Callable[[str], None]):
        self.grid, self.cfg, self.payload, self.say = grid, cfg, payload, say
        self.transfers = 0  # messages that carried the frozen autoencoder's weights
        self._installed: set[int] = set()  # nodes holding its weights from the scale-statistics query

    def query(self, nodes: list[int], content: RecordDict) -> list[Message]:
        messages = [Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        if "arrays" in content.array_records:
            self.transfers += len(messages)
        replies = list(self.grid.send_and_receive(messages=messages, timeout=self.cfg.federation.round_timeout))
        ok = []
        for r in replies:
            if r.has_error() or "failure" in r.content.config_records:
                reason = r.error.reason if r.has_error() else r.content["failure"].get("reason")
                log.warning("node %s could not handle %s: %s", r.metadata.src_node_id, content["config"].get("query"), reason)
            else:
                ok.append(r)
        return ok

    def fit_scale(self, ae_state: dict[str, torch.Tensor], nodes: list[int]) -> LatentCodec:
        """Send the trained autoencoder once; the scale factor from the sites' merged latent
        statistics (or ``autoencoder.scale_factor`` when fixed)."""
        autoencoder = build_autoencoder(self.cfg)
        autoencoder.load_state_dict(ae_state)
        fixed = self.cfg.autoencoder.scale_factor
        codec = LatentCodec(autoencoder, fixed or 1.0)
        replies = self.query(nodes, self.content(codec, want_stats=not fixed))
        self._installed = {r.metadata.src_node_id for r in replies if int(r.content["metrics"]["installed"])}
        if fixed:
            return codec
        stats = LatentStats()
        for r in replies:
            m = r.content["metrics"]
            stats = stats.merge(LatentStats(int(m["count"]), float(m["total"]), float(m["total-sq"])))
        codec.scale_factor = stats.scale_factor()
        self.say(f"latent scale factor {codec.scale_factor:.4f} from {len(replies)} site(s)' latent statistics "
                 f"({stats.count} latent elements; no image left a site)")
        return codec

    def content(self, codec: LatentCodec, *, want_stats: bool = False, weights: bool = True) -> RecordDict:
        config = ConfigRecord({**self.payload(), "query": "install-autoencoder" if weights else "latent-scale",
                               "autoencoder-digest": codec.digest, "latent-scale": codec.scale_factor,
                               "want-stats": int(want_stats)})
        content = RecordDict({"config": config})
        if weights:
            content["arrays"] = ArrayRecord({k: v.detach().cpu().contiguous() for k, v in codec.autoencoder.state_dict().items()})
        return content

    def install(self, codec: LatentCodec, nodes: list[int]) -> None:
        """Make sure ``nodes`` hold the codec: sites that already received the weights (while the
        scale was estimated) get the scale alone; the others get the weights."""
        have = self._installed
        scale_only = [n for n in nodes if n in have]
        replies = self.query(scale_only, self.content(codec, weights=False)) if scale_only else []
        lacking = [n for n in nodes if n not in have] + [r.metadata.src_node_id for r in replies
                                                           if not int(r.content["metrics"]["installed"])]
        if lacking:
            self.query(lacking, self.content(codec))
        self._installed = set()  # from now on a site that lacks it says so, and gets the weights again
        self.say(f"autoencoder {codec.digest} (scale {codec.scale_factor:.4f}) installed at {len(nodes)} site(s); "
                 f"weights sent to {len(lacking) + len(have & set(nodes))}")
