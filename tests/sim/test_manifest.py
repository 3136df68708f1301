import json

import numpy as np
import pytest
import torch

from configs import load_config
from meddiff.recipes.sites import check_disjoint, load_manifest, public_dataset, site_dataset
from sim.cli import main
from sim.manifest import build_manifest, dumps, write_manifest
from tests.conftest import TINY_OVERRIDES, shared_file
from tests.fixtures import make_brats, make_ixi


def test_pneumoniamnist_dirichlet_four_sites_is_deterministic_and_disjoint(tmp_path):
    path = shared_file("pneumoniamnist.npz")
    over = ["data.dataset=medmnist", f"data.path={path}", "federation.num_sites=4", "partition.scheme=dirichlet",
            "partition.dirichlet_alpha=0.3"]
    a = build_manifest(load_config(None, over))
    b = build_manifest(load_config(None, over))
    assert dumps(a) == dumps(b)
    check_disjoint(a)
    assert len(a["sites"]) == 4
    total = sum(s[p]["num_samples"] for s in a["sites"] for p in ("train", "test")) + a["global_test"]["num_samples"]
    assert total == 4708
    assert a["global_test"]["num_samples"] == 471
    fractions = [int(s["train"]["label_counts"].get("1", 0)) / max(1, s["train"]["num_samples"]) for s in a["sites"]]
    assert max(fractions) - min(fractions) > 0.3  # label skew
    c = build_manifest(load_config(None, over + ["partition.seed=1"]))
    assert dumps(c) != dumps(a)


def test_cli_split_preview_writes_byte_identical_manifest(tmp_path, capsys):
    root = make_ixi(tmp_path / "ixi")
    args = ["data", "split", "--preview", "data.dataset=ixi", f"data.path={root}", "partition.scheme=natural",
            "partition.test_fraction=0", "partition.site_test_fraction=0"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "Guys/train" in out and "label 0" in out
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    assert (tmp_path / "a" / "sites.png").stat().st_size > 1000
    manifest = load_manifest(tmp_path / "a" / "manifest.json")
    assert [s["name"] for s in manifest["sites"]] == ["Guys", "HH", "IOP"]
    assert all(len(s["train"]["samples"][0]["sha256"]) == 64 for s in manifest["sites"])


def test_check_disjoint_catches_leaks(tmp_path):
    m = build_manifest(load_config(None, ["data.num_samples=40", "data.image_size=16", "model.attention_resolutions=[8]"]))
    leak = json.loads(dumps(m))
    leak["sites"][1]["train"]["samples"].append(leak["sites"][0]["train"]["samples"][0])
    with pytest.raises(ValueError, match="is in both site_0/train and site_1/train"):
        check_disjoint(leak)
    test_leak = json.loads(dumps(m))
    test_leak["global_test"]["samples"].append(test_leak["sites"][0]["train"]["samples"][0])
    with pytest.raises(ValueError, match="global_test"):
        check_disjoint(test_leak)


def test_skip_bad_count_appears_in_manifest(tmp_path):
    root = make_brats(tmp_path / "b", n_cases=4)
    (root / "BraTS-GLI-00002-000" / "BraTS-GLI-00002-000-seg.nii.gz").unlink()
    cfg = load_config(None, ["data.dataset=brats", f"data.path={root}", "federation.num_sites=2", "data.skip_bad=true",
                             "partition.test_fraction=0", "partition.site_test_fraction=0"])
    m = build_manifest(cfg)
    assert m["bad_items"] == 1 and "missing modality" in m["bad"][0]
    assert sum(s["train"]["num_patients"] for s in m["sites"]) == 3


def test_phantom_sites_get_their_own_scanner(tmp_path):
    cfg = load_config(None, ["data.num_samples=60", "data.image_size=16", "model.attention_resolutions=[8]",
                             "partition.scheme=dirichlet", "partition.dirichlet_alpha=0.5"])
    m = build_manifest(cfg)
    a, b = site_dataset(m, 0, cfg), site_dataset(m, 1, cfg)
    assert len(a) == m["sites"][0]["train"]["num_samples"]
    x, y = a[0]
    assert x.shape == (1, 16, 16) and -1 <= x.min() and x.max() <= 1
    assert m["sites"][0]["acquisition"] != m["sites"][1]["acquisition"]
    again = site_dataset(m, 0, cfg)
    assert torch.equal(a[0][0], again[0][0])


def test_real_sites_check_content_and_apply_scanner_shift(tmp_path):
    root = make_brats(tmp_path / "b", n_cases=4)
    cfg = load_config(None, ["data.dataset=brats", f"data.path={root}", "federation.num_sites=2", "data.image_size=16",
                             "model.attention_resolutions=[8]", f"data.cache_dir={tmp_path / 'cache'}", "data.min_foreground=0.05",
                             "partition.test_fraction=0", "partition.site_test_fraction=0"])
    m = build_manifest(cfg)
    ds = site_dataset(m, "site_0", cfg)
    x, y = ds[0]
    assert x.shape == (1, 16, 16) and np.isfinite(x.numpy()).all()
    sample = m["sites"][0]["train"]["samples"][0]["id"]
    f = root / sample / f"{sample}-t1c.nii.gz"
    from tests.fixtures import write_nifti
    write_nifti(f, np.zeros((20, 24, 16), np.float32))
    with pytest.raises(ValueError, match="content changed since the split"):
        site_dataset(m, "site_0", cfg)
    with pytest.raises(ValueError, match="no site 'nope'"):
        site_dataset(m, "nope", cfg)


def test_corrupt_file_found_at_split_time(tmp_path):
    from meddiff.data.readers import DataError

    root = make_brats(tmp_path / "b", n_cases=4)
    f = root / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-t1c.nii.gz"
    f.write_bytes(f.read_bytes()[:150])
    over = ["data.dataset=brats", f"data.path={root}", "federation.num_sites=2", f"data.cache_dir={tmp_path / 'c'}",
            "partition.test_fraction=0", "partition.site_test_fraction=0"]
    with pytest.raises(DataError, match="BraTS-GLI-00001-000-t1c.nii.gz: corrupt"):
        build_manifest(load_config(None, over))
    m = build_manifest(load_config(None, over + ["data.skip_bad=true"]))
    assert m["bad_items"] == 1
    assert "BraTS-GLI-00001-000" not in {s["id"] for site in m["sites"] for s in site["train"]["samples"]}


def test_a_public_split_is_carved_before_the_sites_and_pretrains_centrally(tmp_path):
    path = shared_file("pneumoniamnist.npz")
    over = ["data.dataset=medmnist", f"data.path={path}", "federation.num_sites=3", "partition.public_fraction=0.2"]
    manifest = build_manifest(load_config(None, over))
    check_disjoint(manifest)
    public = {s["patient"] for s in manifest["public"]["samples"]}
    held = {s["patient"] for s in manifest["global_test"]["samples"]}
    sites = {s["patient"] for site in manifest["sites"] for part in ("train", "test") for s in site[part]["samples"]}
    assert len(public) == round(0.2 * (4708 - len(held))) and not public & sites and not public & held
    assert len(public) + len(held) + len(sites) == 4708
    without = build_manifest(load_config(None, over[:-1]))
    assert "public" in without and without["public"]["num_samples"] == 0
    written = write_manifest(manifest, tmp_path / "split")
    run = ["train", "--public-split", str(written), "--no-progress", *over, *TINY_OVERRIDES, "train.steps=2",
           f"output.root={tmp_path}", "output.name=public"]
    assert main(run) == 0
    assert (tmp_path / "public" / "checkpoints" / "last.pt").is_file()
    with pytest.raises(ValueError, match="no public split"):
        public_dataset(without, load_config(None, over[:-1]))
