"""Dataset adapters for the layouts users download, as two steps:

1. ``index_dataset(cfg)`` (here) walks the folder (cheap, no pixel data) and returns
   :class:`~meddiff.data.records.Record`s, one per patient-level unit (a BraTS case, an IXI volume,
   a DICOM series, a 2-D image), each with its patient id, label and metadata (e.g. the IXI
   hospital). Partitioning works on this index.
2. :func:`meddiff.data.records.load_record` reads and preprocesses one record into model-ready
   arrays: 2-D slices ``[n, 1, S, S]`` or one volume ``[1, 1, S, S, S]`` in [-1, 1], with labels.

Supported layouts (see the README's "Datasets" section):

- ``medmnist``: a MedMNIST v2 ``.npz``; every image is its own unit (MedMNIST has no patient ids).
- ``brats``: BraTS 2023 case folders ``BraTS-GLI-xxxxx-xxx/BraTS-GLI-xxxxx-xxx-{t1n,t1c,t2w,t2f,seg}.nii.gz``;
  the slice label is 1 where ``seg`` has tumour.
- ``ixi``: ``IXI<id>-<Guys|HH|IOP>-<n>-<T1|T2|PD>.nii.gz``; the hospital is ``meta["site"]``.
- ``chexpert``: ``train.csv``/``valid.csv`` with a ``Path`` column and finding columns; JPEGs.
- ``covid_ct``: ``CT_COVID/`` (label 1) and ``CT_NonCOVID/`` (label 0) image folders.
- ``lidc``: ``LIDC-IDRI-xxxx/<study>/<series>/*.dcm`` DICOM series, in HU.
- ``folder``: any NIfTI or image files named in a CSV ``path,label[,patient_id][,site][,mask]``; a
  ``mask`` is the image's label map (BraTS labels), read for mask-conditioned synthesis. A CSV
  ``source,target[,label][,patient_id][,site]`` lists translation pairs instead
  (:mod:`meddiff.data.pair_index`).
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path
from typing import Callable, Optional

from configs import DataConfig
from meddiff.data.pair_index import has_pair_columns, index_pair_rows
from meddiff.data.readers import DataError
from meddiff.data.records import NIFTI_SUFFIXES, IndexResult, Record, npz_split

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BRATS_SEQUENCES = ("t1n", "t1c", "t2w", "t2f")
IXI_SEQUENCES = ("T1", "T2", "PD")
IXI_NAME = re.compile(r"^(IXI\d+)-(Guys|HH|IOP)-(\d+)-(T1|T2|PD|MRA|DTI)\.nii(\.gz)?$")


def _is_nifti(p: Path) -> bool:
    return p.name.endswith(NIFTI_SUFFIXES)


def _root(cfg: DataConfig) -> Path:
    if not cfg.path:
        raise DataError(f"data.path is empty: point it at the {cfg.dataset} data (a site sets it with --node-config data-path=...)")
    root = Path(cfg.path)
    if not root.exists():
        raise DataError(f"{root}: dataset path does not exist (data.path)")
    return root


def _problem(result: IndexResult, cfg: DataConfig, message: str) -> None:
    if not cfg.skip_bad:
        raise DataError(message)
    log.warning("skipping: %s", message)
    result.bad.append(message)


# ---------------------------------------------------------------- indexers
def index_medmnist(cfg: DataConfig) -> IndexResult:
    path = _root(cfg)
    labels = npz_split(str(path), cfg.split)[1]
    recs = [
        Record(f"{cfg.split}_{i:06d}", f"{cfg.split}_{i:06d}", int(lab), (str(path),), "npz", {"index": i, "split": cfg.split})
        for i, lab in enumerate(labels)
    ]
    return IndexResult(recs)


def _sequence(cfg: DataConfig, default: str, allowed: tuple[str, ...], what: str) -> str:
    seq = cfg.sequence or default
    if seq not in allowed:
        raise DataError(f"data.sequence={seq!r} is no {what}; choose one of {allowed}")
    return seq


def index_brats(cfg: DataConfig) -> IndexResult:
    root = _root(cfg)
    # a translation study's cases need its source file (the target is checked when paired), not data.sequence's
    seq = cfg.source_sequence if cfg.source_sequence in BRATS_SEQUENCES else _sequence(cfg, "t1c", BRATS_SEQUENCES, "BraTS modality")
    result = IndexResult([])
    cases = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("BraTS"))
    if not cases:
        raise DataError(f"{root}: no BraTS case folders (BraTS-GLI-xxxxx-xxx/) found")
    for case in cases:
        image, seg = case / f"{case.name}-{seq}.nii.gz", case / f"{case.name}-seg.nii.gz"
        missing = [p.name for p in (image, seg) if not p.is_file()]
        if missing:
            _problem(result, cfg, f"{case}: missing modality file(s) {missing}")
            continue
        patient = "-".join(case.name.split("-")[:3])  # BraTS-GLI-xxxxx (timepoints share a patient)
        result.records.append(Record(case.name, patient, 1, (str(image),), "volume", {"seg": str(seg)}))
    return result


def index_ixi(cfg: DataConfig) -> IndexResult:
    root = _root(cfg)
    seq = _sequence(cfg, "T1", IXI_SEQUENCES, "IXI contrast")
    result = IndexResult([])
    for f in sorted(root.rglob("IXI*.nii*")):
        m = IXI_NAME.match(f.name)
        if not m:
            _problem(result, cfg, f"{f}: name does not follow IXI<id>-<Guys|HH|IOP>-<n>-<T1|T2|PD>.nii.gz")
            continue
        if m.group(4) != seq:
            continue
        result.records.append(Record(f.name.split(".nii")[0], m.group(1), 0, (str(f),), "volume", {"site": m.group(2)}))
    if not result.records and not result.bad:
        raise DataError(f"{root}: no IXI {seq} volumes found")
    return result


def _chexpert_label(value: str, policy: str) -> Optional[int]:
    value = (value or "").strip()
    if value == "":
        return 0
    v = float(value)
    if v == -1:
        return {"zeros": 0, "ones": 1, "ignore": None}[policy]
    if v not in (0.0, 1.0):
        raise ValueError(f"unknown label value {value!r}")
    return int(v)


def index_chexpert(cfg: DataConfig) -> IndexResult:
    root = _root(cfg)
    csvs = [root / n for n in ("train.csv", "valid.csv") if (root / n).is_file()]
    if not csvs:
        raise DataError(f"{root}: no train.csv or valid.csv (CheXpert layout)")
    result = IndexResult([])
    for table in csvs:
        with open(table, newline="") as fh:
            reader = csv.DictReader(fh)
            if "Path" not in (reader.fieldnames or []) or cfg.finding not in (reader.fieldnames or []):
                raise DataError(f"{table}: needs columns 'Path' and '{cfg.finding}' (data.finding); has {reader.fieldnames}")
            for row_no, row in enumerate(reader, start=2):
                rel = row["Path"]
                path = _resolve_chexpert(root, rel)
                if path is None:
                    _problem(result, cfg, f"{table}:{row_no}: image {rel!r} not found under {root}")
                    continue
                try:
                    label = _chexpert_label(row[cfg.finding], cfg.uncertain_policy)
                except ValueError as exc:
                    _problem(result, cfg, f"{table}:{row_no}: column '{cfg.finding}': {exc}")
                    continue
                if label is None:
                    continue
                m = re.search(r"(patient\d+)", rel)
                patient = m.group(1) if m else Path(rel).parent.as_posix()
                sid = re.sub(r"[^A-Za-z0-9]+", "_", rel.split("patient", 1)[-1]).strip("_")
                result.records.append(Record(f"{table.stem}_{sid}", patient, label, (str(path),), "image", {}))
    return result


def _resolve_chexpert(root: Path, rel: str) -> Optional[Path]:
    parts = Path(rel).parts
    for cand in (root / rel, root.parent / rel, root.joinpath(*parts[1:]) if len(parts) > 1 else None):
        if cand is not None and cand.is_file():
            return cand
    return None


def index_covid_ct(cfg: DataConfig) -> IndexResult:
    root = _root(cfg)
    result = IndexResult([])
    for folder, label in (("CT_COVID", 1), ("CT_NonCOVID", 0)):
        d = root / folder
        if not d.is_dir():
            raise DataError(f"{root}: missing folder {folder}/ (COVID-CT layout)")
        for f in sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            # Slices of one scan share a name stem up to a trailing slice number.
            patient = re.sub(r"[\s_%-]*\(?\d+\)?$", "", f.stem) or f.stem
            result.records.append(Record(f"{folder}/{f.name}", f"{folder}/{patient}", label, (str(f),), "image", {}))
    if not result.records:
        raise DataError(f"{root}: CT_COVID/ and CT_NonCOVID/ hold no PNG or JPEG images")
    return result


def index_lidc(cfg: DataConfig) -> IndexResult:
    root = _root(cfg)
    result = IndexResult([])
    series = sorted({p.parent for p in root.rglob("*.dcm")})
    if not series:
        raise DataError(f"{root}: no DICOM (.dcm) series found (LIDC-IDRI layout)")
    labels = _labels_from_csv(cfg, result) if cfg.labels_csv else {}
    for s in series:
        rel = s.relative_to(root)
        patient = rel.parts[0] if len(rel.parts) > 1 else s.name
        sid = rel.as_posix()
        result.records.append(Record(sid, patient, int(labels.get(sid, labels.get(patient, (0,)))[0]), (str(s),), "dicom", {}))
    return result


def _labels_from_csv(cfg: DataConfig, result: IndexResult) -> dict[str, tuple]:
    """``{path: (label, patient_id, site, row, mask)}``; a row with an unusable label is a problem of
    ``result`` (an error, or with ``data.skip_bad`` a logged, counted skip)."""
    if not cfg.labels_csv:
        raise DataError(f"data.labels_csv is empty: data.dataset={cfg.dataset!r} needs a CSV of path,label[,patient_id][,site]")
    table = Path(cfg.labels_csv)
    if not table.is_file():
        raise DataError(f"{table}: labels CSV not found (data.labels_csv)")
    out = {}
    with open(table, newline="") as fh:
        reader = csv.DictReader(fh)
        if not {"path", "label"} <= set(reader.fieldnames or []):
            raise DataError(f"{table}: needs columns 'path' and 'label'; has {reader.fieldnames}")
        for row_no, row in enumerate(reader, start=2):
            try:
                label = int(row["label"])
            except (TypeError, ValueError):
                _problem(result, cfg, f"{table}:{row_no}: unknown label value {row['label']!r} (expected an integer)")
                continue
            out[row["path"]] = (label, row.get("patient_id") or "", row.get("site") or "", row_no, row.get("mask") or "")
    return out


def index_folder(cfg: DataConfig) -> IndexResult:
    root = _root(cfg)
    table = Path(cfg.labels_csv)
    result = IndexResult([])
    if table.is_file() and has_pair_columns(table):  # translation pairs: source,target[,label][,patient_id][,site]
        result.records.extend(index_pair_rows(table, root, lambda message: _problem(result, cfg, message)))
        return result
    for rel, (label, patient, site, row_no, mask) in _labels_from_csv(cfg, result).items():
        f = root / rel
        if not f.is_file():
            _problem(result, cfg, f"{table}:{row_no}: file {rel!r} not found under {root}")
            continue
        if _is_nifti(f):
            kind = "volume"
        elif f.suffix.lower() in IMAGE_SUFFIXES:
            kind = "image"
        else:
            _problem(result, cfg, f"{table}:{row_no}: {rel!r} is neither NIfTI nor PNG/JPEG")
            continue
        meta = {"site": site} if site else {}
        if mask:
            problem = _mask_problem(root / mask, kind)
            if problem:
                _problem(result, cfg, f"{table}:{row_no}: mask {mask!r} {problem}")
                continue
            meta.update(mask=str(root / mask), row=f"{table}:{row_no}")
        result.records.append(Record(rel, patient or rel, label, (str(f),), kind, meta))
    if not result.records and not result.bad:
        raise DataError(f"{table}: lists no files")
    return result


def _mask_problem(path: Path, kind: str) -> str:
    """Why a folder CSV's mask file cannot go with an image of ``kind`` ('' when it can)."""
    if not path.is_file():
        return f"not found ({path})"
    if kind == "volume" and not _is_nifti(path):
        return "must be a NIfTI label map, as its image is a volume"
    if kind == "image" and path.suffix.lower() not in (".png", ".npy"):
        return "must be a PNG or NPY label map, as its image is 2-D"
    return ""


INDEXERS: dict[str, Callable[[DataConfig], IndexResult]] = {
    "medmnist": index_medmnist,
    "brats": index_brats,
    "ixi": index_ixi,
    "chexpert": index_chexpert,
    "covid_ct": index_covid_ct,
    "lidc": index_lidc,
    "folder": index_folder,
}


def index_dataset(cfg: DataConfig) -> IndexResult:
    """Index the dataset named by ``cfg.dataset``; errors name the file and the problem."""
    if cfg.dataset not in INDEXERS:
        raise DataError(f"data.dataset={cfg.dataset!r} has no folder adapter; choose one of {sorted(INDEXERS)}")
    result = INDEXERS[cfg.dataset](cfg)
    if not result.records:
        raise DataError(f"{cfg.path}: no usable items ({len(result.bad)} skipped as bad)")
    return result
