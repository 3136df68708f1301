"""The Flower app folder that ``flwr run`` packs into a FAB: the project's packages and its
``pyproject.toml``, nothing else.

``flwr run <folder>`` walks and resolves every file under ``<folder>`` before it filters them by
its include rules; in a checkout that is the virtual environment, ``runs/`` and ``.git``, about 7 s
of each start on a 2-core machine. A staged folder with only the files a FAB keeps (Python,
YAML, TOML, Markdown) gives Flower the same app in milliseconds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
#: the packages ``pyproject.toml`` installs (``[tool.setuptools.packages.find] include``)
PACKAGES = ("configs", "meddiff", "protocol", "privacy", "client", "server", "sim")
KEPT_SUFFIXES = (".py", ".yaml", ".yml", ".toml", ".md", ".json")


def _ignored(folder: str, names: list[str]) -> set[str]:
    return {n for n in names if n == "__pycache__" or ((Path(folder) / n).is_file() and not n.endswith(KEPT_SUFFIXES))}


def stage_app(dest: Path, project: Path = PROJECT) -> Path:
    """Copy the app's packages, ``pyproject.toml`` and top-level documents from ``project`` into
    ``dest`` (created, and must not exist yet); returns ``dest``, ready for ``flwr run <dest>``."""
    dest.mkdir(parents=True)
    for package in PACKAGES:
        shutil.copytree(project / package, dest / package, ignore=_ignored)
    for path in project.iterdir():  # pyproject.toml and the top-level documents, as a FAB keeps them
        if path.is_file() and path.name.endswith(KEPT_SUFFIXES):
            shutil.copy2(path, dest / path.name)
    return dest
