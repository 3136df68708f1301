"""Public pre-training before a simulated study: what it trains on, what the study starts from."""

import pytest

from configs import ConfigError, config_to_dict, load_config_dict
from meddiff.checkpoint import load_checkpoint
from meddiff.recipes.pretraining import PRETRAINING_DIR, pretrain_on_public, pretrained_start
from sim.manifest import build_manifest
from tests.conftest import tiny_config

PRE = ["pretraining.steps=3", "pretraining.batch_size=4", "pretraining.lr=0.01", "privacy.enabled=true",
       "train.trainable=attention", "train.batch_size=32", "model.num_classes=2"]


def test_the_study_starts_from_a_non_private_pre_training_on_phantoms_no_site_draws(tmp_path):
    cfg = tiny_config(extra=PRE)
    lines = []
    started = pretrain_on_public(cfg, None, tmp_path, say=lines.append, progress=False)
    checkpoint = tmp_path / PRETRAINING_DIR / "checkpoints" / "last.pt"
    assert started.train.init_from == str(checkpoint.resolve()) and started.pretraining.steps == 0
    assert started.train.trainable == "attention" and started.privacy.enabled  # the study itself is unchanged
    pre = load_checkpoint(checkpoint)
    pre_cfg = load_config_dict(pre.config)
    assert pre.step == 3 and not pre_cfg.privacy.enabled and pre_cfg.train.trainable == "all"
    assert (pre_cfg.train.batch_size, pre_cfg.train.lr) == (4, 0.01)
    assert "phantoms that no site draws" in lines[0]
    mtime = checkpoint.stat().st_mtime_ns
    again = pretrain_on_public(cfg, None, tmp_path, say=lines.append, progress=False)  # a second start of the run
    assert again == started and checkpoint.stat().st_mtime_ns == mtime and "reusing" in lines[-1]
    assert pretrained_start(cfg, tmp_path) == started  # what a resume starts from


def test_a_split_without_public_patients_or_a_second_source_of_weights_is_refused(tmp_path):
    cfg = tiny_config(extra=PRE)
    manifest = build_manifest(cfg)
    with pytest.raises(ValueError, match="no public split.*partition.public_fraction"):
        pretrain_on_public(cfg, manifest, tmp_path, progress=False)
    raw = config_to_dict(cfg)
    raw["train"]["init_from"] = "x.pt"
    with pytest.raises(ConfigError, match="'pretraining.steps' and 'train.init_from' both"):
        load_config_dict(raw)


def test_nothing_happens_without_pretraining_steps(tmp_path):
    cfg = tiny_config()
    assert pretrain_on_public(cfg, None, tmp_path) is cfg and pretrained_start(cfg, tmp_path) is cfg
    assert not (tmp_path / PRETRAINING_DIR).exists()
