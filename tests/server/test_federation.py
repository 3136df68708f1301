"""The server's round loop against the real ClientApp, in process (no SuperLink, no Ray)."""

import csv
import json

import pytest
import torch

from meddiff.board import image_tags, read_scalars
from meddiff.checkpoint import load_checkpoint
from server.federation import run_federation
from server.run_state import RunState
from server.summary import supersede_rows_after
from tests.conftest import tiny_config
from tests.flower_helpers import as_node
from tests.inprocess_grid import InProcessGrid

TINY = ["federation.num_sites=2", "federation.local_steps=2", "data.num_samples=40", "output.num_samples=2",
        "sampler.num_inference_steps=2", "model.num_classes=2"]


def _sites(n=2):
    return {100 + i: {"partition-id": i, "num-partitions": n} for i in range(n)}


def _run(tmp_path, grid, extra=(), name="run", resume_from=""):
    cfg = tiny_config(tmp_path, TINY + list(extra))
    as_node(0)
    return run_federation(grid, cfg, run_dir=tmp_path / name, resume_from=resume_from), cfg


def _rows(run_dir):
    return list(csv.DictReader(open(run_dir / "metrics.csv")))


def test_rounds_train_evaluate_checkpoint_and_write_tensorboard(tmp_path):
    summary, _ = _run(tmp_path, InProcessGrid(_sites()), ["federation.num_rounds=2", "federation.min_train_nodes=2"])
    run = tmp_path / "run"
    assert summary["status"] == "completed" and [r["accepted"] for r in summary["rounds"]] == [2, 2]
    rows = _rows(run)
    assert {r["scope"] for r in rows} == {"site_0", "site_1", "global"}
    assert load_checkpoint(run / "checkpoints" / "last.pt").step == 2
    scalars = read_scalars(run)
    assert [s for s, _ in scalars["global/train_loss"]] == [1, 2] and "site_1/eval_loss" in scalars
    assert "samples/grid" in image_tags(run)
    assert (run / "samples" / "round_0002.png").is_file()


def test_a_failing_site_stops_the_run_as_failed_with_its_reason_and_traceback(tmp_path):
    """One site cannot read its data; with min_train_nodes=2 no round can aggregate, so the run ends
    after federation.max_failed_rounds rounds instead of training the healthy site in vain."""
    nodes = {100: {"partition-id": 0, "num-partitions": 2},
             101: {"data-path": str(tmp_path / "missing"), "site-name": "hospital_b", "site-index": 1}}
    summary, _ = _run(tmp_path, InProcessGrid(nodes), ["federation.num_rounds=5", "federation.min_train_nodes=2"])
    assert summary["status"] == "failed" and "2 consecutive round(s)" in summary["stop_reason"]
    assert len(summary["rounds"]) == 2
    rows = [r for r in _rows(tmp_path / "run") if r["scope"] == "site_1" and r["accepted"] != ""]
    assert len(rows) == 2 and all(r["reason"].startswith("failed: DataError") for r in rows)
    assert "\n" not in rows[0]["reason"]
    log = (tmp_path / "run" / "logs" / "site_errors.log").read_text()
    assert "Traceback" in log and "site 1" in log
    glob = [r for r in _rows(tmp_path / "run") if r["scope"] == "global"]
    assert all(r["reason"] == "kept previous global model" for r in glob)


def test_a_node_lost_mid_round_is_named_and_the_round_goes_on_with_the_others(tmp_path):
    grid = InProcessGrid(_sites(), lose_after_train={101: 2})
    summary, _ = _run(tmp_path, grid, ["federation.num_rounds=3", "federation.min_train_nodes=1"])
    assert summary["status"] == "completed" and [r["accepted"] for r in summary["rounds"]] == [2, 1, 1]
    lost = [r for r in _rows(tmp_path / "run") if r["round"] == "2" and r["scope"] == "site_1" and r["accepted"] == "0"]
    assert len(lost) == 1 and lost[0]["reason"].startswith("lost: node 101 went offline")


def test_too_few_connected_sites_end_the_run_instead_of_waiting_forever(tmp_path):
    summary, _ = _run(tmp_path, InProcessGrid(_sites(1)), ["federation.num_rounds=2", "federation.min_train_nodes=2",
                                                           "federation.round_timeout=1"])
    assert summary["status"] == "failed" and "only 1 site(s) connected" in summary["stop_reason"]


def test_resume_moves_later_metric_rows_aside_and_keeps_config_yaml(tmp_path):
    _run(tmp_path, InProcessGrid(_sites()), ["federation.num_rounds=3", "federation.min_train_nodes=2"])
    run = tmp_path / "run"
    original = (run / "config.yaml").read_text()
    _run(tmp_path, InProcessGrid(_sites()), ["federation.num_rounds=4", "federation.min_train_nodes=2"],
         resume_from=str(run / "checkpoints" / "round_0001.pt"))
    rounds = [r["round"] for r in _rows(run) if r["scope"] == "global"]
    assert rounds == ["1", "2", "3", "4"]  # rounds 2 and 3 once each, from the resumed run
    superseded = [r["round"] for r in csv.DictReader(open(run / "metrics_superseded.csv")) if r["scope"] == "global"]
    assert superseded == ["2", "3"]
    assert (run / "config.yaml").read_text() == original
    assert "num_rounds: 4" in (run / "config_resumed_diffusion_0001.yaml").read_text()
    with pytest.raises(ValueError, match="another config"):
        _run(tmp_path, InProcessGrid(_sites()), ["federation.num_rounds=3", "federation.min_train_nodes=1"])


def test_supersede_rows_after_orders_phases(tmp_path):
    path = tmp_path / "metrics.csv"
    rows = [("autoencoder", 1), ("autoencoder", 2), ("diffusion", 1), ("diffusion", 2)]
    path.write_text("round,phase,scope\n" + "".join(f"{r},{p},global\n" for p, r in rows))
    assert supersede_rows_after(path, "autoencoder", 2) == 2
    assert [(r["phase"], r["round"]) for r in csv.DictReader(open(path))] == [("autoencoder", "1"), ("autoencoder", "2")]
    assert supersede_rows_after(path, "diffusion", 5) == 0


def test_run_state_round_trips_through_a_checkpoint(tmp_path):
    state = RunState(study_id="s-1", history=[{"round": 1, "accepted": 2}], ledgers={"site_0": {"history": [[1.0, 0.1, 5]]}},
                     refused_sites={"site_1"}, refused_nodes={7}, central={"mode": "off", "releases": 0})
    extra = state.to_checkpoint()
    torch.save(extra, tmp_path / "x.pt")
    back = RunState.from_checkpoint(torch.load(tmp_path / "x.pt", weights_only=True), {})
    assert (back.study_id, back.history, back.ledgers, back.refused_sites) == ("s-1", state.history, state.ledgers, {"site_1"})
    assert back.refused_nodes == set()  # node ids do not survive a restart of the federation
    assert json.loads(extra["study"]) == {"study-id": "s-1"}  # where the sites keep state is never stored
