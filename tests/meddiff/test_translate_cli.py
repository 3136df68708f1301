"""``meddiff translate`` and ``meddiff evaluate --task translation`` on tiny translation checkpoints."""

import json

import nibabel as nib
import numpy as np
import pytest

from meddiff.cli import main
from meddiff.recipes.centralized import train_centralized
from meddiff.recipes.translation_eval import run_translate
from tests.conftest import tiny_config
from tests.fixtures import head_volume

pytestmark = pytest.mark.slow  # two tiny trainings (~25 s) shared by the module, then DDIM on a volume

STUDY = ["data.source_sequence=t1", "data.target_sequence=ct", "data.num_samples=16", "train.steps=2",
         "sampler.num_inference_steps=2", "diffusion.prediction_type=v"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("translation_runs")
    out = {}
    for objective in ("diffusion", "regression"):
        cfg = tiny_config(root, STUDY + [f"train.translation_objective={objective}", f"output.name={objective}"])
        out[objective] = train_centralized(cfg, progress=False) / "checkpoints" / "last.pt"
    return out


@pytest.mark.parametrize("objective", ["diffusion", "regression"])
def test_translate_writes_a_volume_with_the_inputs_affine_shape_and_orientation(tmp_path, checkpoints, objective):
    affine = np.array([[0.0, -1.2, 0.0, 10.0], [0.9, 0.0, 0.0, -5.0], [0.0, 0.0, -2.0, 3.0], [0, 0, 0, 1.0]])  # not RAS
    volume = head_volume(shape=(20, 24, 12))[0]
    nib.save(nib.Nifti1Image(volume, affine), str(tmp_path / "case.nii.gz"))
    assert main(["translate", "--checkpoint", str(checkpoints[objective]), "--input", str(tmp_path / "case.nii.gz"),
                 "--out", str(tmp_path / "out"), "--samples", "2", "--device", "cpu", "--no-progress"]) == 0
    out = nib.load(str(tmp_path / "out" / "case_ct.nii.gz"))
    assert out.shape == volume.shape and np.allclose(out.affine, affine)
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(affine)
    hu = np.asarray(out.dataobj)
    assert np.isfinite(hu).all() and -1000.0 <= hu.min() and hu.max() <= 2000.0  # CT in HU


def test_translate_reads_an_npz_of_sources_and_refuses_a_missing_array(tmp_path, checkpoints):
    np.savez(tmp_path / "s.npz", source=np.zeros((3, 1, 16, 16), np.float32))
    assert main(["translate", "--checkpoint", str(checkpoints["regression"]), "--input", str(tmp_path / "s.npz"),
                 "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert np.load(tmp_path / "o" / "translated.npz")["translation"].shape == (3, 1, 16, 16)
    np.savez(tmp_path / "bad.npz", images=np.zeros((3, 1, 16, 16), np.float32))
    assert main(["translate", "--checkpoint", str(checkpoints["regression"]), "--input", str(tmp_path / "bad.npz"),
                 "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2


def test_evaluate_translation_scores_the_model_and_the_baseline_and_writes_a_grid(tmp_path, checkpoints):
    assert main(["evaluate", "--task", "translation", "--checkpoint", str(checkpoints["diffusion"]), "--baseline",
                 str(checkpoints["regression"]), "--num-real-test", "4", "--samples", "2", "--out", str(tmp_path),
                 "--device", "cpu", "--ddim-steps", "3"]) == 0
    report = json.loads((tmp_path / "translation.json").read_text())
    assert report["ddim_steps"] == 3  # the checkpoint's sampler says 2
    assert set(report["models"]) == {"translation (1 sample)", "translation (mean of 2)", "translation_regression"}
    for scores in report["models"].values():
        assert scores["unit"] == "HU" and scores["mae"] > 0 and -1 <= scores["ssim"] <= 1 and "mae_masked" in scores
    assert (tmp_path / "translation.png").is_file() and "MAE in HU" in (tmp_path / "translation.md").read_text()


def test_ddim_steps_below_one_are_refused_naming_the_value(tmp_path, checkpoints):
    with pytest.raises(ValueError, match="sampler.num_inference_steps.* is 0"):
        run_translate(checkpoints["diffusion"], tmp_path / "missing.nii.gz", tmp_path, ddim_steps=0, device="cpu")
