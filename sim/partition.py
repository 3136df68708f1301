"""Partitioners: pure functions of (patient index, number of sites, seed) -> patient ids per site.

Splitting is always by patient: every function takes one entry per patient, so slices or volumes
of one patient can never land in two sites. Held-out splits are carved before site assignment
(:func:`holdout`). Scanner shift gives each pseudo-site its own deterministic acquisition effects.

Label skew follows the Dirichlet scheme of Hsu et al. 2019 ("Measuring the effects of non-identical
data distribution", arXiv 1909.06335); quantity skew gives site sizes proportional to
``rank ** -power`` (a power law, as in Li et al. 2022, "Federated learning on non-IID data silos").
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

SCHEMES = ("iid", "dirichlet", "quantity", "natural")


def _rng(seed: int, *salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, *salt])


def holdout(patients: Sequence[str], fraction: float, seed: int, salt: int = 0) -> tuple[list[str], list[str]]:
    """Split sorted unique ``patients`` into (kept, held-out) with ``round(fraction * n)`` held out."""
    patients = sorted(set(patients))
    n_out = int(round(fraction * len(patients)))
    if fraction > 0 and n_out == 0 and len(patients) > 1:
        n_out = 1
    order = _rng(seed, 7, salt).permutation(len(patients))
    out = {patients[i] for i in order[:n_out]}
    return [p for p in patients if p not in out], sorted(out)


def iid(patients: Sequence[str], num_sites: int, seed: int) -> list[list[str]]:
    """Uniformly random, near-equal sites."""
    patients = sorted(set(patients))
    order = _rng(seed, 1).permutation(len(patients))
    return [sorted(patients[i] for i in chunk) for chunk in np.array_split(order, num_sites)]


def dirichlet(patients: Sequence[str], labels: Mapping[str, int], num_sites: int, seed: int, alpha: float) -> list[list[str]]:
    """Label skew: the patients of each class are spread over sites by proportions ``~ Dir(alpha)``."""
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    rng = _rng(seed, 2)
    patients = sorted(set(patients))
    sites: list[list[str]] = [[] for _ in range(num_sites)]
    for cls in sorted({labels[p] for p in patients}):
        members = [p for p in patients if labels[p] == cls]
        members = [members[i] for i in rng.permutation(len(members))]
        props = rng.dirichlet(np.full(num_sites, alpha))
        cuts = (np.cumsum(props)[:-1] * len(members)).round().astype(int)
        for s, chunk in enumerate(np.split(np.asarray(members, dtype=object), cuts)):
            sites[s].extend(chunk.tolist())
    return _ensure_nonempty(sites)


def quantity(patients: Sequence[str], num_sites: int, seed: int, power: float) -> list[list[str]]:
    """Quantity skew: site ``k`` (0-based) gets a share proportional to ``(k + 1) ** -power``."""
    patients = sorted(set(patients))
    shares = np.arange(1, num_sites + 1, dtype=np.float64) ** -power
    shares /= shares.sum()
    order = _rng(seed, 3).permutation(len(patients))
    cuts = (np.cumsum(shares)[:-1] * len(patients)).round().astype(int)
    sites = [[patients[i] for i in chunk] for chunk in np.split(order, cuts)]
    return _ensure_nonempty(sites)


def natural(patients: Sequence[str], groups: Mapping[str, str], num_sites: int) -> tuple[list[list[str]], list[str]]:
    """One site per distinct metadata value (e.g. IXI hospital); returns (sites, site names)."""
    patients = sorted(set(patients))
    missing = [p for p in patients if not groups.get(p)]
    if missing:
        raise ValueError(f"{len(missing)} patient(s) have no site metadata, e.g. {missing[0]!r}")
    names = sorted({groups[p] for p in patients})
    if len(names) != num_sites:
        raise ValueError(f"the data name {len(names)} natural sites {names}, but federation.num_sites={num_sites}")
    return [sorted(p for p in patients if groups[p] == n) for n in names], names


def _ensure_nonempty(sites: list[list[str]]) -> list[list[str]]:
    """Move one patient from the largest site into each empty one (deterministic)."""
    for s in range(len(sites)):
        if not sites[s]:
            donor = max(range(len(sites)), key=lambda i: (len(sites[i]), -i))
            if len(sites[donor]) < 2:
                raise ValueError("too few patients to give every site at least one")
            sites[s].append(sites[donor].pop())
    return [sorted(x) for x in sites]


def assign_sites(
    patients: Sequence[str],
    *,
    num_sites: int,
    scheme: str,
    seed: int,
    labels: Mapping[str, int] | None = None,
    groups: Mapping[str, str] | None = None,
    alpha: float = 0.5,
    power: float = 1.5,
) -> tuple[list[list[str]], list[str]]:
    """Dispatch to a partitioner; returns (patients per site, site names)."""
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    if len(set(patients)) < num_sites:
        raise ValueError(f"{len(set(patients))} patients cannot fill {num_sites} sites")
    default_names = [f"site_{i}" for i in range(num_sites)]
    if scheme == "iid":
        return iid(patients, num_sites, seed), default_names
    if scheme == "dirichlet":
        if labels is None:
            raise ValueError("dirichlet partitioning needs patient labels")
        return dirichlet(patients, labels, num_sites, seed, alpha), default_names
    if scheme == "quantity":
        return quantity(patients, num_sites, seed, power), default_names
    if scheme == "natural":
        if groups is None:
            raise ValueError("natural partitioning needs site metadata per patient")
        return natural(patients, groups, num_sites)
    raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {SCHEMES}")
