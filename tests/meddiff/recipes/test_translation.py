"""Translation studies: config checks, paired examples through the site paths, the two translation
phases, and a tiny baseline that learns to translate."""

import numpy as np
import pytest
import torch

from configs import ConfigError
from meddiff.data.paired import CT_MODEL_RANGE_HU, hu_to_model, model_to_hu
from meddiff.data.phantom_pairs import make_phantom_pairs
from meddiff.data.phantoms import make_phantoms
from meddiff.data.readers import DataError
from meddiff.recipes.phases import TRANSLATION, TRANSLATION_REGRESSION, denoiser_phase, study_phases
from meddiff.recipes.sites import phantom_site, phantom_site_plan, records_dataset
from meddiff.recipes.translation_eval import held_out_pairs
from tests.conftest import tiny_config
from tests.fixtures import head_volume, make_brats, write_nifti

T1_T2 = ["data.source_sequence=t1", "data.target_sequence=t2"]


@pytest.mark.parametrize("overrides, message", [
    (["data.source_sequence=t1"], "needs both"),
    (["data.source_sequence=t2", "data.target_sequence=t2"], "both 't2'"),
    (["data.source_sequence=t1n", "data.target_sequence=t2w"], "no contrast of data.dataset='phantoms'"),
    (["data.dataset=medmnist", *T1_T2], "does not provide"),
    ([*T1_T2, "model.cond_channels=4"], "model.cond_channels"),
    ([*T1_T2, "autoencoder.enabled=true", "model.in_channels=3", "model.out_channels=3", "autoencoder.image_channels=3",
      "autoencoder.mode=not_private"], "autoencoder.image_channels"),
    (["data.source_sequence=mri", "data.target_sequence=ct"], "source_sequence"),
])
def test_a_translation_config_is_refused_with_the_field_named(overrides, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        tiny_config(None, overrides)


def test_the_objective_switch_picks_one_translation_phase():
    assert study_phases(tiny_config(None, T1_T2)) == [TRANSLATION]
    cfg = tiny_config(None, [*T1_T2, "train.translation_objective=regression"])
    assert study_phases(cfg) == [TRANSLATION_REGRESSION] and denoiser_phase(cfg) is TRANSLATION_REGRESSION
    model = TRANSLATION_REGRESSION.build_model(cfg)
    assert model.conv_in.weight.shape[1] == 2  # x_t (zeros for the baseline) and the source


def test_ct_trains_in_a_fixed_linear_hu_range_and_comes_back_exactly():
    hu = torch.tensor([-1000.0, 500.0, 2000.0, 40.0])
    assert torch.allclose(hu_to_model(hu), torch.tensor([-1.0, 0.0, 1.0, -1 + 2 * 1040 / 3000]))
    assert torch.allclose(model_to_hu(hu_to_model(hu)), hu)
    assert CT_MODEL_RANGE_HU == (-1000.0, 2000.0)


@pytest.mark.parametrize("target", ["t2", "ct"])
def test_a_phantom_site_packs_each_target_with_its_source_under_the_site_scanner(target):
    cfg = tiny_config(None, ["data.source_sequence=t1", f"data.target_sequence={target}", "partition.scanner_shift=true"])
    site = phantom_site(1, 2, cfg)
    plan = phantom_site_plan(1, 2, cfg)
    pairs = make_phantom_pairs(3, 16, seed=plan["seed"], target=target, lesion_fraction=plan["lesion_fraction"],
                               acquisition=plan["acquisition"])
    single = make_phantoms(3, 16, seed=plan["seed"], lesion_fraction=plan["lesion_fraction"],
                           acquisition=plan["acquisition"])[0]
    for i in range(3):
        x0, label = site[i]
        assert x0.shape == (2, 16, 16) and int(label) == int(pairs.labels[i])
        assert torch.allclose(x0[1], torch.from_numpy(single[i] * 2 - 1), atol=1e-6)  # the site's own T1 image
        want = hu_to_model(pairs.target[i]) if target == "ct" else pairs.target[i] * 2 - 1
        assert torch.allclose(x0[0], torch.from_numpy(want), atol=1e-6)


def _brats_config(root, extra=()):
    return tiny_config(None, ["data.dataset=brats", f"data.path={root}", "data.source_sequence=t1n",
                              "data.target_sequence=t2w", "data.min_foreground=0.05", *extra])


def test_brats_pairs_stay_aligned_through_the_site_records_path(tmp_path):
    from meddiff.data.adapters import index_dataset

    cfg = _brats_config(make_brats(tmp_path / "brats", n_cases=2))  # the fixture writes one image for every sequence
    data = records_dataset(index_dataset(cfg.data).records, cfg, train=False)
    assert len(data) > 4 and len(set(data.patient_ids)) == 2
    for i in range(len(data)):
        x0, _ = data[i]
        assert torch.equal(x0[0], x0[1])  # target and source cut, rotated and resized alike


def test_a_pair_on_different_grids_is_refused_naming_both_files(tmp_path):
    from meddiff.data.adapters import index_dataset

    root = make_brats(tmp_path / "brats", n_cases=1)
    case = next(root.iterdir())
    bad = write_nifti(case / f"{case.name}-t2w.nii.gz", head_volume(shape=(18, 24, 16))[0])
    cfg = _brats_config(root)
    with pytest.raises(DataError, match=f"{case.name}-t1n.nii.gz.*{bad.name}.*different grids"):
        records_dataset(index_dataset(cfg.data).records, cfg, train=True)


# x0-prediction memorises 8 images in a few hundred steps (eps and v need several times more)
OVERFIT = {"regression": (["train.translation_objective=regression"], 250),
           "diffusion": (["diffusion.prediction_type=x0", "sampler.num_inference_steps=20"], 400)}


@pytest.mark.slow  # 250-400 steps of a 16x16 UNet: ~25-40 s on one loaded CPU core
@pytest.mark.parametrize("objective", sorted(OVERFIT))
def test_a_tiny_model_overfit_on_8_pairs_translates_a_training_pair(objective):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 16x16 model runs fastest on one thread
    try:
        scores = _overfit(*OVERFIT[objective])
    finally:
        torch.set_num_threads(threads)
    assert scores["ssim"] > 0.9, scores
    assert scores["ssim_other_targets"] < scores["ssim"] - 0.1, scores  # it follows its own source


def _overfit(overrides: list[str], steps: int) -> dict:
    """SSIM of a training pair's translation (DDIM from noise for the diffusion model) after
    ``steps`` full-batch steps on 8 paired phantoms."""
    from meddiff.evaluate.translation import translation_metrics

    torch.manual_seed(0)
    cfg = tiny_config(None, [*T1_T2, *overrides, "data.num_samples=8"])
    phase = denoiser_phase(cfg)
    data = phase.training_data(cfg)
    x0 = torch.stack([data[i][0] for i in range(8)])
    model, objective = phase.build_model(cfg), phase.build_objective(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(steps):
        opt.zero_grad()
        objective.training_losses(model, x0).mean().backward()
        opt.step()
    with torch.no_grad():
        pred = phase.translate(model.eval(), cfg, x0[:1, 1:], samples=1, seed=0, device="cpu").clamp(-1, 1)
    own = translation_metrics((pred + 1) / 2, (x0[:1, :1] + 1) / 2, data_range=1.0).means()
    others = (pred.expand(7, -1, -1, -1) + 1) / 2, (x0[1:, :1] + 1) / 2  # against the 7 other targets
    other = translation_metrics(*others, data_range=1.0).means()
    return {"ssim": own["ssim"], "ssim_other_targets": other["ssim"]}


def test_a_volume_goes_through_slicing_and_reorientation_and_back_to_its_own_voxels(tmp_path):
    import nibabel as nib

    from meddiff.data.transforms import percentile_normalise
    from meddiff.recipes.translation_infer import translate_nifti

    cfg = tiny_config(None, T1_T2)
    affine = np.array([[0.0, -1.0, 0.0, 4.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 2.0], [0, 0, 0, 1.0]])  # not RAS
    volume = head_volume(shape=(16, 16, 6))[0]  # square 16-px slices: no resizing, so identity in, identity out
    nib.save(nib.Nifti1Image(volume, affine), str(tmp_path / "v.nii.gz"))
    translate_nifti(lambda x: x, tmp_path / "v.nii.gz", tmp_path / "o.nii.gz", cfg)
    out = nib.load(str(tmp_path / "o.nii.gz"))
    want = (np.asarray(percentile_normalise(torch.from_numpy(volume)[None]))[0] + 1) / 2  # MR target: [0, 1]
    assert np.allclose(out.affine, affine) and np.allclose(np.asarray(out.dataobj), want, atol=1e-5)


def test_held_out_brats_pairs_are_every_patient_of_another_cohort_or_a_fifth_of_the_study(tmp_path):

    cfg = _brats_config(make_brats(tmp_path / "study", n_cases=5))
    other = make_brats(tmp_path / "other", n_cases=2)
    per_case = len(held_out_pairs(_brats_config(make_brats(tmp_path / "one", n_cases=1)), num=10_000)[0])
    assert len(held_out_pairs(cfg, num=10_000)[0]) == per_case  # 20% of 5 patients
    source, target = held_out_pairs(cfg, num=10_000, data_path=str(other))
    assert len(source) == 2 * per_case and source.shape == target.shape
    few, _ = held_out_pairs(cfg, num=3, data_path=str(other))
    assert torch.equal(few[0], source[0]) and torch.equal(few[-1], source[-1])  # spread over both patients


def test_a_cohort_to_score_on_is_refused_for_phantom_studies():

    with pytest.raises(ValueError, match="is read for BraTS-layout studies"):
        held_out_pairs(tiny_config(None, T1_T2), num=4, data_path="/elsewhere")


def test_brats_cases_with_only_the_two_sequences_of_the_study_are_indexed(tmp_path):
    from meddiff.data.adapters import index_dataset

    cfg = _brats_config(make_brats(tmp_path / "brats", n_cases=2, sequences=("t1n", "t2w")))  # no t1c (data.sequence's default)
    records = index_dataset(cfg.data).records
    assert len(records) == 2 and all(r.files[0].endswith("-t1n.nii.gz") for r in records)
    assert len(records_dataset(records, cfg, train=False)) > 4
