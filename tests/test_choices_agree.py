"""The config's allowed values (``choices=`` in configs/schema.py) and the registries that act on
them name the same values. configs/ imports no project package, so the values are spelled twice;
these tests keep the two spellings equal."""

import dataclasses
import importlib

import pytest

from configs.schema import (AutoencoderConfig, DataConfig, DiffusionConfig, EvaluationConfig, FederationConfig,
                            PartitionConfig, PrivacyConfig, SamplerConfig, TrainConfig)


def _choices(section, name: str) -> tuple:
    (f,) = [f for f in dataclasses.fields(section) if f.name == name]
    return f.metadata["choices"]


# (config section, field, module, registry: a dict keyed by the values or a tuple of them)
REGISTRIES = [
    (SamplerConfig, "name", "meddiff.sampling", "SAMPLERS"),
    (SamplerConfig, "timestep_spacing", "meddiff.sampling.base", "TIMESTEP_SPACINGS"),
    (FederationConfig, "strategy", "server.strategy", "STRATEGIES"),
    (FederationConfig, "transport_dtype", "protocol.weights", "TRANSPORT_DTYPES"),
    (PrivacyConfig, "grad_sample_mode", "privacy.engine", "GRAD_SAMPLE_MODES"),
    (PrivacyConfig, "unit", "privacy.patients", "PRIVACY_UNITS"),
    (DiffusionConfig, "prediction_type", "meddiff.diffusion.gaussian", "PREDICTION_TYPES"),
    (DiffusionConfig, "noise_schedule", "meddiff.diffusion", "NOISE_SCHEDULES"),
    (EvaluationConfig, "encoder", "meddiff.evaluate", "ENCODERS"),
    (DataConfig, "hu_window", "meddiff.data.transforms", "HU_WINDOWS"),
    (PartitionConfig, "scheme", "sim.partition", "SCHEMES"),
    (TrainConfig, "trainable", "meddiff.nets.trainable", "TRAINABLE_MODES"),
    (TrainConfig, "translation_objective", "meddiff.recipes.phases", "TRANSLATION_OBJECTIVES"),
    (DataConfig, "source_sequence", "meddiff.recipes.translation_data", "TRANSLATION_CONTRASTS"),
    (DataConfig, "target_sequence", "meddiff.recipes.translation_data", "TRANSLATION_CONTRASTS"),
]


@pytest.mark.parametrize("section, name, module, registry", REGISTRIES,
                         ids=[f"{s.__name__}.{n}" for s, n, _, _ in REGISTRIES])
def test_schema_choices_are_the_registry_keys(section, name, module, registry):
    choices = _choices(section, name)
    keys = getattr(importlib.import_module(module), registry)
    assert len(set(choices)) == len(choices), f"{section.__name__}.{name} lists a value twice"
    assert sorted(choices) == sorted(keys), f"{section.__name__}.{name} vs {module}.{registry}"


def test_datasets_are_the_folder_adapters_and_the_generated_phantoms():
    from meddiff.data.adapters import INDEXERS

    datasets = _choices(DataConfig, "dataset")
    assert len(set(datasets)) == len(datasets)
    assert sorted(datasets) == sorted([*INDEXERS, "phantoms"])  # phantoms are generated, not indexed
    assert sorted(_choices(AutoencoderConfig, "public_dataset")) == sorted(["", *datasets])  # "": no public data


def test_dataset_dispatch_builds_phantoms_and_refuses_an_unknown_layout():
    from meddiff.recipes.build import build_dataset_from_section
    from meddiff.data.adapters import index_dataset
    from meddiff.data.readers import DataError

    assert len(build_dataset_from_section(DataConfig(dataset="phantoms", num_samples=2, image_size=8))) == 2
    with pytest.raises(DataError, match="has no folder adapter"):
        index_dataset(DataConfig(dataset="unknown"))


def test_grad_sample_mode_dispatch_gives_each_mode_its_step_and_refuses_an_unknown_one():
    import torch

    from meddiff.train import train_step
    from privacy.engine import PrivateTraining, bk_train_step, make_private, vmap_train_step

    steps = {mode: PrivateTraining(None, None, None, None, None, grad_sample_mode=mode).step_fn
             for mode in _choices(PrivacyConfig, "grad_sample_mode")}
    assert steps == {"bk": bk_train_step, "hooks": train_step, "vmap": vmap_train_step}
    with pytest.raises(ValueError, match="grad_sample_mode 'unknown' is not supported"):
        make_private(torch.nn.Linear(1, 1), None, None, noise_multiplier=1.0, max_grad_norm=1.0,
                     grad_sample_mode="unknown")


def test_prediction_type_dispatch_accepts_every_choice_and_refuses_an_unknown_one():
    from meddiff.diffusion import GaussianDiffusion, make_noise_schedule

    betas = make_noise_schedule("linear", 10)
    for prediction in _choices(DiffusionConfig, "prediction_type"):
        assert GaussianDiffusion(betas, prediction_type=prediction).prediction_type == prediction
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        GaussianDiffusion(betas, prediction_type="unknown")


def test_timestep_spacing_dispatch_accepts_every_choice_and_refuses_an_unknown_one():
    from meddiff.sampling.base import inference_timesteps

    for spacing in _choices(SamplerConfig, "timestep_spacing"):
        assert len(inference_timesteps(100, 10, spacing)) == 10
    with pytest.raises(ValueError, match="timestep spacing must be one of"):
        inference_timesteps(100, 10, "unknown")


def test_partition_scheme_dispatch_accepts_every_choice_and_refuses_an_unknown_one():
    from sim.partition import assign_sites

    patients = [f"p{i}" for i in range(12)]
    extra = {"labels": {p: i % 2 for i, p in enumerate(patients)},
             "groups": {p: f"h{i % 2}" for i, p in enumerate(patients)}}
    for scheme in _choices(PartitionConfig, "scheme"):
        sites, _ = assign_sites(patients, num_sites=2, scheme=scheme, seed=0, **extra)
        assert sorted(p for site in sites for p in site) == sorted(patients)
    with pytest.raises(ValueError, match="unknown partition scheme"):
        assign_sites(patients, num_sites=2, scheme="unknown", seed=0, **extra)


def test_translation_checks_name_the_phantom_contrasts_and_the_brats_sequences():
    from configs.checks import BRATS_SEQUENCES, PHANTOM_CONTRASTS
    from meddiff.data.adapters import BRATS_SEQUENCES as INDEXED
    from meddiff.data.phantom_anatomy import CONTRASTS

    assert sorted(PHANTOM_CONTRASTS) == sorted(CONTRASTS) and BRATS_SEQUENCES == INDEXED
