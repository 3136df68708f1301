"""The privacy report says plainly what each phase of a latent-diffusion run covers."""

import json

from configs import config_to_yaml, load_config
from privacy.report import phase_statements, privacy_report, write_privacy_report


def _run_dir(tmp_path, overrides):
    run = tmp_path / "run"
    (run / "privacy").mkdir(parents=True)
    (run / "config.yaml").write_text(config_to_yaml(load_config(None, overrides)))
    ledger = {"site": "site_0", "delta": 1e-4, "budget": 8.0, "history": [[1.1, 0.05, 40]], "epsilon": 0.0,
              "calibrations": [{"noise_multiplier": 1.1, "sample_rate": 0.05, "max_grad_norm": 1.0}],
              "rounds": [{"study": "s", "phase": "diffusion", "round": 1, "steps": 40, "epsilon": 0.0}]}
    from privacy.accounting import epsilon_of

    ledger["epsilon"] = ledger["rounds"][0]["epsilon"] = epsilon_of([(1.1, 0.05, 40)], 1e-4)
    (run / "privacy" / "site_ledgers.json").write_text(json.dumps({"sites": {"site_0": ledger}, "exhausted": []}))
    return run


LDM = ["privacy.enabled=true", "autoencoder.enabled=true", "model.in_channels=3", "model.out_channels=3",
       "model.attention_resolutions=[4]"]


def test_a_non_private_first_stage_is_called_out(tmp_path):
    run = _run_dir(tmp_path, LDM + ["autoencoder.mode=not_private"])
    phases = {p["phase"]: p for p in phase_statements(run)}
    assert not phases["autoencoder"]["private"] and "WITHOUT differential privacy" in phases["autoencoder"]["statement"]
    assert phases["diffusion"]["private"]
    md = write_privacy_report(run)["md"].read_text()
    assert "**autoencoder** (NOT PRIVATE)" in md and "decoder every released sample passes through" in md
    assert privacy_report(run)["sites"][0]["steps_by_phase"] == {"diffusion": 40}


def test_public_first_stage_and_pixel_runs(tmp_path):
    public = phase_statements(_run_dir(tmp_path / "a", LDM + ["autoencoder.mode=public", "autoencoder.checkpoint=x.pt"]))
    assert public[0]["private"] and "never saw site data" in public[0]["statement"]
    assert [p["phase"] for p in phase_statements(_run_dir(tmp_path / "b", ["privacy.enabled=true"]))] == ["diffusion"]


def test_the_report_states_what_the_sites_trained(tmp_path):
    peft = write_privacy_report(_run_dir(tmp_path / "a", ["privacy.enabled=true", "train.trainable=lora", "train.lora_rank=2",
                                                              "train.init_from=public.pt"]))
    md, report = peft["md"].read_text(), json.loads(peft["json"].read_text())
    t = report["trainable"]
    assert t["mode"] == "lora" and t["lora_rank"] == 2 and 0 < t["trainable"] < t["total"]
    assert "`train.trainable: lora` (rank 2)" in md and f"{t['trainable']:,} of {t['total']:,}" in md
    full = privacy_report(_run_dir(tmp_path / "b", ["privacy.enabled=true"]))["trainable"]
    assert full["mode"] == "all" and full["trainable"] == full["total"] and full["update_tensors"] == full["tensors"]
