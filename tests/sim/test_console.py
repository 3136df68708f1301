"""The terminal's view of a study: every site's finished rounds, whatever the machine's speed."""

import json

from client.progress import SiteProgress, progress_path
from sim.console import SiteWatcher


def test_every_finished_round_of_every_site_is_shown_once_even_between_polls(tmp_path):
    shown = []
    watcher = SiteWatcher(tmp_path, shown.append, every=3600.0)  # never polled: only stop() looks
    for rnd in (1, 2):
        for site in ("site_0", "site_1"):
            progress = SiteProgress(site, "diffusion", rnd, 2, 3,
                                    path=progress_path({"partition-id": 0}, str(tmp_path), site, "diffusion", rnd))
            for step in range(3):
                progress(step, 0.5)
    watcher.stop()  # a thread that never started: stop() still takes the last look
    lines = [line.strip() for line in shown]
    for rnd in (1, 2):
        for site in ("site_0", "site_1"):
            assert sum(line.startswith(f"{site} diffusion round {rnd}/2: step 3/3") for line in lines) == 1
    watcher.check()
    assert len(shown) == len(lines)  # nothing is shown twice


def test_deployed_sites_write_no_progress_file(tmp_path):
    assert progress_path({"site-name": "a"}, str(tmp_path), "a", "diffusion", 1) is None
    assert progress_path({"partition-id": 0}, "", "a", "diffusion", 1) is None
    path = progress_path({"partition-id": 0}, str(tmp_path), "a", "autoencoder", 3)
    assert path == tmp_path / "a" / "autoencoder_0003.json"
    SiteProgress("a", "autoencoder", 3, 0, 1, path=path)(0, 0.25)
    assert json.loads(path.read_text())["step"] == 1
