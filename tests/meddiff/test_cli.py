import csv

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from meddiff.cli import main
from tests.conftest import TINY_OVERRIDES


@pytest.mark.slow
def test_train_then_sample(tmp_path, capsys):
    rc = main(["train", "--no-progress", *TINY_OVERRIDES, "model.num_classes=2", f"output.root={tmp_path}", "output.name=r"])
    assert rc == 0
    run = tmp_path / "r"
    assert (run / "config.yaml").is_file() and (run / "meta.json").is_file()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["step"] for r in rows] == ["2", "4"]
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"step_000002.pt", "step_000004.pt", "last.pt"}
    grid = Image.open(run / "samples" / "step_000004.png")
    assert grid.size[0] > 16
    assert np.load(run / "samples" / "step_000004.npy").shape == (4, 1, 16, 16)

    rc = main(["sample", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--num", "3", "--steps", "2",
               "--class-label", "1", "--guidance-scale", "2", "--no-progress", "--out", str(tmp_path / "s")])
    assert rc == 0
    arr = np.load(tmp_path / "s" / "sample_ddim2_seed0.npy")
    assert arr.shape == (3, 1, 16, 16) and np.isfinite(arr).all()
    assert (tmp_path / "s" / "sample_ddim2_seed0.png").is_file()


@pytest.mark.slow
def test_3d_sample_writes_nifti(tmp_path):
    over = [o for o in TINY_OVERRIDES if not o.startswith("data.image_size")]
    rc = main(["train", "--no-progress", *over, "data.image_size=8", "model.spatial_dims=3", "model.attention_resolutions=[4]",
               "data.dataset=medmnist", f"data.path={_volumes(tmp_path)}", "train.batch_size=2", "train.steps=2",
               f"output.root={tmp_path}", "output.name=v", "output.num_samples=2"])
    assert rc == 0
    out = tmp_path / "v" / "samples"
    vols = sorted(out.glob("*.nii.gz"))
    assert len(vols) == 2
    img = nib.load(vols[0])
    assert img.shape == (8, 8, 8)
    assert np.allclose(np.diag(img.affine)[:3], 1.0)


def _volumes(tmp_path):
    path = tmp_path / "vol.npz"
    rng = np.random.default_rng(0)
    np.savez(path, train_images=rng.integers(0, 255, (4, 8, 8, 8), dtype=np.uint8), train_labels=np.zeros((4, 1)))
    return path


def test_user_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["train", "train.nope=1"]) == 2
    assert "unknown key 'train.nope'" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


@pytest.mark.slow
def test_train_on_a_brats_folder(tmp_path):
    from tests.fixtures import make_brats

    root = make_brats(tmp_path / "brats", n_cases=2)
    rc = main(["train", "--no-progress", *TINY_OVERRIDES, "model.num_classes=2", "data.dataset=brats", f"data.path={root}",
               "data.min_foreground=0.05", f"data.cache_dir={tmp_path / 'cache'}", "data.augment=true",
               f"output.root={tmp_path}", "output.name=b"])
    assert rc == 0
    assert (tmp_path / "b" / "checkpoints" / "last.pt").is_file()
    assert any((tmp_path / "cache").rglob("*.images.npy"))


LDM = ["autoencoder.enabled=true", "autoencoder.mode=not_private", "autoencoder.channels=[8,16]", "autoencoder.norm_groups=4",
       "autoencoder.latent_channels=2", "model.in_channels=2", "model.out_channels=2", "model.attention_resolutions=[4]",
       "autoencoder.steps=6", "autoencoder.batch_size=8"]


@pytest.mark.slow
def test_centralized_latent_diffusion_trains_both_stages_and_samples_through_the_decoder(tmp_path, capsys):
    from meddiff.checkpoint import load_checkpoint

    rc = main(["train", "--no-progress", *TINY_OVERRIDES, *LDM, "model.num_classes=2", f"output.root={tmp_path}", "output.name=l"])
    assert rc == 0
    run = tmp_path / "l"
    assert (run / "autoencoder.pt").is_file() and (run / "samples" / "autoencoder_reconstructions.png").is_file()
    assert np.load(run / "samples" / "step_000004.npy").shape == (4, 1, 16, 16)  # decoded images, not latents
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt.extra["autoencoder"]["scale_factor"] > 0 and ckpt.model["conv_in.weight"].shape[1] == 2
    assert main(["sample", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--num", "2", "--steps", "2", "--no-progress",
                 "--out", str(tmp_path / "s")]) == 0
    arr = np.load(tmp_path / "s" / "sample_ddim2_seed0.npy")
    assert arr.shape == (2, 1, 16, 16) and arr.min() >= -1 and arr.max() <= 1
    # autoencoder.mode=public reuses that first stage: loaded, never trained on this run's data
    rc = main(["train", "--no-progress", *TINY_OVERRIDES, *LDM, "model.num_classes=2", "autoencoder.mode=public",
               f"autoencoder.checkpoint={run / 'autoencoder.pt'}", f"output.root={tmp_path}", "output.name=p"])
    assert rc == 0
    assert load_checkpoint(tmp_path / "p" / "checkpoints" / "last.pt").extra["autoencoder"]["sha256"] == ckpt.extra["autoencoder"]["sha256"]
    assert not (tmp_path / "p" / "autoencoder.pt").exists()
    # sampling the autoencoder checkpoint itself is a clear error
    assert main(["sample", "--checkpoint", str(run / "autoencoder.pt")]) == 2
    assert "phase-1 autoencoder, not a denoiser" in capsys.readouterr().err
