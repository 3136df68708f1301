"""What the server sends with every message: the round's configuration, and for TRAIN and
EVALUATE the global weights."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from configs import ExperimentConfig, config_to_yaml, load_config_dict
from meddiff.recipes.phases import FINAL_PHASE, TrainingPhase, phase_named
from protocol.errors import ProtocolError, array_record, config_record
from protocol.keys import (ARRAYS, AUTOENCODER_DIGEST, CENTRAL_DP, CLIPPING_NORM, CONFIG, EXPERIMENT_CONFIG, FID_STATS,
                           KNOWN_LEDGERS, LATENT_SCALE, MANIFEST_PATH, NUM_ROUNDS, PHASE, PROGRESS_DIR, PROXIMAL_MU,
                           SERVER_ROUND, SITE_STATE_ROOT, STUDY_ID)
from protocol.weights import arrays_to_state


@dataclass(frozen=True)
class RoundConfig:
    """The ``config`` record of every message the server sends.

    ``experiment`` travels as YAML and is decoded once, in :meth:`from_record`. The last three
    fields are Flower's: its strategies add ``server-round``, FedProx ``proximal-mu`` and the
    central-DP wrappers the clipping norm; ``None`` means that the record does not hold them.
    """

    experiment: ExperimentConfig
    phase: TrainingPhase = FINAL_PHASE
    num_rounds: int = 0
    manifest_path: str = ""
    study_id: str = "study"
    site_state_root: str = ""                 # simulation: where the sites keep their state
    progress_dir: str = ""                    # simulation: where the sites write their progress
    known_ledgers: Mapping[str, Any] = field(default_factory=dict)  # the server's copy, by site name
    central_dp: str = "off"
    autoencoder_digest: str = ""              # latent diffusion, phase 2: the frozen autoencoder
    latent_scale: float = 0.0
    want_feature_stats: bool = False          # evaluate: also send feature statistics
    server_round: Optional[int] = None
    proximal_mu: Optional[float] = None
    clipping_norm: Optional[float] = None

    def __post_init__(self):
        # a snapshot, in the form the wire carries: later changes to the server's ledgers are not sent
        object.__setattr__(self, "known_ledgers", json.loads(json.dumps(dict(self.known_ledgers))))
        if not isinstance(self.phase, TrainingPhase):  # a phase's name, as on the wire
            object.__setattr__(self, "phase", phase_named(self.phase))

    def to_record(self) -> ConfigRecord:
        values = {EXPERIMENT_CONFIG: config_to_yaml(self.experiment), MANIFEST_PATH: self.manifest_path,
                  CENTRAL_DP: self.central_dp, PHASE: self.phase.name, NUM_ROUNDS: self.num_rounds, STUDY_ID: self.study_id,
                  SITE_STATE_ROOT: self.site_state_root, PROGRESS_DIR: self.progress_dir,
                  KNOWN_LEDGERS: json.dumps(self.known_ledgers)}
        if self.autoencoder_digest:
            values.update({AUTOENCODER_DIGEST: self.autoencoder_digest, LATENT_SCALE: float(self.latent_scale)})
        if self.want_feature_stats:
            values[FID_STATS] = 1
        for key, value in ((SERVER_ROUND, self.server_round), (PROXIMAL_MU, self.proximal_mu),
                           (CLIPPING_NORM, self.clipping_norm)):
            if value is not None:
                values[key] = value
        return ConfigRecord(values)

    @classmethod
    def from_record(cls, record: Union[RecordDict, ConfigRecord]) -> "RoundConfig":
        """From a message's content (its ``config`` record) or from the ConfigRecord itself."""
        record = config_record(record, CONFIG)
        if EXPERIMENT_CONFIG not in record:
            raise ProtocolError(f"the server sent no {EXPERIMENT_CONFIG!r}; server and client versions differ?")
        digest = str(record.get(AUTOENCODER_DIGEST, ""))
        if digest and LATENT_SCALE not in record:
            raise ProtocolError(f"the server named autoencoder {digest} without its {LATENT_SCALE!r}")
        return cls(experiment=load_config_dict(yaml.safe_load(str(record[EXPERIMENT_CONFIG]))),
                   phase=phase_named(str(record.get(PHASE, ""))), num_rounds=int(record.get(NUM_ROUNDS, 0)),
                   manifest_path=str(record.get(MANIFEST_PATH, "")), study_id=str(record.get(STUDY_ID, "study")),
                   site_state_root=str(record.get(SITE_STATE_ROOT, "")), progress_dir=str(record.get(PROGRESS_DIR, "")),
                   known_ledgers=json.loads(str(record.get(KNOWN_LEDGERS, "{}")) or "{}"),
                   central_dp=str(record.get(CENTRAL_DP, "off")), autoencoder_digest=digest,
                   latent_scale=float(record.get(LATENT_SCALE, 0.0)), want_feature_stats=bool(int(record.get(FID_STATS, 0))),
                   server_round=_optional(record, SERVER_ROUND, int), proximal_mu=_optional(record, PROXIMAL_MU, float),
                   clipping_norm=_optional(record, CLIPPING_NORM, float))

    def round_number(self) -> int:
        """The server round (Flower's strategies add it to every train and evaluate message)."""
        if self.server_round is None:
            raise ProtocolError(f"the message carries no {SERVER_ROUND!r}; it was not sent by a Flower strategy")
        return self.server_round


def _optional(record: ConfigRecord, key: str, kind: type):
    return kind(record[key]) if key in record else None


@dataclass(frozen=True)
class RoundIns:
    """A TRAIN or EVALUATE message: the global weights and the round's configuration.

    The server hands both to its Flower strategy, which builds this content itself.
    """

    arrays: ArrayRecord
    config: RoundConfig

    def weights(self) -> dict[str, torch.Tensor]:
        return arrays_to_state(self.arrays)

    def to_record(self) -> RecordDict:
        return RecordDict({ARRAYS: self.arrays, CONFIG: self.config.to_record()})

    @classmethod
    def from_record(cls, content: RecordDict) -> "RoundIns":
        return cls(array_record(content, ARRAYS), RoundConfig.from_record(content))


def central_dp_mode(content: RecordDict) -> Optional[str]:
    """The central-DP mode a train message asks of the site (``fixed`` or ``adaptive``), or None
    when its config holds no clipping norm. Read without decoding the experiment config, from
    the first ConfigRecord, as Flower's clipping mods do; a norm without a mode is fixed clipping."""
    configs = list(content.config_records.values())
    if not configs or CLIPPING_NORM not in configs[0]:
        return None
    return str(configs[0].get(CENTRAL_DP, "fixed"))
