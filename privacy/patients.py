"""The privacy unit of a site (a patient, or a record) and user-level sampling of patients.

A patient who contributes many records (the slices of a brain MRI or CT volume, follow-up scans)
is protected by record-level DP only at group level. At the patient unit each site runs
user-level DP-SGD with *user-level sampling* (Charles et al. 2024, "Fine-Tuning Large Language
Models with User-Level Differential Privacy", Sec. 3; Chua et al. 2024, "Mind the Privacy Unit!
User-Level Differential Privacy for Language Model Fine-Tuning"):

1. each step, every patient of the site is included independently with probability ``q``
   (Poisson sampling of patients; ``q = 1 / ceil(P / B)`` for ``B`` expected patients per step, the
   rule Opacus uses for records);
2. of each included patient, up to ``k`` records are drawn at random (``privacy.records_per_patient``);
3. the patient's gradient is the gradient of the mean of those records' losses, clipped to C
   (:mod:`privacy.clipping`); Gaussian noise of std ``sigma * C`` is added to the sum, which is
   divided by the expected number of patients ``q * P``.

Adding or removing one patient changes the sum by at most C, and patients are Poisson-sampled at
rate ``q``: the subsampled Gaussian mechanism the RDP accountant composes, now over patients.
Physical batches split a logical batch at patient boundaries (a patient's at most ``k`` records
stay together), so memory is bounded by ``privacy.max_physical_batch_size`` records, not by the
number of patients sampled.

Hand-written because Opacus samples, clips and accounts per record only (no user-level DP; its
issue #366).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from meddiff.data.datasets import patient_ids
from privacy.clipping import ClipStats

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer

PRIVACY_UNITS = ("auto", "patient", "record")


@dataclass(frozen=True)
class SiteUnits:
    """What a site's guarantee protects, and the records of each unit.

    ``unit`` is ``"patient"`` or ``"record"``; ``groups[u]`` holds the dataset indices of unit ``u``
    (one index per unit at the record unit); ``records_per_patient`` is k (1 at the record unit);
    ``max_records`` is the most records any one patient of the site holds (``k_max``, for the group
    bound of a record-level study).
    """

    unit: str
    groups: tuple[tuple[int, ...], ...]
    records_per_patient: int
    max_records: int
    num_records: int

    @property
    def count(self) -> int:
        """P: the number of units (patients, or records) at the site."""
        return len(self.groups)

    @property
    def patient_level(self) -> bool:
        return self.unit == "patient"

    def describe(self) -> dict:
        """What the ledger keeps about the unit of a study."""
        return {"unit": self.unit, "units": self.count, "num_records": self.num_records,
                "records_per_patient": self.records_per_patient, "max_records_per_patient": self.max_records}


def patient_groups(dataset: Dataset) -> list[tuple[int, ...]]:
    """The dataset's item indices grouped by patient, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, pid in enumerate(patient_ids(dataset)):
        groups.setdefault(pid, []).append(i)
    return [tuple(g) for g in groups.values()]


def site_units(dataset: Dataset, setting: str, records_per_patient: int, *, site: str = "",
               max_physical_batch_size: int = 0) -> SiteUnits:
    """Resolve ``privacy.unit`` for a site's training data: ``auto`` is the patient unit when some
    patient has several records, else the record unit (one image per patient reduces to it)."""
    if setting not in PRIVACY_UNITS:
        raise ValueError(f"privacy.unit must be one of {PRIVACY_UNITS}, got {setting!r}")
    if records_per_patient < 1:
        raise ValueError(f"privacy.records_per_patient must be >= 1, got {records_per_patient}")
    groups = patient_groups(dataset)
    k_max = max((len(g) for g in groups), default=1)
    unit = setting if setting != "auto" else ("patient" if k_max > 1 else "record")
    if unit == "record":
        return SiteUnits("record", tuple((i,) for i in range(len(dataset))), 1, k_max, len(dataset))
    if max_physical_batch_size and max_physical_batch_size < records_per_patient:
        raise ValueError(f"site {site}: privacy.max_physical_batch_size ({max_physical_batch_size}) must be at least "
                         f"privacy.records_per_patient ({records_per_patient}) at the patient unit, which this site's data "
                         f"takes (privacy.unit={setting}; a patient holds up to {k_max} records)")
    return SiteUnits("patient", tuple(groups), int(records_per_patient), k_max, len(dataset))


class PatientSampler:
    """User-level Poisson sampling of a site's patients and split of each logical batch into
    physical ones at patient boundaries.

    ``logical_batch()`` returns the sampled patients' chosen record indices (``[n_i <= k]`` each);
    ``physical_batches()`` yields, forever, ``(indices [N], units [N], last)``: the records of one
    physical batch (at most ``max_physical_batch_size``), the unit 0..U-1 of each, and whether the
    batch ends its logical batch. An empty logical batch is one empty physical batch.
    """

    def __init__(self, groups: Sequence[Sequence[int]], *, sample_rate: float, records_per_patient: int,
                 max_physical_batch_size: int, generator: torch.Generator):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"need 0 < sample_rate <= 1, got {sample_rate}")
        if max_physical_batch_size < records_per_patient:
            raise ValueError(f"privacy.max_physical_batch_size ({max_physical_batch_size}) must be at least "
                             f"privacy.records_per_patient ({records_per_patient})")
        self.groups = [torch.as_tensor(list(g), dtype=torch.long) for g in groups]
        self.sample_rate, self.k = float(sample_rate), int(records_per_patient)
        self.max_physical, self.generator = int(max_physical_batch_size), generator

    @property
    def expected_batch_size(self) -> float:
        """``q * P``: the expected number of patients per step, the divisor of the noisy sum."""
        return self.sample_rate * len(self.groups)

    def attach(self, engine, optimizer: DPOptimizer, hooks_model=None) -> None:
        """Make ``optimizer`` (wrapped by Opacus ``engine`` for a non-Poisson loader) divide the noisy
        sum by ``q * P`` and step the accountant at the patient-level ``q``; forbid gradient
        accumulation on an Opacus ``hooks`` model, as Poisson sampling does."""
        optimizer.expected_batch_size = self.expected_batch_size
        optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        if hooks_model is not None:
            hooks_model.forbid_grad_accumulation()

    def logical_batch(self) -> list[torch.Tensor]:
        included = torch.rand(len(self.groups), generator=self.generator) < self.sample_rate
        batch = []
        for u in included.nonzero().flatten().tolist():
            records = self.groups[u]
            if len(records) > self.k:
                records = records[torch.randperm(len(records), generator=self.generator)[:self.k]]
            batch.append(records)
        return batch

    def physical_batches(self) -> Iterator[tuple[list[int], torch.Tensor, bool]]:
        while True:
            chunks: list[list[torch.Tensor]] = [[]]
            for records in self.logical_batch():
                if chunks[-1] and sum(len(r) for r in chunks[-1]) + len(records) > self.max_physical:
                    chunks.append([])
                chunks[-1].append(records)
            for i, chunk in enumerate(chunks):
                indices = torch.cat(chunk).tolist() if chunk else []
                units = torch.cat([torch.full((len(r),), u, dtype=torch.long) for u, r in enumerate(chunk)]) \
                    if chunk else torch.zeros(0, dtype=torch.long)
                yield indices, units, i == len(chunks) - 1


def patient_batches(loader: DataLoader, sampler: PatientSampler, optimizer: DPOptimizer, stats: ClipStats) -> Iterator:
    """Physical batches ``(x, y)`` of ``loader.dataset`` drawn by ``sampler``, forever. Before each
    is yielded, ``stats.groups`` names the patient of each of its records and the optimizer is
    told whether the batch ends a logical batch (only then does it add noise and step), as
    Opacus's ``BatchMemoryManager`` does for record-level batches; empty batches still step."""
    from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty

    plans: collections.deque = collections.deque()

    class _Indices:  # the loader fetches in order, so the plans queue in the order batches arrive
        def __iter__(self):
            for indices, units, last in sampler.physical_batches():
                plans.append((units, last))
                yield indices

    first = loader.dataset[0]
    collate: Callable = wrap_collate_with_empty(collate_fn=loader.collate_fn or default_collate,
                                                sample_empty_shapes=[[0, *shape_safe(x)] for x in first],
                                                dtypes=[dtype_safe(x) for x in first])
    physical = DataLoader(loader.dataset, batch_sampler=_Indices(), collate_fn=collate, num_workers=loader.num_workers)
    for batch in physical:
        stats.groups, last = plans.popleft()
        optimizer.signal_skip_step(do_skip=not last)
        yield batch
