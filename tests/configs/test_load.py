import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from configs import ConfigError, ExperimentConfig, config_to_dict, config_to_yaml, load_config, load_config_dict

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
    assert (cfg.model_size, cfg.latent_downsampling, cfg.image_channels) == (8, 4, 1)
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
