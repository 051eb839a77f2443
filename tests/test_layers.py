"""The package's shape: one installed name, every layer folder packaged, imports that run one way.

The repository root is the package `candlekeeper`; each top-level folder is one layer. A module may
import from its own layer and the layers below it, never from one above, and the runtime reaches the
simulator only lazily (inside a function, behind `--simulate`).
"""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["supervisors", "resilience", "actors", "app", "surfaces"]  # bottom up
RANK = {name: i for i, name in enumerate(LAYERS)}


def _setup() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _package_folders() -> set[str]:
    out = set()
    for init in ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if (rel.parts and rel.parts[0] in ("tests", "bench", "examples", "build")) or rel.parts[:1] == (".venv",):
            continue
        if any(part.startswith(".") for part in rel.parts):
            continue
        out.add(".".join(("candlekeeper", *rel.parts)))
    return out


def test_every_package_folder_is_installed_under_one_name() -> None:
    cfg = _setup()
    listed = set(cfg["options"]["packages"].split())
    assert listed == _package_folders()
    assert all(p == "candlekeeper" or p.startswith("candlekeeper.") for p in listed)
    assert "py_modules" not in cfg["options"], "nothing generic beside the package"
    assert cfg["options.entry_points"]["console_scripts"].strip() == "candlekeeper = candlekeeper.surfaces.cli:main"


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level folder imported, at module level?) for each relative import of `path`."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    module_parts = path.relative_to(ROOT).with_suffix("").parts
    package = module_parts[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = [*base, *(node.module.split(".") if node.module else [])]
            if target:
                out.append((target[0], id(node) in top_level))
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for name in names:
                if name and name.startswith("candlekeeper."):
                    out.append((name.split(".")[1], id(node) in top_level))
    return out


def test_layers_import_one_way() -> None:
    wrong = []
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            for target, at_top in _imports(path):
                if target == "simulator":
                    if at_top or layer != "surfaces":
                        wrong.append(f"{path.relative_to(ROOT)} imports the simulator (only lazily, from surfaces)")
                elif target in RANK and RANK[target] > RANK[layer]:
                    wrong.append(f"{path.relative_to(ROOT)} ({layer}) imports {target}, a higher layer")
    assert not wrong, "\n".join(wrong)


def test_the_simulator_stays_test_support() -> None:
    """The simulator may use the layers (it drives the real ccxt client as the daemon builds it),
    but nothing of the runtime imports it at module level (see above)."""
    for path in (ROOT / "simulator").rglob("*.py"):
        for target, _ in _imports(path):
            assert target in RANK or target == "simulator", f"{path}: imports {target}"
