"""Patient-level DP-SGD: per-patient gradients, clipping per patient, user-level Poisson sampling
and the patient-level sample rate in the accountant."""

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

from meddiff.data import ArrayDataset
from meddiff.data.datasets import patient_ids
from meddiff.diffusion import GaussianDiffusion, make_noise_schedule, row_mse
from meddiff.nets.autoencoder import AutoencoderObjective, kl_per_example
from meddiff.train import train_loop
from privacy.clipping import unit_gradients
from privacy.engine import make_private
from privacy.patients import PatientSampler, patient_groups, site_units
from tests.conftest import twin_unets
from tests.meddiff.nets.test_autoencoder import tiny_ae
from tests.privacy.test_engine import _per_image


class PatientDataset(TensorDataset):
    """Images with the patient of each (what a site's dataset of volume slices exposes)."""

    def __init__(self, x, y, patients):
        super().__init__(x, y)
        self.patient_ids = list(patients)


def _models(spatial_dims, seed=0):
    torch.manual_seed(seed)
    kw = dict(spatial_dims=spatial_dims, num_classes=2)
    return twin_unets(**kw)


def _reference_per_patient(reference, diffusion, x0, y, groups, k, seed):
    """One patient at a time, plain autograd: the gradient of the mean over its records of each
    record's mean loss over its K draws (the draws of one batched call with the same generator)."""
    x_t, t, y_rows, target = diffusion.training_inputs(x0, y=y, noise_multiplicity=k, generator=torch.Generator().manual_seed(seed))
    grads = []
    for records in groups:
        rows = torch.cat([torch.arange(r * k, (r + 1) * k) for r in records])
        per_row = row_mse(reference(x_t[rows], t[rows], y_rows[rows]), target[rows])
        loss = per_row.reshape(len(records), k).mean(1).mean()
        grads.append(torch.autograd.grad(loss, list(reference.parameters())))
    return [torch.stack(g) for g in zip(*grads)]


@pytest.mark.parametrize("mode", ["hooks", "vmap", "bk"])
@pytest.mark.parametrize("spatial_dims", [2, pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("k", [1, 4])
def test_each_per_patient_gradient_equals_one_patient_at_a_time_autograd(k, spatial_dims, mode):
    """Patients with 1, 3 and records_per_patient (4) records in one physical batch."""
    model, reference = _models(spatial_dims)
    side = 16 if spatial_dims == 2 else 8
    groups = [[0], [1, 2, 3], [4, 5, 6, 7]]
    units = torch.tensor([u for u, g in enumerate(groups) for _ in g])
    x0, y = torch.randn(8, 1, *(side,) * spatial_dims), torch.arange(8) % 2
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), DataLoader(TensorDataset(x0, y), batch_size=8),
                           noise_multiplier=0.0, max_grad_norm=1e6, noise_multiplicity=k, grad_sample_mode=mode)
    diffusion = GaussianDiffusion(make_noise_schedule("cosine", 100), prediction_type="v")
    expected = _reference_per_patient(reference, diffusion, x0, y, groups, k, seed=4)
    per_record = _per_image(private, mode, diffusion, x0, y, k, torch.Generator().manual_seed(4))
    if mode != "hooks":  # bk and vmap hand their per-image gradients to the optimizer as grad_sample
        for p, g in zip(private.optimizer.params, per_record):
            p.grad_sample = g
    private.stats.groups = units
    got = unit_gradients(private.optimizer, k if mode == "hooks" else 1, private.stats)
    for g, e in zip(got, expected):
        assert g.shape[0] == len(groups)  # one gradient per patient
        assert float((g - e).norm() / e.norm().clamp_min(1e-12)) <= 1e-5


def _patient_step(groups, *, mode="bk", clip=1e-3, k=4, physical=64, seed=0):
    """One logical step of the full patient-level path (every patient sampled, no noise, lr 0):
    the summed clipped gradient (p.grad x expected patients) and the clipping statistics."""
    model, _ = _models(2, seed)
    n = sum(len(g) for g in groups)
    pids = [f"p{u}" for u, g in enumerate(groups) for _ in g]
    data = PatientDataset(torch.randn(n, 1, 16, 16), torch.arange(n) % 2, pids)
    sampler = PatientSampler(patient_groups(data), sample_rate=1.0, records_per_patient=k, max_physical_batch_size=physical,
                             generator=torch.Generator().manual_seed(seed))
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), DataLoader(data, batch_size=len(groups)),
                           noise_multiplier=0.0, max_grad_norm=clip, noise_multiplicity=2, grad_sample_mode=mode,
                           patients=sampler)
    batches = private.batches(physical)
    try:
        train_loop(model=private.model, objective=GaussianDiffusion(make_noise_schedule("cosine", 100)),
                   optimizer=private.optimizer, batches=batches, steps=1, device=torch.device("cpu"), noise_multiplicity=2,
                   progress=False, step_fn=private.step_fn, optimizer_stepped=private.optimizer_stepped)
    finally:
        batches.close()
    total = torch.stack([p.grad.norm() for p in private.optimizer.params]).norm() * private.optimizer.expected_batch_size
    return float(total), private


@pytest.mark.parametrize("mode, k", [("bk", 4), ("bk", 50), ("hooks", 50)])
def test_a_patient_with_50_records_moves_a_step_by_at_most_c(mode, k):
    """k of its records per step, or all 50 in one physical batch: one clipped gradient either way."""
    c = 1e-3
    norm, private = _patient_step([list(range(50))], mode=mode, clip=c, k=k)
    assert norm <= c * (1 + 1e-4) and private.stats.total == 1 and private.stats.clipped == 1
    assert private.optimizer.expected_batch_size == 1.0


def test_each_patient_is_clipped_once_however_many_records_it_has():
    c = 1e-3
    norm, private = _patient_step([[0], [1, 2, 3], list(range(4, 54))], clip=c, k=50)
    assert private.stats.total == 3 and private.stats.clip_fraction == 1.0  # three clipped gradients, not 54
    assert norm <= 3 * c * (1 + 1e-4)


def test_patient_sampling_is_poisson_over_patients_with_up_to_k_random_records():
    groups = [[0], [1, 2, 3], list(range(4, 14)), list(range(14, 44))]
    sampler = PatientSampler(groups, sample_rate=0.3, records_per_patient=4, max_physical_batch_size=6,
                             generator=torch.Generator().manual_seed(1))
    trials, included, subsets = 2000, torch.zeros(4), set()
    for _ in range(trials):
        for records in sampler.logical_batch():
            owner = next(u for u, g in enumerate(groups) if int(records[0]) in g)
            assert len(records) == min(4, len(groups[owner])) and set(records.tolist()) <= set(groups[owner])
            assert len(set(records.tolist())) == len(records)
            included[owner] += 1
            if owner == 3:
                subsets.add(tuple(sorted(records.tolist())))
    rate = included / trials
    assert torch.all((rate - 0.3).abs() < 4 * (0.3 * 0.7 / trials) ** 0.5), rate  # each patient at rate q
    assert len(subsets) > 100  # a fresh random choice of records each step
    assert sampler.expected_batch_size == pytest.approx(1.2)
    for _ in range(200):  # physical batches: at most 6 records, a patient never split, units numbered per batch
        batch = next(sampler.physical_batches())
        indices, units, _ = batch
        assert len(indices) <= 6 and len(units) == len(indices)
        for u in units.unique().tolist():
            chosen = [i for i, v in zip(indices, units.tolist()) if v == u]
            assert any(set(chosen) <= set(g) for g in groups)
    with pytest.raises(ValueError, match="max_physical_batch_size .3. must be at least privacy.records_per_patient .4."):
        PatientSampler(groups, sample_rate=0.3, records_per_patient=4, max_physical_batch_size=3, generator=torch.Generator())


def test_a_logical_batch_splits_at_patient_boundaries_and_steps_once():
    groups = [[0, 1, 2], [3, 4, 5], [6, 7]]
    sampler = PatientSampler(groups, sample_rate=1.0, records_per_patient=3, max_physical_batch_size=4,
                             generator=torch.Generator().manual_seed(0))
    batches = sampler.physical_batches()
    plan = [next(batches) for _ in range(3)]
    assert [sorted(i) for i, _, _ in plan] == [[0, 1, 2], [3, 4, 5], [6, 7]] and [last for *_, last in plan] == [False, False, True]
    empty = PatientSampler(groups, sample_rate=1e-9, records_per_patient=3, max_physical_batch_size=4,
                           generator=torch.Generator().manual_seed(0))
    indices, units, last = next(empty.physical_batches())
    assert indices == [] and units.numel() == 0 and last  # an empty logical batch still steps


def test_the_accountant_runs_at_the_patient_level_rate_and_epsilon_matches_a_standalone_accountant():
    groups = [list(range(i * 5, i * 5 + 5)) for i in range(8)]  # 8 patients, 5 records each
    data = PatientDataset(torch.randn(40, 1, 16, 16), torch.arange(40) % 2, [f"p{i // 5}" for i in range(40)])
    units = site_units(data, "auto", 2)
    assert units.unit == "patient" and units.count == 8 and units.max_records == 5 and units.num_records == 40
    assert [list(g) for g in units.groups] == groups
    model, _ = _models(2)
    sampler = PatientSampler(units.groups, sample_rate=0.25, records_per_patient=2, max_physical_batch_size=4,
                             generator=torch.Generator().manual_seed(3))
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.01), DataLoader(data, batch_size=2),
                           noise_multiplier=1.1, max_grad_norm=1.0, accountant_history=[(1.3, 0.1, 5)], patients=sampler)
    batches = private.batches(4)
    try:
        train_loop(model=private.model, objective=GaussianDiffusion(make_noise_schedule("cosine", 100)),
                   optimizer=private.optimizer, batches=batches, steps=3, device=torch.device("cpu"), progress=False,
                   step_fn=private.step_fn, optimizer_stepped=private.optimizer_stepped)
    finally:
        batches.close()
    assert private.history == [(1.3, 0.1, 5), (1.1, 0.25, 3)]  # q over patients, not records (2/40 = 0.05)
    assert private.optimizer.expected_batch_size == 2.0  # q * P expected patients divide the noisy sum
    reference = RDPAccountant()
    for sigma, q, n in [(1.3, 0.1, 5), (1.1, 0.25, 3)]:
        for _ in range(n):
            reference.step(noise_multiplier=sigma, sample_rate=q)
    assert private.engine.accountant.get_epsilon(1e-3) == pytest.approx(reference.get_epsilon(1e-3), rel=1e-12)


def test_the_unit_follows_the_data_unless_set():
    one_each = ArrayDataset(torch.zeros(5, 1, 4, 4).numpy(), torch.zeros(5).numpy())
    assert patient_ids(one_each) == [f"#{i}" for i in range(5)]
    assert site_units(one_each, "auto", 4).unit == "record"  # one image per patient reduces to the record unit
    assert site_units(one_each, "patient", 4).count == 5
    slices = PatientDataset(torch.zeros(6, 1, 4, 4), torch.zeros(6), ["a", "a", "b", "c", "c", "c"])
    assert site_units(slices, "record", 4).count == 6 and site_units(slices, "record", 4).max_records == 3
    with pytest.raises(ValueError, match="site h1: privacy.max_physical_batch_size .2. must be at least"):
        site_units(slices, "auto", 4, site="h1", max_physical_batch_size=2)


def test_the_autoencoder_phase_clips_one_gradient_per_patient():
    """Phase 1 of latent diffusion at the patient unit (bk, the default mode): the step's summed
    gradient is the sum over patients of the gradient of the mean of their records' losses."""
    torch.manual_seed(0)
    ae, reference = tiny_ae(), tiny_ae()
    reference.load_state_dict(ae.state_dict())
    groups = [[0], [1, 2, 3], [4, 5]]
    data = PatientDataset(torch.randn(6, 1, 16, 16), torch.zeros(6, dtype=torch.long), ["a", "b", "b", "b", "c", "c"])
    sampler = PatientSampler(patient_groups(data), sample_rate=1.0, records_per_patient=4, max_physical_batch_size=8,
                             generator=torch.Generator().manual_seed(0))
    private = make_private(ae, torch.optim.SGD(ae.parameters(), lr=0.0), DataLoader(data, batch_size=3), noise_multiplier=0.0,
                           max_grad_norm=1e6, grad_sample_mode="bk", patients=sampler)
    objective = AutoencoderObjective(kl_weight=1e-2)
    batches = private.batches(8)
    try:
        train_loop(model=private.model, objective=objective, optimizer=private.optimizer, batches=batches, steps=1,
                   device=torch.device("cpu"), progress=False, step_fn=private.step_fn, optimizer_stepped=private.optimizer_stepped,
                   generator=torch.Generator().manual_seed(5))
    finally:
        batches.close()
    x = data.tensors[0]  # every patient sampled, its records in order: the physical batch is x itself
    noise = torch.randn(reference.latent_shape(x.shape), generator=torch.Generator().manual_seed(5))
    recon, mu, sigma = reference(x, noise)
    per_record = (recon - x).abs().flatten(1).mean(1) + 1e-2 * kl_per_example(mu, sigma)
    loss = sum(per_record[g].mean() for g in groups)  # one mean per patient, summed over patients
    expected = torch.autograd.grad(loss, list(reference.parameters()))
    assert private.stats.total == 3
    for p, e in zip(private.optimizer.params, expected):
        got = p.grad * private.optimizer.expected_batch_size
        assert float((got - e).norm() / e.norm().clamp_min(1e-12)) < 1e-4
