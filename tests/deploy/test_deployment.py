"""Deployment on 127.0.0.1: SuperLink with TLS and SuperNode authentication, two hospital sites.

One secured federation serves the whole module (each run in it costs minutes of process start-up
on a small machine): an unregistered SuperNode is refused, and a two-round study runs in which
one site is killed while it trains round 2, at a point its own log marks (never after a fixed
sleep), so the round completes with the other site whatever the speed of the machine.
"""

import csv
import json
import threading
import time
from pathlib import Path

import pytest

from sim.deploy import new_deployment
from sim.processes import stop_process_tree
from tests.fixtures import write_png

TINY = ("federation.num_sites=2 federation.min_train_nodes={min_nodes} federation.local_steps={steps} federation.num_rounds=2 "
        "data.dataset=folder data.labels_csv=labels.csv data.image_size=16 model.model_channels=8 model.channel_mult=[1,2] "
        "model.attention_resolutions=[8] model.num_head_channels=8 model.norm_groups=4 output.num_samples=2 "
        "sampler.num_inference_steps=2 federation.round_timeout={timeout}")
#: generous bounds: they only stop a broken test, never a slow machine's working one
ONLINE_WITHIN, RUN_WITHIN = 300, 1800


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


def _wait_online(d, n):
    deadline = time.monotonic() + ONLINE_WITHIN
    out = ""
    while time.monotonic() < deadline:
        out = d.flwr(["supernode", "list", "consortium"], check=False).stdout
        if out.count("online") >= n:
            return
        time.sleep(1)
    raise TimeoutError(f"{n} SuperNodes not online: {out}")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A SuperLink with TLS + node auth, two registered sites and one unregistered intruder."""
    tmp = tmp_path_factory.mktemp("federation")
    d = new_deployment(tmp / "deploy")
    sites = ["hospital_a", "hospital_b"]
    d.make_certs(sites + ["intruder"])
    d.start_superlink()
    try:
        for i, site in enumerate(sites):
            d.register(site)
            d.start_supernode(site, _node_config(_site_folder(tmp / site, 12, i + 1), site, i))
        d.start_supernode("intruder", _node_config(tmp / "hospital_a", "intruder", 2))
        _wait_online(d, 2)
        yield d, tmp
    finally:
        assert d.stop()


def _kill_when_training(d, site: str, marker: str, done: threading.Event) -> None:
    """Kill ``site``'s SuperNode as soon as its log shows it training (``marker``)."""
    log = d.workdir / f"supernode-{site}.log"
    while not done.is_set():
        if marker in log.read_text(errors="replace"):
            stop_process_tree(d.supernodes[site].pid, grace=0)
            return
        done.wait(0.2)


@pytest.mark.slow
def test_unregistered_node_is_refused(federation):
    d, _ = federation
    intruder = d.supernodes["intruder"]
    intruder.wait(timeout=ONLINE_WITHIN)
    assert intruder.returncode != 0
    log = (d.workdir / "supernode-intruder.log").read_text()
    assert "auth" in log.lower() or "denied" in log.lower() or "unauth" in log.lower(), log[-2000:]
    assert d.flwr(["supernode", "list", "consortium"]).stdout.count("online") == 2


@pytest.mark.slow
def test_tls_study_where_a_site_dies_mid_round_completes_with_the_other(federation):
    d, tmp = federation
    run_dir = tmp / "run"
    done = threading.Event()
    killer = threading.Thread(target=_kill_when_training, args=(d, "hospital_b", "diffusion round 2/2: step", done))
    killer.start()
    try:
        cfg = f'run-dir="{run_dir}" overrides="{TINY.format(min_nodes=1, steps=40, timeout=RUN_WITHIN)}"'
        result = d.run_study(cfg, timeout=RUN_WITHIN)
    finally:
        done.set()
        killer.join()
    assert (run_dir / "summary.json").is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    glob = [r for r in rows if r["scope"] == "global"]
    assert [(r["round"], r["accepted"]) for r in glob] == [("1", "2"), ("2", "1")]  # both, then the survivor alone
    lost = [r for r in rows if r["round"] == "2" and r["scope"] == "site_1" and r["accepted"] == "0"]
    assert len(lost) == 1 and lost[0]["reason"].startswith("lost: node"), rows
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    # the sites' progress is in their SuperNode logs
    assert "hospital_a diffusion round 1/2: step 1/40" in (d.workdir / "supernode-hospital_a.log").read_text()
