"""A site's privacy unit on real layouts: a BraTS-layout cohort of 2-D slices is patient-level by
default, a MedMNIST study (one image per patient) record-level; the ledger, the reply metrics and
the report say which; restart, refusal and resume work as at the record unit."""

import json

import pytest
from opacus.accountants import RDPAccountant

from configs import config_to_yaml
from meddiff.data.adapters import index_dataset
from meddiff.data.cache import MedicalDataset
from meddiff.data.template import write_template_cohort
from meddiff.recipes.phases import DIFFUSION, TRANSLATION, TRANSLATION_REGRESSION
from meddiff.recipes.sites import records_dataset
from privacy.accounting import poisson_sample_rate
from privacy.refusals import BudgetExhausted, SiteRefusal
from privacy.report import privacy_report, write_privacy_report
from privacy.site import SitePrivacy
from tests.conftest import shared_file, tiny_config
from tests.fixtures import head_volume, write_nifti
from tests.privacy.test_site import _round

DP = ["privacy.enabled=true", "privacy.target_epsilon=8", "federation.num_rounds=2", "federation.local_steps=2",
      "train.batch_size=2", "privacy.max_physical_batch_size=8", "model.num_classes=2"]


def _brats_cohort(tmp_path, extra=()):
    """Four pseudo-patients in BraTS layout (what `meddiff data from-template` writes), as 2-D slices."""
    img, _ = head_volume(shape=(40, 48, 36), seed=0, lesion=False)
    template = write_nifti(tmp_path / "template.nii.gz", img, spacing=(2.0, 2.0, 2.0))
    write_template_cohort(template, tmp_path / "cohort", num_patients=4, spacing=4.0, seed=3)
    cfg = tiny_config(extra=_overrides(tmp_path) + list(extra))
    return cfg, MedicalDataset(index_dataset(cfg.data).records, cfg.data, spatial_dims=2, train=True)


def _overrides(tmp_path):
    return DP + ["data.dataset=brats", f"data.path={tmp_path / 'cohort'}", f"data.cache_dir={tmp_path / 'cache'}"]


def _open(cfg, data, state_dir, **kw):
    return SitePrivacy.open(cfg, site="site_0", train_set=data, state_dir=state_dir, budget=8.0, study="s1", **kw)


def _report(tmp_path, cfg, ledger_json):
    run = tmp_path / "run"
    (run / "privacy").mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    (run / "privacy" / "site_ledgers.json").write_text(json.dumps({"sites": {"site_0": json.loads(ledger_json)}}))
    return privacy_report(run), write_privacy_report(run)["md"].read_text()


@pytest.mark.slow
def test_a_brats_slice_study_protects_each_patient_and_restarts_refuses_and_resumes_as_before(tmp_path):
    cfg, data = _brats_cohort(tmp_path)
    patients = len(set(data.patient_ids))
    assert patients == 4 and len(data) > 3 * patients  # several slices per patient
    privacy = _open(cfg, data, tmp_path / "state")
    cal = privacy.calibration
    assert (cal.unit, cal.num_examples, cal.num_records, cal.records_per_patient) == ("patient", 4, len(data), 4)
    assert privacy.ledger.delta == pytest.approx(1 / (10 * 4))  # 1/(10 P), patients not slices
    assert cal.sample_rate == poisson_sample_rate(4, 2)  # two expected patients per step of four
    privacy.check(DIFFUSION)
    metrics = _round(privacy, cfg, data, 1)
    assert metrics["patient_unit"] and metrics["units"] == 4 and metrics["records_per_patient"] == 4
    assert metrics["sample_rate"] == cal.sample_rate and privacy.ledger.history == [(cal.noise_multiplier, cal.sample_rate, 2)]
    reference = RDPAccountant()
    for _ in range(2):
        reference.step(noise_multiplier=cal.noise_multiplier, sample_rate=cal.sample_rate)
    assert metrics["epsilon"] == pytest.approx(reference.get_epsilon(privacy.ledger.delta), rel=1e-9)

    report, md = _report(tmp_path, cfg, privacy.ledger.to_json())
    site = report["sites"][0]
    assert (site["unit"], site["units"], site["records_per_patient"], site["group_bound"]) == ("patient", 4, 4, None)
    assert "**site_0** (patient unit): adding or removing all records of any one patient of site_0" in md
    assert "Patient-level (epsilon, delta)-DP" in report["guarantee"]["covers"]

    again = _open(cfg, data, tmp_path / "state")  # a restarted site: the ledger from disk, same sigma and unit
    assert again.calibration == cal and again.units.unit == "patient" and again.ledger.steps == 2
    second = _round(again, cfg, data, 2)
    assert second["epsilon"] > metrics["epsilon"]
    with pytest.raises(BudgetExhausted, match="site_0: 2 more steps would raise epsilon"):
        again.check(DIFFUSION)  # calibrated for two rounds: a third does not fit
    record_cfg = tiny_config(extra=_overrides(tmp_path) + ["privacy.unit=record"])
    with pytest.raises(SiteRefusal, match="enrolled at the patient unit but privacy.unit=record"):
        _open(record_cfg, data, tmp_path / "state")


@pytest.mark.slow
def test_a_record_level_study_on_slices_prints_the_group_bound_of_the_largest_patient(tmp_path):
    cfg, data = _brats_cohort(tmp_path, ["privacy.unit=record"])
    privacy = _open(cfg, data, tmp_path / "state")
    k_max = max(data.patient_ids.count(p) for p in set(data.patient_ids))
    assert privacy.calibration.unit == "record" and privacy.calibration.max_records_per_patient == k_max
    assert privacy.ledger.delta == pytest.approx(1 / (10 * len(data)))
    _round(privacy, cfg, data, 1)
    report, md = _report(tmp_path, cfg, privacy.ledger.to_json())
    site = report["sites"][0]
    assert site["unit"] == "record" and site["group_bound"]["k_max"] == k_max
    assert site["group_bound"]["epsilon"] == pytest.approx(k_max * site["epsilon"])
    assert f"a patient holds up to {k_max} records, so by group privacy" in md and "privacy.unit=patient" in md


def test_a_medmnist_study_is_record_level_and_says_so(tmp_path):
    cfg = tiny_config(extra=DP + ["data.dataset=medmnist", f"data.path={shared_file('pneumoniamnist.npz')}"])
    data = MedicalDataset(index_dataset(cfg.data).records[:60], cfg.data, spatial_dims=2)
    privacy = _open(cfg, data, tmp_path / "state")
    assert privacy.calibration.unit == "record" and privacy.calibration.num_examples == 60
    assert privacy.calibration.max_records_per_patient == 1
    report, md = _report(tmp_path, cfg, privacy.ledger.to_json())
    assert report["sites"][0]["unit"] == "record" and report["sites"][0]["group_bound"] is None
    assert "**site_0** (record unit): adding or removing any one record (image or slice) of site_0" in md


def test_3d_volumes_several_scans_of_one_patient_are_one_unit(tmp_path):
    """A folder of NIfTI volumes with a patient_id column (a baseline and a follow-up scan per
    patient): at 3-D each volume is a record, each patient one unit."""
    rows = ["path,label,patient_id"]
    for i in range(6):
        write_nifti(tmp_path / "vols" / f"scan{i}.nii.gz", head_volume(seed=i, lesion=False)[0])
        rows.append(f"scan{i}.nii.gz,0,patient{i // 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = tiny_config(extra=DP + ["data.dataset=folder", f"data.path={tmp_path / 'vols'}", f"data.labels_csv={tmp_path / 'labels.csv'}",
                                  f"data.cache_dir={tmp_path / 'cache'}", "model.spatial_dims=3", "data.image_size=8"])
    data = MedicalDataset(index_dataset(cfg.data).records, cfg.data, spatial_dims=3)
    privacy = _open(cfg, data, tmp_path / "state")
    assert len(data) == 6 and privacy.units.unit == "patient" and privacy.units.count == 3 and privacy.units.max_records == 2
    assert privacy.calibration.num_examples == 3 and privacy.ledger.delta == pytest.approx(1 / 30)


@pytest.mark.slow  # a template cohort with a second sequence, then one DP round of each translation phase
@pytest.mark.parametrize("phase", [TRANSLATION, TRANSLATION_REGRESSION])
def test_a_brats_translation_study_protects_each_patient_of_its_pairs(tmp_path, phase):
    img, _ = head_volume(shape=(40, 48, 36), seed=0, lesion=False)
    template = write_nifti(tmp_path / "template.nii.gz", img, spacing=(2.0, 2.0, 2.0))
    write_template_cohort(template, tmp_path / "cohort", num_patients=4, spacing=4.0, seed=3, t2w=True)
    cfg = tiny_config(extra=_overrides(tmp_path) + ["data.source_sequence=t1n", "data.target_sequence=t2w",
                                                    f"train.translation_objective={phase.objective}"])
    data = records_dataset(index_dataset(cfg.data).records, cfg, train=True)  # (target | source) pairs of 4 patients
    assert len(data) > 8 and data[0][0].shape[0] == 2 and len(set(data.patient_ids)) == 4
    privacy = _open(cfg, data, tmp_path / "state")
    assert (privacy.calibration.unit, privacy.calibration.num_examples) == ("patient", 4)
    privacy.check(phase)
    metrics = _round(privacy, cfg, data, 1, phase=phase)
    assert metrics["patient_unit"] and metrics["units"] == 4 and 0 < metrics["epsilon"] <= 8
