"""The layout the README describes: the pure core does not reach into the jobs or commands, and
every top-level folder and package is in the README's layout section."""

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


def test_the_core_does_not_import_the_jobs_or_the_commands():
    core = [
        path
        for path in (ROOT / "labeler").rglob("*.py")
        if not any(part in ("jobs", "commands") for part in path.relative_to(ROOT).parts)
    ]
    assert len(core) > 20
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in _imports(path) if m.startswith(EDGE))
        for path in core
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_readme_layout_names_every_top_level_folder():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = text[text.index("## Layout") :]
    folders = [
        p.name
        for p in ROOT.iterdir()
        if p.is_dir() and not p.name.startswith(".") and not p.name.endswith(".egg-info")
    ]
    tracked = [name for name in folders if name not in ("out", "build", "dist")]
    missing = [name for name in tracked if f"{name}/" not in layout]
    assert missing == []
    for package in ("labeler/jobs/", "labeler/commands/"):
        assert package in layout
