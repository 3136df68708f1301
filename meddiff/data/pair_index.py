"""Folder CSVs of translation pairs: ``source,target[,label][,patient_id][,site]``.

Each row names one patient's registered source and target scans, each a NIfTI file or a DICOM
series folder, relative to ``data.path``. A row becomes one :class:`Record` whose ``files[0]`` is
the source and ``meta["target"]`` the target, the form :mod:`meddiff.data.paired` reads for
BraTS-layout pairs too. Whether both share one grid is checked when they are read.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

from meddiff.data.readers import DataError
from meddiff.data.records import NIFTI_SUFFIXES, Record

PAIR_COLUMNS = ("source", "target")


def has_pair_columns(table: Path) -> bool:
    """Whether the CSV ``table`` lists translation pairs (``source`` and ``target`` columns)."""
    with open(table, newline="") as fh:
        return set(PAIR_COLUMNS) <= set(csv.DictReader(fh).fieldnames or [])


def _scan_problem(path: Path) -> str:
    """Why ``path`` is no scan ('' for a NIfTI file or a folder of a DICOM series)."""
    if path.is_dir():
        return "" if any(p.is_file() and not p.name.startswith(".") for p in path.iterdir()) else "is an empty folder"
    if not path.exists():
        return "not found"
    return "" if path.name.endswith(NIFTI_SUFFIXES) else "is neither NIfTI nor a DICOM series folder"


def index_pair_rows(table: Path, root: Path, problem: Callable[[str], None]) -> list[Record]:
    """The pairs of ``table``; a row with a missing or unusable file or label goes to ``problem``
    (which raises, or logs and skips) naming the CSV row and the file."""
    records = []
    with open(table, newline="") as fh:
        for row_no, row in enumerate(csv.DictReader(fh), start=2):
            where = f"{table}:{row_no}"
            bad = []
            for col in PAIR_COLUMNS:
                why = _scan_problem(root / row[col]) if row.get(col) else "is empty"
                if why:
                    bad.append(f"{col} {row.get(col)!r} {why} (under {root})")
            try:
                label = int(row.get("label") or 0)
            except ValueError:
                bad.append(f"unknown label value {row['label']!r} (expected an integer)")
            if bad:
                problem(f"{where}: " + "; ".join(bad))
                continue
            source, target = root / row["source"], root / row["target"]
            meta = {"target": str(target), "row": where, **({"site": row["site"]} if row.get("site") else {})}
            records.append(Record(row["source"], row.get("patient_id") or row["source"], label, (str(source),),
                                  "dicom" if source.is_dir() else "volume", meta))
    if not records:
        raise DataError(f"{table}: lists no usable (source, target) pairs")
    return records
