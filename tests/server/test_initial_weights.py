"""A federated study started from pre-trained weights (train.init_from): its rounds start from
them, its records name them, and under DP it ends better than the same study from scratch."""

import json

import pytest
import torch

from meddiff.checkpoint import load_checkpoint
from meddiff.recipes.centralized import train_centralized
from meddiff.recipes.initial import file_sha256
from privacy.report import privacy_report
from server.federation import run_federation
from tests.conftest import tiny_config
from tests.flower_helpers import as_node
from tests.inprocess_grid import InProcessGrid
from tests.meddiff.recipes.test_initial import _source

STUDY = ["federation.num_sites=2", "federation.num_rounds=1", "data.num_samples=40", "output.num_samples=2",
         "sampler.num_inference_steps=2", "model.num_classes=2", "privacy.enabled=true"]


def _federated(tmp_path, name, extra):
    cfg = tiny_config(tmp_path, STUDY + list(extra))
    as_node(0)
    grid = InProcessGrid({100 + i: {"partition-id": i, "num-partitions": 2} for i in range(2)})
    return run_federation(grid, cfg, run_dir=tmp_path / name)


@pytest.mark.slow
def test_a_federated_dp_study_starts_from_it_and_the_privacy_report_says_so(tmp_path):
    path, ema = _source(tmp_path, ["model.num_classes=2"])
    _federated(tmp_path, "fed", ["federation.local_steps=1", "train.lr=1e-12", f"train.init_from={path}"])
    last = load_checkpoint(tmp_path / "fed" / "checkpoints" / "round_0001.pt")
    for k, v in last.model.items():  # DP noise at a vanishing learning rate: the initial weights stay
        torch.testing.assert_close(v, ema[k], atol=1e-5, rtol=0, msg=k)
    assert json.loads(last.extra["init_from"])["path"] == str(path.resolve())
    assert privacy_report(tmp_path / "fed")["initial_weights"]["sha256"] == file_sha256(path)
    assert "## Initial weights" in (tmp_path / "fed" / "privacy_report.md").read_text()


@pytest.mark.slow
def test_dp_fine_tuning_from_public_pretraining_beats_dp_from_scratch(tmp_path):
    public = tiny_config(tmp_path, ["model.num_classes=2", "data.num_samples=256", "data.seed=99", "train.steps=150",
                                    "train.lr=2e-3", "train.log_every=50", "output.checkpoint_every=150",
                                    "output.num_samples=2", "output.name=public"])
    pretrained = train_centralized(public, progress=False) / "checkpoints" / "last.pt"  # other phantoms: "public" data
    dp = ["federation.local_steps=5", "privacy.target_epsilon=10", "train.lr=2e-3"]
    scratch = _federated(tmp_path, "scratch", dp)
    tuned = _federated(tmp_path, "tuned", dp + [f"train.init_from={pretrained}"])
    assert tuned["rounds"][-1]["eval_loss"] < 0.8 * scratch["rounds"][-1]["eval_loss"], (tuned["rounds"], scratch["rounds"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["attention_norm", "lora"])
def test_a_parameter_efficient_dp_study_moves_only_the_trainable_tensors(tmp_path, mode):
    from meddiff.nets.trainable import adapter_keys, update_keys
    from meddiff.recipes.build import build_unet

    path, ema = _source(tmp_path, ["model.num_classes=2"])
    extra = ["federation.local_steps=2", "train.lr=1e-2", f"train.init_from={path}", f"train.trainable={mode}",
             "train.lora_rank=2", "federation.server_ema_decay=0"]
    _federated(tmp_path, "peft", extra)
    model = build_unet(tiny_config(tmp_path, STUDY + extra))
    trained, adapters = set(update_keys(model)), set(adapter_keys(model))
    last = load_checkpoint(tmp_path / "peft" / "checkpoints" / "last.pt")
    assert set(last.model) == set(model.state_dict())
    for k, v in last.model.items():
        if k not in trained and k not in adapters:
            assert torch.equal(v, ema[k]), k  # frozen: still the pre-trained weights
    assert any(not torch.equal(last.model[k], ema[k] if k in ema else model.state_dict()[k]) for k in trained)
    assert "## Trainable parameters" in (tmp_path / "peft" / "privacy_report.md").read_text()
