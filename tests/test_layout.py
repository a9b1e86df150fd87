"""The layout docs/layout.md describes: the import contracts (``lint-imports``) cover every
module of the method, and every top-level folder and package is named on that page."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EDGE = ("labeler.jobs", "labeler.commands")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
    return found


def test_the_import_contract_names_every_module_of_the_method():
    """``lint-imports`` (run by CI) checks the method's modules listed in pyproject.toml: a new
    module of the core must join that list, or the contract would not look at it."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    contracts = config["tool"]["importlinter"]["contracts"]
    method = next(c for c in contracts if c["type"] == "forbidden")
    children = {
        f"labeler.{path.stem if path.is_file() else path.name}"
        for path in (ROOT / "labeler").iterdir()
        if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").exists()
    }
    assert set(method["source_modules"]) == children - {"labeler.jobs", "labeler.commands"}
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    assert layers == ["labeler.commands", "ml_backend", "labeler.jobs", "exporters"]


def test_the_layout_page_names_every_top_level_folder():
    layout = (ROOT / "docs" / "layout.md").read_text(encoding="utf-8")
    folders = [
        p.name
        for p in ROOT.iterdir()
        if p.is_dir() and not p.name.startswith(".") and not p.name.endswith(".egg-info")
    ]
    tracked = [name for name in folders if name not in ("out", "build", "dist", "site")]
    missing = [name for name in tracked if f"{name}/" not in layout]
    assert missing == []
    for package in ("labeler/jobs/", "labeler/commands/"):
        assert package in layout
