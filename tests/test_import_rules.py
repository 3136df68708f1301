"""Dependencies point one way: configs <- meddiff <- privacy <- client, server <- sim."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import
FORBIDDEN = {
    "configs": {"torch", "flwr", "opacus", "meddiff", "privacy", "client", "server", "sim"},
    "meddiff": {"flwr", "opacus", "privacy", "client", "server", "sim"},
    "privacy": {"flwr", "client", "server", "sim"},
    "client": {"server", "sim"},
    "server": {"client", "sim"},
}
OPACUS_ALLOWED = {"privacy"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_forbidden_imports(package):
    offenders = []
    for path in sorted((REPO / package).rglob("*.py")):
        bad = _imports(path) & FORBIDDEN[package]
        if "opacus" in _imports(path) and package not in OPACUS_ALLOWED:
            bad.add("opacus")
        if bad:
            offenders.append(f"{path.relative_to(REPO)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_meddiff_and_configs_import_without_flwr_and_opacus():
    code = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('flwr', 'opacus'):
            raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, Block())
import pkgutil, importlib, configs, meddiff
for pkg in (configs, meddiff):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):
        importlib.import_module(m.name)
from meddiff.build import build_model
from configs import load_config
cfg = load_config()
build_model(cfg.model, cfg.data.image_size)
assert not any(k.split('.')[0] in ('flwr', 'opacus') for k in sys.modules)
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
