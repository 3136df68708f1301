"""Which data a site trains on.

- Simulation: ``node_config["partition-id"]`` picks the site. With a manifest (``manifest-path``
  in the run config, written by ``meddiff simulate``/``meddiff data split``) the site reads its
  samples from it; without one, the embedded phantom default generates the site's data.
- Deployment: ``--node-config "data-path=... site-name=..."`` (optionally ``dataset=...``,
  ``labels-csv=...`` and a numeric ``site-index``); the hospital's own folder is read
  with the same adapters, and patients whose id hashes to the last decile are held out for
  evaluation (deterministic, no manifest needed).
"""

from __future__ import annotations

import dataclasses
import hashlib
from functools import lru_cache
from typing import Callable, Mapping

from torch.utils.data import Dataset

from configs import ExperimentConfig, config_to_yaml, load_config_dict
from meddiff.data.adapters import index_dataset
from meddiff.recipes.sites import load_manifest, phantom_site, records_dataset, site_dataset


def _held_out(patient_id: str) -> bool:
    return int(hashlib.sha256(patient_id.encode()).hexdigest(), 16) % 10 == 9


class SiteData:
    """A site's name, index and its ``train`` and ``test`` datasets, each built on first use (an
    evaluate message never pays for building the training set)."""

    def __init__(self, name: str, index: int, train: Dataset | Callable[[], Dataset], test: Dataset | Callable[[], Dataset]):
        self.name, self.index = name, index
        self._parts: dict[str, Dataset | Callable[[], Dataset]] = {"train": train, "test": test}

    def _part(self, split: str) -> Dataset:
        part = self._parts[split]
        if not isinstance(part, Dataset):
            part = self._parts[split] = part()
        return part

    @property
    def train(self) -> Dataset:
        return self._part("train")

    @property
    def test(self) -> Dataset:
        return self._part("test")


def node_site_index(node_config: Mapping) -> int:
    """The site's index as its node config gives it: the simulation's ``partition-id``, else the
    deployment's ``site-index`` (-1 when neither is set)."""
    return int(node_config.get("partition-id", node_config.get("site-index", -1)))


def site_data(cfg: ExperimentConfig, node_config: Mapping, manifest_path: str = "") -> SiteData:
    """Resolve the site's train and held-out data (memoised per process)."""
    key = tuple(sorted((k, str(v)) for k, v in node_config.items()))
    return _site_data(config_to_yaml(cfg), key, manifest_path)


@lru_cache(maxsize=8)
def _site_data(cfg_yaml: str, node_items: tuple, manifest_path: str) -> SiteData:
    import yaml

    cfg = load_config_dict(yaml.safe_load(cfg_yaml))
    node = dict(node_items)
    if "data-path" in node:
        data_cfg = dataclasses.replace(cfg.data, path=node["data-path"], dataset=node.get("dataset", cfg.data.dataset),
                                       labels_csv=node.get("labels-csv", cfg.data.labels_csv))
        records = index_dataset(data_cfg).records
        train = [r for r in records if not _held_out(r.patient_id)]
        test = [r for r in records if _held_out(r.patient_id)] or records[:1]
        name = node.get("site-name", "site")
        return SiteData(name, int(node.get("site-index", -1)),
                        lambda: records_dataset(train, cfg, data_cfg=data_cfg, train=True),
                        lambda: records_dataset(test, cfg, data_cfg=data_cfg, train=False))
    if "partition-id" not in node:
        raise ValueError("node config has neither 'data-path' (deployment) nor 'partition-id' (simulation)")
    pid, num = int(node["partition-id"]), int(node.get("num-partitions", cfg.federation.num_sites))
    if manifest_path:
        manifest = load_manifest(manifest_path)
        if len(manifest["sites"]) != num:
            raise ValueError(f"{manifest_path} has {len(manifest['sites'])} sites but the simulation runs {num} SuperNodes")
        name = manifest["sites"][pid]["name"]
        return SiteData(name, pid, lambda: site_dataset(manifest, pid, cfg, split="train"),
                        lambda: site_dataset(manifest, pid, cfg, split="test"))
    if cfg.data.dataset != "phantoms":
        raise ValueError(f"data.dataset={cfg.data.dataset!r} needs a split manifest: run `meddiff simulate` "
                         "or `meddiff data split` and pass manifest-path")
    return SiteData(f"site_{pid}", pid, lambda: phantom_site(pid, num, cfg, split="train"),
                    lambda: phantom_site(pid, num, cfg, split="test"))
