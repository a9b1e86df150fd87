"""The documentation: the MkDocs site builds in strict mode, the README's links land, and the
examples of README.md and docs/*.md run.

Every fenced ``bash`` and ``python`` block is an example of one of three kinds, told by the line
right before its opening fence (docs/development.md says the same for the pages' writers):

- nothing special: the block runs here and must exit 0;
- ``<!-- not-run: REASON -->``: not runnable here (a real Stable Diffusion checkpoint, a
  dataset, a server that runs until stopped, too slow for the suite); the reason is required;
- ``<!-- recipe:NAME -->``: a step of docs/label-studio-recipe.sh, left to
  tests/test_label_studio_cli.py (shown verbatim) and tests/test_labelstudio_recipe.py (run
  against a real Label Studio).

The runnable blocks share one temporary folder that links to the checkout's top-level files and
folders: getting-started.md runs first (its demo job writes ``out/``), then every other page in
``nav`` order, README.md last. Each block runs on its own, in ``bash`` with ``set -euo
pipefail`` or in ``python -``, with ``stableseg`` a shell function that runs the checkout's
cli.py and ``python`` this interpreter. All of it takes about half a minute on 2 CPU cores,
mostly the demo job and the model loads.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .support import ROOT, cli_env

DOCS = ROOT / "docs"
CONFIG = ROOT / "mkdocs.yml"
BLOCK_TIMEOUT = 240  # seconds for one example; the demo job takes about 15 on 2 CPU cores
# How many examples run at the least; lower it only together with the examples themselves.
MIN_RUN = 9

FENCE = re.compile(r"^```(.*)$")
INDENTED_FENCE = re.compile(r"^\s+```")
NOT_RUN = re.compile(r"^<!-- not-run: (\S.*) -->$")
RECIPE_STEP = re.compile(r"^<!-- recipe:[\w-]+ -->$")
EXAMPLES = {"bash", "python"}
# Shell and Python under other tags would slip past the rule above: write them as bash/python.
REFUSED = {"sh", "shell", "zsh", "console", "shell-session", "bash-session", "py", "python3"}
REFUSED |= {"pycon", "ipython"}


@dataclass(frozen=True)
class Block:
    """One fenced block of a Markdown file."""

    page: str  # "README.md" or "docs/NAME.md"
    line: int  # the opening fence's line, from 1
    lang: str
    code: str
    before: str  # the line right before the opening fence

    @property
    def kind(self) -> str:
        """``run``, ``not-run`` or ``recipe`` for an example; ``other`` for any other fence."""
        if self.lang not in EXAMPLES:
            return "other"
        if NOT_RUN.match(self.before):
            return "not-run"
        if RECIPE_STEP.match(self.before):
            return "recipe"
        return "run"

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = path.relative_to(ROOT).as_posix()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j] == "```"), None)
        assert end is not None, f"{page}:{i + 1}: a fence that is never closed"
        code = "".join(line + "\n" for line in lines[i + 1 : end])
        before = lines[i - 1] if i else ""
        blocks.append(Block(page, i + 1, match.group(1).strip(), code, before))
        i = end + 1
    return blocks


class _ConfigLoader(yaml.SafeLoader):
    """mkdocs.yml as plain data: tags such as ``!!python/name:`` (some extensions' settings)
    read as None."""


_ConfigLoader.add_multi_constructor("", lambda loader, suffix, node: None)


def nav_pages() -> list[str]:
    """The pages of mkdocs.yml's nav, in order, as docs/NAME.md."""

    def walk(items: list) -> list[str]:
        found = []
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            found += walk(value) if isinstance(value, list) else [f"docs/{value}"]
        return found

    return walk(yaml.load(CONFIG.read_text(encoding="utf-8"), Loader=_ConfigLoader)["nav"])


FIRST = "docs/getting-started.md"  # its demo job writes out/, which later pages use
PAGES = [FIRST] + [page for page in nav_pages() if page != FIRST] + ["README.md"]
BLOCKS = {page: fenced_blocks(ROOT / page) for page in PAGES}
RUNNABLE = {page: [b for b in blocks if b.kind == "run"] for page, blocks in BLOCKS.items()}


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---------------------------------------------------------------------- the site
@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    built = mkdocs_build(CONFIG, site)
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stdout}{built.stderr}"
    return site


def test_the_site_builds_in_strict_mode_with_every_page_in_nav(site: Path) -> None:
    pages = sorted(p.relative_to(ROOT).as_posix() for p in DOCS.glob("*.md"))
    assert pages == sorted(nav_pages())
    for page in pages:
        name = Path(page).stem
        assert (site / ("index.html" if name == "index" else f"{name}/index.html")).is_file()


def test_strict_mode_fails_on_a_page_outside_nav_a_broken_link_and_a_broken_anchor(
    tmp_path: Path,
) -> None:
    shutil.copy(CONFIG, tmp_path / "mkdocs.yml")
    docs = shutil.copytree(DOCS, tmp_path / "docs")
    (docs / "orphan.md").write_text("# Not in nav\n", encoding="utf-8")
    with (docs / "index.md").open("a", encoding="utf-8") as index:
        index.write("\n[gone](no-such-page.md) and [lost](settings.md#no-such-heading)\n")
    built = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = built.stdout + built.stderr
    assert built.returncode != 0, output
    for name in ("orphan.md", "no-such-page.md", "no-such-heading"):
        assert name in output


def test_the_readme_links_land_on_files_and_anchors_of_the_site(site: Path) -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert len(links) > 20
    broken = []
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        if not (ROOT / path).exists():
            broken.append(link)
        elif anchor:
            assert path.startswith("docs/") and path.endswith(".md"), link
            name = Path(path).stem
            html = site / ("index.html" if name == "index" else f"{name}/index.html")
            if f'id="{anchor}"' not in html.read_text(encoding="utf-8"):
                broken.append(link)
    assert broken == []


# ---------------------------------------------------------------------- the examples
def test_every_example_runs_here_or_says_why_not() -> None:
    problems = []
    pages = {*PAGES, *(p.relative_to(ROOT).as_posix() for p in DOCS.glob("*.md"))}
    for page in sorted(pages):
        path = ROOT / page
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if INDENTED_FENCE.match(line):
                problems.append(f"{page}:{number}: an indented fence (start fences in column 1)")
        for block in fenced_blocks(path):
            if block.lang in REFUSED:
                problems.append(f"{block}: write ```{block.lang} as ```bash or ```python")
            if block.kind == "recipe" and page != "docs/label-studio.md":
                problems.append(f"{block}: recipe steps belong on docs/label-studio.md")
            if block.before.startswith("<!--") and block.kind == "run":
                problems.append(f"{block}: {block.before!r} is neither not-run nor recipe")
    assert problems == []
    kinds = [block.kind for blocks in BLOCKS.values() for block in blocks]
    assert kinds.count("run") >= MIN_RUN
    assert kinds.count("recipe") == 12  # the steps of docs/label-studio-recipe.sh


def test_the_readme_setup_is_the_getting_started_commands() -> None:
    """The README's install, test and demo lines are getting-started.md's three blocks, where
    the demo job runs (the README's block, which also installs, does not)."""
    readme = next(b for b in BLOCKS["README.md"] if b.lang == "bash")
    assert readme.kind == "not-run"
    first_three = [b for b in BLOCKS[FIRST] if b.lang == "bash"][:3]
    assert readme.code == "".join(block.code for block in first_three)
    assert first_three[2].kind == "run"
    assert first_three[2].code.startswith("python cli.py pseudo-label demo/scenes/images")


def _run(block: Block, cwd: Path) -> str:
    """Run one example in ``cwd``; its output. Fails with the block and its output."""
    env = cli_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if block.lang == "bash":
        cli = f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'cli.py'))}"
        script = f'set -euo pipefail\nstableseg() {{ {cli} "$@"; }}\n{block.code}'
        command, stdin = ["bash", "-c", script], None
    else:
        command, stdin = [sys.executable, "-"], block.code
    try:
        done = subprocess.run(
            command,
            input=stdin,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{block} ran past {BLOCK_TIMEOUT} s:\n{block.code}\n{error.output or ''}")
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{block} exited {done.returncode}:\n{block.code}\n{output}"
    return output


def _miou(path: Path) -> float:
    return json.loads(path.read_text(encoding="utf-8"))["mIoU"]


def _check_getting_started(work: Path, output: str) -> None:
    coco = json.loads((work / "out" / "coco.json").read_text(encoding="utf-8"))
    assert len(coco["images"]) == 100
    assert len(list((work / "out" / "masks").glob("*.png"))) == 100
    assert (work / "out" / "preview" / "index.html").is_file()
    assert 60 < _miou(work / "out" / "scores.json") < 90  # about 72
    assert "(64, 64) (4, 64, 64)" in output  # the Python example's shapes


def _check_pseudo_label(work: Path, output: str) -> None:
    assert "already done 100 (of 100)" in output  # the rerun labelled nothing
    assert _miou(work / "toy" / "scores.json") == pytest.approx(25.0)
    assert re.search(r"mIoU\s+100\.00 %", output)


def _check_benchmark(work: Path, output: str) -> None:
    assert 50 < _miou(work / "out" / "table1" / "benchmark.json") < 100
    assert (work / "out" / "table1" / "preview.png").is_file()


def _check_readme(work: Path, output: str) -> None:
    assert re.search(r"mIoU\s+\d+\.\d+ %", output)
    assert 50 < _miou(work / "out" / "benchmark" / "benchmark.json") < 100


CHECKS: dict[str, Callable[[Path, str], None]] = {
    FIRST: _check_getting_started,
    "docs/pseudo-label.md": _check_pseudo_label,
    "docs/benchmark.md": _check_benchmark,
    "README.md": _check_readme,
}


def _run_page(page: str, work: Path) -> None:
    output = "".join(_run(block, work) for block in RUNNABLE[page])
    if page in CHECKS:
        CHECKS[page](work, output)


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that links to the checkout's top-level entries, after getting-started.md's
    examples (the demo job among them) have run in it."""
    work = tmp_path_factory.mktemp("examples")
    skip = {"out", "site", "build", "dist"}
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name in skip or entry.name.endswith(".egg-info"):
            continue
        (work / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    _run_page(FIRST, work)
    return work


@pytest.mark.slow
@pytest.mark.parametrize("page", [page for page in PAGES if RUNNABLE[page]])
def test_the_examples_run(example_dir: Path, page: str) -> None:
    if page != FIRST:  # the fixture ran those
        _run_page(page, example_dir)
