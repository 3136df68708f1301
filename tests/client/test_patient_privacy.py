"""Patient-level DP through the real ClientApp: a site of a BraTS-layout split trains at the
patient unit, and its reply and ledger say so."""

import json

import pytest
from flwr.app import RecordDict

from meddiff.data.template import write_template_cohort
from meddiff.recipes.build import build_unet_from_section
from privacy.site import LEDGER_FILE
from protocol import TRAIN_METRIC_KEYS
from sim.manifest import build_manifest, write_manifest
from client.client_app import train
from tests.client.test_site_privacy import _ctx
from tests.conftest import tiny_config
from tests.fixtures import head_volume, write_nifti
from tests.flower_helpers import as_node, server_message


@pytest.mark.slow
def test_a_site_of_a_brats_split_trains_and_reports_at_the_patient_unit(tmp_path):
    img, _ = head_volume(shape=(40, 48, 36), seed=0, lesion=False)
    template = write_nifti(tmp_path / "template.nii.gz", img, spacing=(2.0, 2.0, 2.0))
    write_template_cohort(template, tmp_path / "cohort", num_patients=10, spacing=4.0, seed=1)
    cfg = tiny_config(extra=["privacy.enabled=true", "federation.local_steps=2", "federation.num_rounds=2",
                             "train.batch_size=2", "privacy.max_physical_batch_size=8", "model.num_classes=2",
                             "data.dataset=brats", f"data.path={tmp_path / 'cohort'}", f"data.cache_dir={tmp_path / 'cache'}",
                             "federation.num_sites=2", "partition.scanner_shift=false"])
    manifest = build_manifest(cfg)
    path = write_manifest(manifest, tmp_path / "split")
    patients = len({s["patient"] for s in manifest["sites"][0]["train"]["samples"]})
    node = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "site0")}
    msg = server_message(cfg, build_unet_from_section(cfg.model, 16).state_dict(), dst=11, round_=1, study_id="s1",
                         manifest_path=str(path))
    as_node(11)
    content = train(msg, _ctx(node, RecordDict())).content
    m = content["metrics"]
    assert set(m.keys()) == set(TRAIN_METRIC_KEYS) and m["steps"] == 2
    assert (m["privacy_unit"], m["privacy_units"], m["records_per_patient"]) == (1, patients, 4)
    assert m["num-examples"] > patients  # the slices it trained on: several per patient
    ledger = json.loads((tmp_path / "site0" / LEDGER_FILE).read_text())
    assert ledger["unit"] == "patient" and ledger["delta"] == pytest.approx(1 / (10 * patients))
    assert ledger["calibrations"][0]["num_examples"] == patients and ledger["rounds"][0]["unit"] == "patient"
