"""Between the two phases of federated latent diffusion: install the frozen autoencoder at every
site once (a Flower QUERY message) and set the latent scale factor from the sites' statistics.

The sites answer the install with the count, sum and sum of squares of their training latents;
the server merges them into ``1 / std`` (Rombach et al. 2022, Sec. 4.3.2) and sends the scale
alone. Phase-2 messages name the autoencoder by digest; a site that lost it says so and is sent
the weights again.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

import torch
from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from configs import ExperimentConfig
from meddiff.recipes.build import build_autoencoder
from meddiff.latent import LatentCodec, LatentStats
from protocol import InstallAutoencoder, Query, QueryRes, RoundConfig, SetLatentScale
from server.replies import expect_reply

log = logging.getLogger("meddiff.server")


class LatentSetup:
    """Sends the codec to the sites; counts the messages that carried its weights."""

    def __init__(self, grid: Grid, cfg: ExperimentConfig, round_config: Callable[[], RoundConfig], say: Callable[[str], None]):
        self.grid, self.cfg, self.round_config, self.say = grid, cfg, round_config, say
        self.transfers = 0  # messages that carried the frozen autoencoder's weights
        self._installed: set[int] = set()  # nodes holding its weights from the scale-statistics query

    def query(self, nodes: list[int], request: Query) -> list[tuple[int, QueryRes]]:
        """Send ``request`` to ``nodes``; ``(node, answer)`` of those that handled it."""
        content = request.to_record()
        messages = [Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        if isinstance(request, InstallAutoencoder):
            self.transfers += len(messages)
        replies = list(self.grid.send_and_receive(messages=messages, timeout=self.cfg.federation.round_timeout))
        ok = []
        for r in replies:
            answer, problem = expect_reply(r, QueryRes, "a query")
            if problem:
                log.warning("node %s could not handle %s: %s", r.metadata.src_node_id, request.KIND, problem)
            else:
                ok.append((r.metadata.src_node_id, answer))
        return ok

    def fit_scale(self, ae_state: dict[str, torch.Tensor], nodes: list[int]) -> LatentCodec:
        """Send the trained autoencoder once; the scale factor from the sites' merged latent
        statistics (or ``autoencoder.scale_factor`` when fixed)."""
        autoencoder = build_autoencoder(self.cfg)
        autoencoder.load_state_dict(ae_state)
        fixed = self.cfg.autoencoder.scale_factor
        codec = LatentCodec(autoencoder, fixed or 1.0)
        replies = self.query(nodes, self.request(codec, want_stats=not fixed))
        self._installed = {node for node, answer in replies if answer.installed}
        if fixed:
            return codec
        stats = LatentStats()
        for _, answer in replies:
            stats = stats.merge(LatentStats(answer.count, answer.total, answer.total_sq))
        codec.scale_factor = stats.scale_factor()
        self.say(f"latent scale factor {codec.scale_factor:.4f} from {len(replies)} site(s)' latent statistics "
                 f"({stats.count} latent elements; no image left a site)")
        return codec

    def request(self, codec: LatentCodec, *, want_stats: bool = False, weights: bool = True) -> Query:
        """Install the codec (its weights, and the statistics for its scale when ``want_stats``),
        or with ``weights=False`` set its scale at sites that hold it."""
        setup = replace(self.round_config(), autoencoder_digest=codec.digest, latent_scale=codec.scale_factor)
        if not weights:
            return SetLatentScale(setup)
        return InstallAutoencoder(setup, codec.autoencoder.state_dict(), want_stats=want_stats)

    def install(self, codec: LatentCodec, nodes: list[int]) -> None:
        """Make sure ``nodes`` hold the codec: sites that already received the weights (while the
        scale was estimated) get the scale alone; the others get the weights."""
        have = self._installed
        scale_only = [n for n in nodes if n in have]
        replies = self.query(scale_only, self.request(codec, weights=False)) if scale_only else []
        lacking = [n for n in nodes if n not in have] + [node for node, answer in replies if not answer.installed]
        if lacking:
            self.query(lacking, self.request(codec))
        self._installed = set()  # from now on a site that lacks it says so, and gets the weights again
        self.say(f"autoencoder {codec.digest} (scale {codec.scale_factor:.4f}) installed at {len(nodes)} site(s); "
                 f"weights sent to {len(lacking) + len(have & set(nodes))}")


