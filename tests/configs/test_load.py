import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from configs import ConfigError, ExperimentConfig, config_to_dict, config_to_yaml, load_config, load_config_dict, with_fields

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_valid_and_round_trip():
    cfg = load_config()
    assert isinstance(cfg, ExperimentConfig)
    assert load_config_dict(config_to_dict(cfg)) == cfg
    assert load_config_dict(yaml.safe_load(config_to_yaml(cfg))) == cfg


def test_default_yaml_loads_and_every_field_is_commented():
    path = REPO / "configs" / "default.yaml"
    cfg = load_config(path)
    lines = path.read_text().splitlines()
    for section, values in config_to_dict(cfg).items():
        for key in values:
            hits = [line for line in lines if line.strip().startswith(f"{key}:")]
            assert hits, f"{section}.{key} missing from default.yaml"
            assert any("#" in line for line in hits), f"{section}.{key} has no comment in default.yaml"


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as exc:
        load_config_dict({"model": {"chanel_mult": [1, 2]}})
    msg = str(exc.value)
    assert "unknown key 'model.chanel_mult'" in msg
    assert "did you mean 'channel_mult'" in msg
    assert "allowed keys in 'model'" in msg and "model_channels" in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*allowed keys in '<root>'.*train"):
        load_config_dict({"trian": {}})


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"train": {"lr": "fast"}}, r"'train.lr' must be a number, got str 'fast'"),
        ({"train": {"steps": 1.5}}, r"'train.steps' must be an integer"),
        ({"train": {"steps": True}}, r"'train.steps' must be an integer"),
        ({"model": {"channel_mult": [1, "x"]}}, r"'model.channel_mult\[1\]' must be an integer"),
        ({"privacy": {"enabled": "yes"}}, r"'privacy.enabled' must be true or false"),
        ({"train": {"lr": 0}}, r"'train.lr' is 0.0; it must be > 0.0"),
        ({"train": {"batch_size": 0}}, r"'train.batch_size' is 0; it must be >= 1"),
        ({"train": {"label_dropout": 1.5}}, r"'train.label_dropout' is 1.5; it must be <= 1.0"),
        ({"diffusion": {"noise_schedule": "sigmoid"}}, r"'diffusion.noise_schedule' is 'sigmoid'; allowed values: 'linear', 'cosine'"),
        ({"model": {"spatial_dims": 4}}, r"'model.spatial_dims' is 4; allowed values: 2, 3"),
        ({"model": "big"}, r"'model' must be a mapping"),
    ],
)
def test_type_and_range_errors_name_the_dotted_path(raw, message):
    with pytest.raises(ConfigError, match=message):
        load_config_dict(raw)


def test_cross_field_errors():
    with pytest.raises(ConfigError, match="attention_resolutions' has 12"):
        load_config_dict({"model": {"attention_resolutions": [12]}})
    with pytest.raises(ConfigError, match="out_channels"):
        load_config_dict({"model": {"out_channels": 3}})
    with pytest.raises(ConfigError, match="divisible by 4"):
        load_config_dict({"data": {"image_size": 18}, "model": {"attention_resolutions": []}})


def test_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  lr: 0.001\nmodel:\n  model_channels: 32\n")
    cfg = load_config(path, ["train.lr=1e-4", "model.channel_mult=[1,2]", "model.attention_resolutions=[16]",
                             "sampler.name=ddpm", "privacy.target_delta=null"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.model_channels == 32
    assert cfg.model.channel_mult == (1, 2)
    assert cfg.sampler.name == "ddpm"
    assert cfg.privacy.target_delta is None


def test_override_errors(tmp_path):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="must be dotted"):
        load_config(None, ["lr=1"])
    with pytest.raises(ConfigError, match="unknown key 'train.learning_rate'"):
        load_config(None, ["train.learning_rate=1"])


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: unknown key 'train.stepz'"):
        load_config(wrong)


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_loader_imports_no_torch():
    code = "import sys, configs; configs.load_config(); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_latent_diffusion_rules_name_the_fields():
    ldm = {"autoencoder": {"enabled": True, "mode": "not_private"}, "model": {"in_channels": 3, "out_channels": 3,
                                                                           "attention_resolutions": [4]}}
    cfg = load_config_dict(ldm)
    assert (cfg.unet_input_size, cfg.latent_downsampling, cfg.image_channels) == (8, 4, 1)
    bad = [
        ({"model": {"in_channels": 1, "out_channels": 1}}, r"'model.in_channels' \(1\) must equal 'autoencoder.latent_channels' \(3\)"),
        ({"autoencoder": {"mode": "dp"}}, r"'autoencoder.mode' is 'dp' but 'privacy.enabled' is false"),
        ({"autoencoder": {"mode": "dp", "attention": True}, "privacy": {"enabled": True}}, r"'autoencoder.attention' cannot be used"),
        ({"autoencoder": {"mode": "public"}}, r"set 'autoencoder.checkpoint'"),
        ({"autoencoder": {"norm_groups": 5}}, r"'autoencoder.norm_groups' \(5\) must divide every width"),
        ({"autoencoder": {"perceptual_weight": 0.1}}, r"needs 'autoencoder.perceptual_weights'"),
        ({"data": {"image_size": 34}}, r"'data.image_size' \(34\) must be divisible by 4"),
        ({"model": {"attention_resolutions": [16]}}, r"with the latent side data.image_size / 4 = 8 the sizes are \[8, 4, 2\]"),
    ]
    for change, message in bad:
        raw = {k: dict(v) for k, v in ldm.items()}
        for section, values in change.items():
            raw.setdefault(section, {}).update(values)
        with pytest.raises(ConfigError, match=message):
            load_config_dict(raw)


@pytest.mark.parametrize("name", ["ldm2d.yaml", "ldm3d.yaml"])
def test_shipped_latent_diffusion_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.autoencoder.enabled and cfg.autoencoder.mode == "dp" and cfg.privacy.enabled
    assert cfg.model.in_channels == cfg.autoencoder.latent_channels


@pytest.mark.parametrize("override", ["train.lr=nan", "train.lr=.inf", "privacy.target_epsilon=nan",
                                      "federation.fraction_train=nan", "privacy.target_delta=.nan"])
def test_nan_and_inf_are_refused_naming_the_field(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}' must be a finite number"):
        load_config(REPO / "configs" / "default.yaml", [override])


def test_duplicate_yaml_keys_are_refused_with_their_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  lr: 0.1\n  steps: 3\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: key 'lr' is given twice \(lines 2 and 4\)"):
        load_config(path)


def test_errors_say_whether_the_file_or_an_override_is_wrong(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("train:\n  lr: 0.1\n")
    bad.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError) as exc:
        load_config(good, ["train.steps=-1"])
    assert str(exc.value).startswith("command-line override(s) train.steps=-1:") and "good.yaml" not in str(exc.value)
    with pytest.raises(ConfigError, match=r"^.*bad.yaml: 'train.lr' must be a number"):
        load_config(bad, ["train.steps=3"])
    # an override may repair a bad file
    assert load_config(bad, ["train.lr=0.5"]).train.lr == 0.5


def test_resume_conflicts_name_the_fields_a_resume_may_not_change():
    from configs.compare import config_differences, resume_conflicts

    stored = load_config(None, [])
    longer = load_config(None, ["federation.num_rounds=9", "output.name=x", "evaluation.every=2"])
    assert resume_conflicts(stored, longer) == []
    assert set(config_differences(stored, longer)) == {"federation.num_rounds", "output.name", "evaluation.every"}
    wider = load_config(None, ["model.model_channels=16", "privacy.target_epsilon=3"])
    assert resume_conflicts(stored, wider) == ["model.model_channels: 64 -> 16", "privacy.target_epsilon: 10.0 -> 3.0"]


def test_old_grad_sample_mode_no_op_is_read_as_vmap_with_a_warning(tmp_path, caplog):
    from configs.compare import resume_conflicts

    old = tmp_path / "config.yaml"  # as in a run directory written before the rename
    old.write_text("privacy:\n  grad_sample_mode: no_op\n")
    with caplog.at_level(logging.WARNING, logger="configs.load"):
        stored = load_config(old)
    assert stored.privacy.grad_sample_mode == "vmap"
    assert [r.getMessage() for r in caplog.records] == [
        "config 'privacy.grad_sample_mode': 'no_op' is a deprecated name; read as 'vmap'"]
    new = load_config(None, ["privacy.grad_sample_mode=vmap"])
    assert load_config(None, ["privacy.grad_sample_mode=no_op"]) == new
    assert resume_conflicts(stored, new) == []
    assert config_to_dict(stored)["privacy"]["grad_sample_mode"] == "vmap"
    with pytest.raises(ConfigError, match=r"allowed values: 'bk', 'hooks', 'vmap'$"):
        load_config_dict({"privacy": {"grad_sample_mode": "no-op"}})


def test_a_file_amends_its_base_section_by_section(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  lr: 0.5\n  batch_size: 7\nmodel:\n  model_channels: 8\n  norm_groups: 4\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  lr: 0.25\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.seed=3"])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.seed, cfg.model.model_channels) == (0.25, 7, 3, 8)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="config file not found: .*nowhere.yaml"):
        load_config(tmp_path / "orphan.yaml")


def test_the_shipped_dp_recipe_amends_the_default_study():
    default, dp = load_config(REPO / "configs" / "default.yaml"), load_config(REPO / "configs" / "dp.yaml")
    assert dp.privacy.enabled and dp.pretraining.steps > 0 and not dp.train.init_from
    assert dp.model == default.model and dp.data == default.data and dp.diffusion == default.diffusion
    assert dp.train.batch_size > default.train.batch_size  # a DP-sized logical batch


def test_central_dp_with_partial_updates_is_refused():
    with pytest.raises(ConfigError, match="'privacy.central_dp' clips whole-model updates.*'lora'"):
        load_config(None, ["privacy.central_dp=fixed", "train.trainable=lora", "train.init_from=x.pt"])


def test_parameter_efficient_training_from_scratch_is_refused():
    with pytest.raises(ConfigError, match="'train.trainable' 'attention' fine-tunes pre-trained weights"):
        load_config(None, ["train.trainable=attention"])
    assert load_config(None, ["train.trainable=attention", "pretraining.steps=10"]).train.trainable == "attention"


def test_a_lesion_weight_without_mask_conditioning_is_refused_naming_the_fields():
    with pytest.raises(ConfigError, match="'train.lesion_weight' \\(5.0\\).*'model.cond_channels' is 0"):
        load_config(None, ["train.lesion_weight=5"])
    cfg = load_config(None, ["train.lesion_weight=5", "train.lesion_dilation=2", "model.cond_channels=4"])
    assert (cfg.train.lesion_weight, cfg.train.lesion_dilation) == (5.0, 2)
    with pytest.raises(ConfigError, match="train.lesion_dilation"):
        load_config(None, ["train.lesion_dilation=-1"])


def test_per_site_segmentation_on_a_study_without_masks_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="'evaluation.segmentation_steps' \\(50\\).*no masks.*model.cond_channels"):
        load_config(None, ["evaluation.segmentation_steps=50"])
    cfg = load_config(None, ["evaluation.segmentation_steps=50", "model.cond_channels=4"])
    assert (cfg.evaluation.segmentation_steps, cfg.evaluation.segmentation_samples) == (50, 64)
    assert load_config(None, []).evaluation.segmentation_steps == 0  # off by default


def test_fields_replaced_on_a_loaded_config_are_validated_and_none_keeps_the_value():
    cfg = load_config(None, ["sampler.num_inference_steps=20"])
    assert with_fields(cfg, {"sampler.guidance_scale": None}) is cfg
    changed = with_fields(cfg, {"sampler.guidance_scale": 2.5, "sampler.name": "ddpm"})
    assert (changed.sampler.guidance_scale, changed.sampler.name, changed.sampler.num_inference_steps) == (2.5, "ddpm", 20)
    with pytest.raises(ConfigError, match="sampler.guidance_scale"):
        with_fields(cfg, {"sampler.guidance_scale": -1.0})
    with pytest.raises(ConfigError, match="num_train_timesteps"):
        with_fields(cfg, {"sampler.num_inference_steps": 10**6})
