"""Deployment on 127.0.0.1: SuperLink with TLS and SuperNode authentication, two hospital sites."""

import csv
import time
from pathlib import Path

import pytest

from sim.deploy import new_deployment
from tests.fixtures import write_png

TINY = ("federation.num_sites=2 federation.min_train_nodes={min_nodes} federation.local_steps={steps} federation.num_rounds=2 "
        "data.dataset=folder data.labels_csv=labels.csv data.image_size=16 model.model_channels=8 model.channel_mult=[1,2] "
        "model.attention_resolutions=[8] model.num_head_channels=8 model.norm_groups=4 output.num_samples=2 "
        "sampler.num_inference_steps=2 federation.round_timeout={timeout}")


def _site_folder(root: Path, n: int, seed: int) -> Path:
    root.mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id"])
        for i in range(n):
            write_png(root / f"img{i:03d}.png", seed=seed * 100 + i, size=16)
            w.writerow([f"img{i:03d}.png", i % 2, f"p{i}"])
    return root


def _node_config(folder: Path, site: str, index: int) -> str:
    return f'data-path="{folder}" labels-csv="{folder / "labels.csv"}" site-name="{site}" site-index={index}'


def _wait_online(d, n, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = d.flwr(["supernode", "list", "consortium"], check=False).stdout
        if out.count("online") >= n:
            return
        time.sleep(1)
    raise TimeoutError(f"{n} SuperNodes not online: {out}")


def _secured_federation(tmp_path, sites):
    """A SuperLink with TLS + node auth and one registered SuperNode per site; returns (deployment, procs)."""
    d = new_deployment(tmp_path / "deploy")
    d.make_certs(sites + ["intruder"])
    d.start_superlink()
    procs = {}
    for i, site in enumerate(sites):
        d.register(site)
        folder = _site_folder(tmp_path / site, 12, i + 1)
        procs[site] = d.start_supernode(site, _node_config(folder, site, i))
    return d, procs


def _run(d, run_dir: Path, overrides: str, timeout=240):
    cfg = f'run-dir="{run_dir}" overrides="{overrides}"'
    return d.flwr(["run", ".", "consortium", "--stream", "--run-config", cfg], check=False, timeout=timeout)


@pytest.mark.slow
def test_tls_and_node_auth_two_sites_two_rounds_and_unregistered_node_refused(tmp_path):
    d, _ = _secured_federation(tmp_path, ["hospital_a", "hospital_b"])
    try:
        intruder = d.start_supernode("intruder", _node_config(tmp_path / "hospital_a", "intruder", 2))
        _wait_online(d, 2)
        run_dir = tmp_path / "run"
        result = _run(d, run_dir, TINY.format(min_nodes=2, steps=2, timeout=120))
        assert (run_dir / "summary.json").is_file(), result.stdout[-3000:] + result.stderr[-3000:]
        rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
        globals_ = [r for r in rows if r["scope"] == "global"]
        assert [r["round"] for r in globals_] == ["1", "2"] and all(r["accepted"] == "2" for r in globals_)
        # the unregistered SuperNode never joins: it exits, and the list holds only the two registered sites
        intruder.wait(timeout=90)
        assert intruder.returncode != 0
        log = (d.workdir / "supernode-intruder.log").read_text()
        assert "auth" in log.lower() or "denied" in log.lower() or "unauth" in log.lower(), log[-2000:]
        assert d.flwr(["supernode", "list", "consortium"]).stdout.count("online") == 2
    finally:
        stopped = d.stop()
    assert stopped


@pytest.mark.slow
def test_site_killed_mid_round_the_round_completes_with_the_other(tmp_path):
    d, procs = _secured_federation(tmp_path, ["hospital_a", "hospital_b"])
    victim = procs["hospital_b"]
    try:
        _wait_online(d, 2)
        run_dir = tmp_path / "run"
        import threading

        from sim.processes import stop_process_tree

        def kill_when_training():
            # hospital_b dies while round 1 trains: start-up takes ~10 s, 2000 local steps ~20-40 s more
            time.sleep(18)
            stop_process_tree(victim.pid, grace=0)

        killer = threading.Thread(target=kill_when_training)
        killer.start()
        result = _run(d, run_dir, TINY.format(min_nodes=1, steps=2000, timeout=100), timeout=500)
        killer.join()
        assert (run_dir / "summary.json").is_file(), result.stdout[-3000:] + result.stderr[-3000:]
        rows = [r for r in csv.DictReader(open(run_dir / "metrics.csv")) if r["scope"] == "global"]
        assert [r["round"] for r in rows] == ["1", "2"]
        assert min(int(r["accepted"]) for r in rows) == 1  # the surviving site carried the rounds
    finally:
        d.stop()
