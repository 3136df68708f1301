"""Reproducible pseudo-site splits written as ``manifest.json``.

The manifest lists, per site, the training and held-out samples (id, patient, label, SHA-256 of
the source content), label counts, the site's scanner effects, and the seed and config. It holds no
timestamps and is serialised with sorted keys, so the same config and data give a byte-identical
file. :func:`check_disjoint` proves that no patient is in two sites or in both train and test.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

import meddiff
from configs import ExperimentConfig
from meddiff.data.adapters import index_dataset
from meddiff.data.records import IndexResult, Record
from meddiff.data.cache import ArrayCache, content_digest
from meddiff.data.readers import DataError
from meddiff.recipes.sites import MANIFEST_VERSION, check_disjoint
from meddiff.data.phantoms import make_phantoms, site_acquisition
from sim.partition import assign_sites, holdout



def index_phantoms(cfg: ExperimentConfig) -> IndexResult:
    """Phantoms as records: each phantom is its own patient; its hash is that of its pixels."""
    d = cfg.data
    images, labels = make_phantoms(d.num_samples, d.image_size, seed=d.seed, lesion_fraction=d.lesion_fraction)
    recs = [
        Record(f"phantom_{i:06d}", f"phantom_{i:06d}", int(labels[i]), (), "phantom",
               {"index": i, "sha256": hashlib.sha256(images[i].tobytes()).hexdigest()})
        for i in range(len(labels))
    ]
    return IndexResult(recs)


def _validated(index: IndexResult, cfg: ExperimentConfig) -> list[Record]:
    """Preprocess every file-backed record once (filling the cache), so unreadable files are found
    at split time: an error naming the file, or with ``data.skip_bad`` a logged, counted skip."""
    cache = ArrayCache(cfg.data.cache_dir)
    good = []
    for r in index.records:
        if r.kind in ("phantom", "npz"):
            good.append(r)
            continue
        try:
            cache.get(r, cfg.data, spatial_dims=cfg.model.spatial_dims)
        except DataError as exc:
            if not cfg.data.skip_bad:
                raise
            index.bad.append(str(exc))
            continue
        good.append(r)
    if not good:
        raise DataError(f"{cfg.data.path}: no usable items ({len(index.bad)} skipped as bad)")
    return good


def _patient_tables(records: list[Record], natural_key: str):
    labels: dict[str, int] = {}
    groups: dict[str, str] = {}
    for r in records:
        labels[r.patient_id] = max(labels.get(r.patient_id, 0), r.label)
        if natural_key in r.meta:
            groups[r.patient_id] = str(r.meta[natural_key])
    return labels, groups


def _entries(records: list[Record], patients: set[str]) -> dict[str, Any]:
    chosen = sorted((r for r in records if r.patient_id in patients), key=lambda r: r.sample_id)
    samples = [{"id": r.sample_id, "patient": r.patient_id, "label": r.label,
                "sha256": r.meta["sha256"] if r.kind == "phantom" else content_digest(r)} for r in chosen]
    counts = Counter(str(r.label) for r in chosen)
    return {"num_patients": len(patients), "num_samples": len(samples),
            "label_counts": dict(sorted(counts.items())), "samples": samples}


def build_manifest(cfg: ExperimentConfig) -> dict[str, Any]:
    """Index the dataset, carve held-out patients, assign sites and describe the result."""
    index = index_phantoms(cfg) if cfg.data.dataset == "phantoms" else index_dataset(cfg.data)
    p = cfg.partition
    records = _validated(index, cfg)
    labels, groups = _patient_tables(records, p.natural_key)
    patients = sorted(labels)
    pool, global_test = holdout(patients, p.test_fraction, p.seed, salt=0)
    public: list[str] = []
    if p.public_fraction > 0:  # carved before the sites: no site patient is ever in it
        pool, public = holdout(pool, p.public_fraction, p.seed, salt=10_007)
    sites, names = assign_sites(
        pool, num_sites=cfg.federation.num_sites, scheme=p.scheme, seed=p.seed, labels=labels,
        groups=groups if groups else None, alpha=p.dirichlet_alpha, power=p.quantity_power,
    )
    site_entries = []
    for i, (name, members) in enumerate(zip(names, sites)):
        train, test = holdout(members, p.site_test_fraction, p.seed, salt=i + 1)
        entry = {"name": name, "train": _entries(records, set(train)), "test": _entries(records, set(test))}
        entry["acquisition"] = asdict(site_acquisition(i, p.seed)) if p.scanner_shift else None
        site_entries.append(entry)
    return {
        "manifest_version": MANIFEST_VERSION,
        "meddiff_version": meddiff.__version__,
        "dataset": cfg.data.dataset,
        "path": cfg.data.path,
        "num_sites": cfg.federation.num_sites,
        "seed": p.seed,
        "config": {"data": asdict(cfg.data), "partition": asdict(p)},
        "global_test": _entries(records, set(global_test)),
        "public": _entries(records, set(public)),
        "sites": site_entries,
        "bad_items": len(index.bad),
        "bad": index.bad,
    }


def dumps(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, sort_keys=True, indent=1, default=list) + "\n"


def write_manifest(manifest: dict[str, Any], out_dir: str | Path) -> Path:
    check_disjoint(manifest)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "manifest.json"
    path.write_text(dumps(manifest))
    return path


def preview_table(manifest: dict[str, Any]) -> str:
    """A plain-text table of per-site patient and sample counts by label."""
    labels = sorted({k for s in manifest["sites"] for part in ("train", "test") for k in s[part]["label_counts"]}
                    | set(manifest["global_test"]["label_counts"]), key=lambda x: int(x))
    head = ["split", "patients", "samples"] + [f"label {lab}" for lab in labels]
    rows = []
    for s in manifest["sites"]:
        for part in ("train", "test"):
            e = s[part]
            rows.append([f"{s['name']}/{part}", e["num_patients"], e["num_samples"]] + [e["label_counts"].get(lab, 0) for lab in labels])
    for name in ("global_test", "public"):
        g = manifest.get(name)
        if g and (name == "global_test" or g["num_samples"]):
            rows.append([name, g["num_patients"], g["num_samples"]] + [g["label_counts"].get(lab, 0) for lab in labels])
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    if manifest["bad_items"]:
        lines.append(f"skipped bad items: {manifest['bad_items']}")
    return "\n".join(lines)


def preview_chart(manifest: dict[str, Any], path: str | Path) -> Path:
    """A stacked bar chart of training samples per site by label (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = manifest["sites"]
    labels = sorted({k for s in sites for k in s["train"]["label_counts"]}, key=lambda x: int(x))
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(sites), 3.2), dpi=120)
    bottom = np.zeros(len(sites))
    for lab in labels:
        vals = np.array([s["train"]["label_counts"].get(lab, 0) for s in sites])
        ax.bar([s["name"] for s in sites], vals, bottom=bottom, label=f"label {lab}")
        bottom += vals
    ax.set_ylabel("training samples")
    ax.set_title(f"{manifest['dataset']}: {manifest['config']['partition']['scheme']} split, seed {manifest['seed']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
