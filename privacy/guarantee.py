"""What a site's epsilon protects, in plain words: one patient or one record, and for a
record-level study on data where a patient holds several records, the group-privacy bound that
record-level DP gives each patient.

Group privacy (Dwork & Roth 2014, "The Algorithmic Foundations of Differential Privacy",
Thm. 2.2 for pure DP; the (epsilon, delta) form follows by chaining the definition over the k
records, ``P[M(D_0) in S] <= e^{k eps} P[M(D_k) in S] + delta (1 + e^eps + ... + e^{(k-1) eps})``):
an (epsilon, delta)-DP mechanism is (k epsilon, k e^{(k-1) epsilon} delta)-DP for groups of k
records. A patient with ``k_max`` slices is such a group, so a record-level
epsilon of 10 says at best ``10 k_max`` about that patient, with a delta that is useless for
any ``k_max`` above a handful. Patient-level DP (:mod:`privacy.patients`) states its guarantee
for the whole patient directly.
"""

from __future__ import annotations

import math

COVERED = {
    "record": ("Record-level (epsilon, delta)-DP for each site's own training data: whatever the server, the other "
               "sites or anyone holding the released weights or samples does, the distribution of what the site sent "
               "changes by at most e^epsilon (plus delta) when any one training record (one image or slice) of that "
               "site is added or removed. It holds for every round the site took part in, composed over its whole "
               "ledger, including earlier studies on the same state directory."),
    "patient": ("Patient-level (epsilon, delta)-DP for each site's own training data: whatever the server, the other "
                "sites or anyone holding the released weights or samples does, the distribution of what the site sent "
                "changes by at most e^epsilon (plus delta) when all records of any one patient of that site (every "
                "slice, scan and follow-up) are added or removed. It holds for every round the site took part in, "
                "composed over its whole ledger, including earlier studies on the same state directory."),
}
GROUP_CAVEAT = ("At the record unit, a patient who contributes several records (slices, follow-up scans) is protected "
                "at group level only: k records give k x epsilon, with delta growing as k e^((k-1) epsilon) delta (the "
                "group bound is printed per site). At the patient unit this does not apply.")


def group_bound(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """``(k epsilon, k e^{(k-1) epsilon} delta)``: the guarantee of an (epsilon, delta)-DP mechanism for
    a group of ``k`` records (Dwork & Roth 2014, Thm. 2.2); delta is inf when it overflows."""
    exponent = (k - 1) * epsilon + math.log(k) + (math.log(delta) if delta > 0 else -math.inf)
    return k * epsilon, (math.exp(exponent) if exponent < 700 else math.inf)


def ledger_unit(ledger: dict) -> str:
    """What a stored ledger's epsilon protects: patient when every study in it was patient-level."""
    units = {c.get("unit", "record") for c in ledger.get("calibrations", [])}
    return "patient" if units == {"patient"} else "record"


def unit_summary(ledger: dict, epsilon: float, delta: float) -> dict:
    """The unit of a site's ledger, its counts and the guarantee in words (with the group bound of a
    record-level ledger whose patients hold several records)."""
    cals = ledger.get("calibrations", [])
    last = cals[-1] if cals else {}
    unit = ledger_unit(ledger)
    k_max = max([int(c.get("max_records_per_patient", 1)) for c in cals] or [1])
    site = ledger["site"]
    out = {"unit": unit, "units": last.get("num_examples"), "num_records": last.get("num_records", last.get("num_examples")),
           "records_per_patient": last.get("records_per_patient", 1), "max_records_per_patient": k_max, "group_bound": None}
    if unit == "patient":
        out["statement"] = (f"adding or removing all records of any one patient of {site} changes the distribution of what "
                            f"it sent by at most a factor e^{epsilon:.3g} (plus delta {delta:.1e}); {out['units']} patients, "
                            f"up to k = {out['records_per_patient']} records of each sampled patient per step")
        return out
    out["statement"] = (f"adding or removing any one record (image or slice) of {site} changes the distribution of what "
                        f"it sent by at most a factor e^{epsilon:.3g} (plus delta {delta:.1e})")
    if k_max > 1:
        eps_k, delta_k = group_bound(epsilon, delta, k_max)
        out["group_bound"] = {"k_max": k_max, "epsilon": eps_k, "delta": delta_k}
        out["statement"] += (f"; a patient holds up to {k_max} records, so by group privacy the bound for a whole patient "
                             f"is only epsilon {eps_k:.4g} with delta {delta_k:.3g}"
                             + (" (no guarantee: delta >= 1)" if delta_k >= 1 else "")
                             + "; privacy.unit=patient protects each patient directly")
    return out


def guarantee_lines(sites: list[dict]) -> list[str]:
    """Markdown: one line per site saying what its epsilon protects."""
    return [f"- **{s['site']}** ({s['unit']} unit): {s['statement']}." for s in sites]


def covered(sites: list[dict]) -> str:
    """The statement of what the run's site-level guarantee covers, for the units its sites use."""
    units = sorted({s["unit"] for s in sites}) or ["record"]
    return " ".join(COVERED[u] for u in reversed(units))
