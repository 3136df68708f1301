import numpy as np
import pytest

from meddiff.data.phantoms import site_acquisition as scanner_acquisition
from sim.partition import assign_sites, dirichlet, holdout, iid, natural, quantity

PATIENTS = [f"p{i:03d}" for i in range(60)]
LABELS = {p: i % 3 for i, p in enumerate(PATIENTS)}
GROUPS = {p: ["Guys", "HH", "IOP"][i % 3] for i, p in enumerate(PATIENTS)}


def _check(sites, patients=PATIENTS):
    flat = [p for s in sites for p in s]
    assert len(flat) == len(set(flat)), "a patient is in two sites"
    assert sorted(flat) == sorted(set(patients))
    assert all(sites)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity", "natural"])
def test_every_partitioner_is_patient_disjoint_and_deterministic(scheme):
    kwargs = dict(num_sites=3, scheme=scheme, seed=4, labels=LABELS, groups=GROUPS, alpha=0.3, power=1.5)
    a, names = assign_sites(PATIENTS, **kwargs)
    b, _ = assign_sites(list(reversed(PATIENTS)) + PATIENTS[:5], **kwargs)  # order and repeats do not matter
    _check(a)
    assert a == b
    assert len(names) == 3


def test_iid_sizes_and_seed():
    sites = iid(PATIENTS, 4, seed=0)
    assert [len(s) for s in sites] == [15, 15, 15, 15]
    assert sites != iid(PATIENTS, 4, seed=1)


def test_dirichlet_small_alpha_skews_labels():
    skewed = dirichlet(PATIENTS * 1, LABELS, 3, seed=0, alpha=0.05)
    flat = dirichlet(PATIENTS, LABELS, 3, seed=0, alpha=1000.0)
    def purity(sites):
        return np.mean([max(np.bincount([LABELS[p] for p in s], minlength=3)) / len(s) for s in sites])
    assert purity(skewed) > purity(flat) + 0.2


def test_quantity_skew_follows_power_law():
    sizes = [len(s) for s in quantity(PATIENTS, 3, seed=0, power=1.5)]
    assert sizes[0] > sizes[1] > sizes[2] >= 1


def test_natural_sites_and_errors():
    sites, names = natural(PATIENTS, GROUPS, 3)
    assert names == ["Guys", "HH", "IOP"]
    assert all(GROUPS[p] == n for s, n in zip(sites, names) for p in s)
    with pytest.raises(ValueError, match="3 natural sites"):
        natural(PATIENTS, GROUPS, 2)
    with pytest.raises(ValueError, match="no site metadata"):
        natural(PATIENTS + ["zz"], GROUPS, 3)


def test_holdout_is_carved_by_patient():
    kept, out = holdout(PATIENTS, 0.1, seed=0)
    assert len(out) == 6 and not set(kept) & set(out)
    assert holdout(PATIENTS, 0.1, seed=0) == (kept, out)


def test_errors():
    with pytest.raises(ValueError, match="cannot fill"):
        assign_sites(PATIENTS[:2], num_sites=3, scheme="iid", seed=0)
    with pytest.raises(ValueError, match="unknown partition scheme"):
        assign_sites(PATIENTS, num_sites=3, scheme="round_robin", seed=0)


def test_scanner_acquisition_is_per_site_and_deterministic():
    a, b = scanner_acquisition(0, seed=1), scanner_acquisition(1, seed=1)
    assert a == scanner_acquisition(0, seed=1) and a != b
