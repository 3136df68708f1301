"""End to end on Flower's local simulation engine (SuperLink on 127.0.0.1, stopped by PID)."""

import csv
from pathlib import Path

import pytest
import torch

from configs import load_config
from meddiff.build import build_model
from meddiff.checkpoint import load_checkpoint
from sim.run import free_port, simulate

TINY = ["federation.num_sites=2", "federation.min_train_nodes=2", "federation.local_steps=2", "data.num_samples=40",
        "data.image_size=16", "model.model_channels=8", "model.channel_mult=[1,2]", "model.attention_resolutions=[8]",
        "model.num_head_channels=8", "model.norm_groups=4", "output.num_samples=2", "sampler.num_inference_steps=2",
        "model.num_classes=2"]


def _run(tmp_path: Path, name: str, overrides: list[str], resume_from: str = "") -> Path:
    cfg = load_config(None, overrides)
    return simulate(cfg, config_path=None, overrides=overrides, run_dir=tmp_path / name, resume_from=resume_from,
                    flwr_home=tmp_path / "flwr_home", timeout=300, http_port=free_port(), control_port=free_port())


def _alive_flower_processes(pids_file: Path) -> list[int]:
    pid = int(pids_file.read_text().split()[1])
    return [pid] if Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3] else []


@pytest.mark.slow
def test_two_sites_two_rounds_then_resume_equals_uninterrupted(tmp_path):
    full = _run(tmp_path, "full", TINY + ["federation.num_rounds=2"])
    ckpts = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert ckpts == ["last.pt", "round_0001.pt", "round_0002.pt"]
    rows = list(csv.DictReader(open(full / "metrics.csv")))
    assert [r["round"] for r in rows if r["scope"] == "global"] == ["1", "2"]
    assert {r["scope"] for r in rows} >= {"site_0", "site_1", "global"}
    assert (full / "summary.md").is_file() and (full / "samples" / "round_0002.png").is_file()
    assert not _alive_flower_processes(full / "flower_pids.txt")

    last = load_checkpoint(full / "checkpoints" / "last.pt")
    cfg = load_config(None, TINY)
    torch.manual_seed(cfg.train.seed)
    initial = build_model(cfg.model, cfg.data.image_size).state_dict()
    assert any(not torch.equal(last.model[k], initial[k]) for k in initial)  # the global weights changed
    assert "site_metrics" in last.extra and last.step == 2

    # stop after round 1, then resume: same final weights as the uninterrupted run
    first = _run(tmp_path, "first", TINY + ["federation.num_rounds=1"])
    resumed = _run(tmp_path, "first", TINY + ["federation.num_rounds=2"], resume_from=str(first / "checkpoints" / "round_0001.pt"))
    final = load_checkpoint(resumed / "checkpoints" / "last.pt")
    assert final.step == 2
    for k in last.model:
        assert torch.equal(final.model[k], last.model[k]), k
        assert torch.equal(final.ema[k], last.ema[k]), k
    rows = list(csv.DictReader(open(resumed / "metrics.csv")))
    assert [r["round"] for r in rows if r["scope"] == "global"] == ["1", "2"]
