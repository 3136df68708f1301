"""The shape the code keeps: no import cycles, project imports at module level (unless loaded on
demand, with a comment saying why), short files and functions, phases asked rather than named,
and Opacus's wrapping known only to privacy/."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("configs", "meddiff", "protocol", "privacy", "client", "server", "sim")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 300, 60


def _sources():
    for package in PACKAGES:
        yield from sorted((REPO / package).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(tree: ast.Module, modules: set[str]) -> set[str]:
    """Project modules imported at module level (not inside functions or TYPE_CHECKING blocks)."""
    found = set()
    for node in tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_project_modules_import_each_other_without_a_cycle():
    paths = {_module_name(p): p for p in _sources()}
    graph = {m: _module_level_imports(ast.parse(p.read_text()), set(paths)) - {m} for m, p in paths.items()}
    for m in list(graph):  # a module's import also runs its packages' __init__
        graph[m] |= {m.rsplit(".", k)[0] for k in range(1, m.count(".") + 1)} & set(paths) - {m}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                path = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                # a module -> its own package step is Python running the package's __init__ first, not a cycle
                if not any(a.startswith(b + ".") for a, b in zip(path, path[1:])):
                    cycles.append(" -> ".join(path))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_project_imports_inside_functions_say_why():
    offenders = []
    pattern = re.compile(r"^\s+(from|import) (" + "|".join(PACKAGES) + r")\b")
    for path in _sources():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if not pattern.match(line) or "#" in line:
                continue
            above = i - 1
            while above > 0 and re.match(r"^\s+(from|import) ", lines[above]) and "#" not in lines[above]:
                above -= 1  # one comment may open a block of imports
            if "#" not in lines[above] and "TYPE_CHECKING" not in lines[above]:
                offenders.append(f"{path.relative_to(REPO)}:{i + 1}: {line.strip()}")
    assert not offenders, "project imports inside a function need a comment saying why:\n" + "\n".join(offenders)


def test_files_and_functions_are_short():
    offenders = []
    for path in _sources():
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            offenders.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines")
    assert not offenders, "\n".join(offenders)


def test_no_layer_compares_phase_names():
    names = "autoencoder|diffusion"
    pattern = re.compile(rf"""[!=]= ?["']({names})["']|["']({names})["'] ?[!=]=|in \(["']({names})["']""")
    registry = REPO / "meddiff" / "recipes" / "phases.py"
    offenders = [f"{p.relative_to(REPO)}:{i + 1}" for p in _sources() if p != registry
                 for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert not offenders, "ask the phase object (meddiff.recipes.phases) instead:\n" + "\n".join(offenders)


def test_only_privacy_knows_opacus_wrapping():
    offenders = [str(p.relative_to(REPO)) for p in _sources()
                 if not p.relative_to(REPO).parts[0] == "privacy" and re.search(r"\b_module\b", p.read_text())]
    assert not offenders, offenders


def test_the_core_reads_no_experiment_config():
    """Only meddiff/recipes/ (and the CLI above it) read the whole config; the core takes explicit
    arguments (the data readers take their own section) and never imports the recipes."""
    offenders = []
    for path in sorted((REPO / "meddiff").rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[1] == "recipes" or rel.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and (
                    node.module.startswith("meddiff.recipes") or any(a.name == "ExperimentConfig" for a in node.names)):
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, offenders
