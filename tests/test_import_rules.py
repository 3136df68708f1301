"""Dependencies point one way: configs <- meddiff <- protocol, privacy <- client, server <- sim; and
only protocol/ spells the keys of the messages between server and sites."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import
FORBIDDEN = {
    "configs": {"torch", "flwr", "opacus", "meddiff", "protocol", "privacy", "client", "server", "sim"},
    "meddiff": {"flwr", "opacus", "protocol", "privacy", "client", "server", "sim"},
    "protocol": {"privacy", "client", "server", "sim"},
    "privacy": {"flwr", "protocol", "client", "server", "sim"},
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
from meddiff.recipes.build import build_unet_from_section
from configs import load_config
cfg = load_config()
build_unet_from_section(cfg.model, cfg.data.image_size)
assert not any(k.split('.')[0] in ('flwr', 'opacus') for k in sys.modules)
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


# Message keys and record names that only protocol/ may spell.
WIRE_KEYS = ("site-index", "num-examples", "experiment-config", "study-id", "known-ledgers", "autoencoder-digest",
             "latent-scale", "fid-stats", "feature-stats", "missing-autoencoder", "feature-count", "site-state-root",
             "progress-dir", "central-dp", "server-round", "num-rounds", "want-stats", "total-sq", "install-autoencoder",
             "proximal-mu")
# The same strings where they name something else.
NOT_WIRE = {
    ("client/data.py", "site-index"),  # the deployment's node config: --node-config 'site-index=0'
    ("server/run_state.py", "study-id"),  # a checkpoint's study entry; old checkpoints must still load
}


def test_only_protocol_spells_the_message_keys():
    offenders = []
    for package in ("client", "server"):
        for path in sorted((REPO / package).rglob("*.py")):
            text, name = path.read_text(), str(path.relative_to(REPO))
            for key in WIRE_KEYS:
                if (f'"{key}"' in text or f"'{key}'" in text) and (name, key) not in NOT_WIRE:
                    offenders.append(f"{name} spells {key!r}")
    assert not offenders, "\n".join(offenders)
