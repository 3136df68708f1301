"""The staged app folder that ``flwr run`` packs holds the same app as the whole checkout."""

import io
import tomllib
import zipfile

from flwr.cli.build import build_fab_from_disk

from sim.app_bundle import PACKAGES, PROJECT, stage_app


def _fab_files(folder) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(folder))) as fab:
        return {n: fab.read(n) for n in fab.namelist() if n != ".info/CONTENT"}


def test_packages_are_the_ones_pyproject_installs():
    include = tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(p.rstrip("*") for p in include) == sorted(PACKAGES)


def test_staged_app_builds_the_projects_fab_without_tests_and_tools(tmp_path):
    staged = stage_app(tmp_path / "app")
    assert not list(staged.rglob("__pycache__"))
    ours, whole = _fab_files(staged), _fab_files(PROJECT)
    app_files = {n: b for n, b in whole.items() if n.split("/")[0] in PACKAGES or "/" not in n}
    assert ours == app_files  # byte for byte, pyproject.toml included
    assert "server/server_app.py" in ours and "configs/default.yaml" in ours
