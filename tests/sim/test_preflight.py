"""Impossible settings and bad resumes are refused before any Flower process starts."""

import csv
import json

import pytest

from configs import ConfigError, config_to_dict, load_config
from meddiff.recipes.build import build_unet
from meddiff.checkpoint import save_checkpoint
from sim.preflight import check_federation, check_initial_weights, check_privacy_plan, site_sizes
from sim.run import _manifest, simulate
from tests.conftest import tiny_config
from tests.fixtures import write_png
from tests.meddiff.recipes.test_initial import _source


def test_site_counts_that_can_never_start_a_round_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"'federation.min_train_nodes' \(5\) is larger than 'federation.num_sites' \(2\)"):
        check_federation(load_config(None, ["federation.num_sites=2", "federation.min_train_nodes=5"]))
    with pytest.raises(ConfigError, match=r"'federation.fraction_train' \(0.2\) samples 0 of 4 sites"):
        check_federation(load_config(None, ["federation.num_sites=4", "federation.min_train_nodes=2",
                                            "federation.fraction_train=0.2"]))
    check_federation(load_config(None, ["federation.num_sites=4", "federation.min_train_nodes=2",
                                        "federation.fraction_train=0.5"]))


def test_a_dp_plan_no_noise_level_can_fit_is_refused_naming_the_budget():
    cfg = load_config(None, ["privacy.enabled=true", "privacy.target_epsilon=0.001", "federation.num_rounds=50"])
    with pytest.raises(ConfigError, match=r"'privacy.target_epsilon' \(0.001\) cannot cover the planned DP steps"):
        check_privacy_plan(cfg, site_sizes(cfg, None))
    fine = load_config(None, ["privacy.enabled=true"])
    check_privacy_plan(fine, site_sizes(fine, None))


def _checkpoint(tmp_path, cfg):
    path = tmp_path / "old" / "checkpoints" / "round_0001.pt"
    save_checkpoint(path, model_state=build_unet(cfg).state_dict(), config=config_to_dict(cfg), step=1,
                    extra={"study": json.dumps({"study-id": "s"}), "phase": "diffusion"})
    return path


def test_bad_resumes_are_refused_before_flower_starts(tmp_path):
    cfg = tiny_config(tmp_path)
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        simulate(cfg, run_dir=run, resume_from=str(tmp_path / "nope.pt"), flwr_home=tmp_path / "home")
    ckpt = _checkpoint(tmp_path, tiny_config(tmp_path, ["model.model_channels=16"]))
    run.mkdir()
    (run / "config.yaml").write_text("keep me\n")
    with pytest.raises(ConfigError, match=r"model.model_channels: 16 -> 8"):
        simulate(cfg, run_dir=run, resume_from=str(ckpt), flwr_home=tmp_path / "home")
    assert (run / "config.yaml").read_text() == "keep me\n" and not (run / "flower_pids.txt").exists()
    (run / "metrics.csv").write_text("round\n")
    with pytest.raises(ConfigError, match="already holds a federated run; continue it with --resume-from"):
        simulate(cfg, run_dir=run, flwr_home=tmp_path / "home")


def _folder(tmp_path, n):
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id"])
        for i in range(n):
            write_png(root / f"img{i:02d}.png", seed=i, size=16)
            w.writerow([f"img{i:02d}.png", i % 2, f"p{i}"])
    return root


def test_resume_reuses_the_stored_split_and_refuses_changed_data(tmp_path):
    root = _folder(tmp_path, 12)
    cfg = tiny_config(tmp_path, ["data.dataset=folder", f"data.path={root}", f"data.labels_csv={root / 'labels.csv'}",
                                 "federation.num_sites=2", f"data.cache_dir={tmp_path / 'cache'}"])
    run = tmp_path / "run"
    run.mkdir()
    path, _ = _manifest(cfg, run, "", print)
    original = (run / "manifest.json").read_text()
    ckpt = str(run / "checkpoints" / "round_0001.pt")
    _folder(tmp_path, 18)  # six more rows since the split: a new split would move patients around
    messages = []
    _manifest(cfg, run, ckpt, messages.append)
    assert (run / "manifest.json").read_text() == original
    assert "6 record(s) added since are left out" in messages[0]
    write_png(root / "img03.png", seed=99, size=16)  # a file of the split changed
    with pytest.raises(ValueError, match="img03.png: content changed since the split"):
        _manifest(cfg, run, ckpt, messages.append)


def test_initial_weights_that_do_not_fit_are_refused_before_anything_starts(tmp_path):
    path, _ = _source(tmp_path)
    with pytest.raises(ConfigError, match=r"other shape \['conv_in.bias', 'conv_in.weight'"):
        check_initial_weights(tiny_config(extra=["model.model_channels=16", "model.norm_groups=4", f"train.init_from={path}"]))
    with pytest.raises(ConfigError, match="train.init_from: .*missing.pt does not exist"):
        check_initial_weights(tiny_config(extra=[f"train.init_from={tmp_path / 'missing.pt'}"]))
    check_initial_weights(tiny_config(extra=[f"train.init_from={path}"]))


def test_a_mask_conditioned_study_passes_the_checks_and_plans_dp_on_its_sites():
    cfg = load_config(None, ["model.cond_channels=4", "privacy.enabled=true"])
    check_federation(cfg)
    sigmas = check_privacy_plan(cfg, site_sizes(cfg, None))
    assert set(sigmas) == {f"site_{i}" for i in range(cfg.federation.num_sites)} and all(s > 0 for s in sigmas.values())
