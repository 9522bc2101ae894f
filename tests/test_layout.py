"""The package's layout rules (DEVELOPERS.md): the tree shows the architecture, files stay short."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "ssd_lightning"
LAYERS = {"core", "data", "training", "config", "tools"}
ENTRY_POINTS = {
    "__init__.py",
    "train.py",
    "evaluate.py",
    "predict.py",
    "export.py",
    "anchors.py",
    "summarize.py",
    "benchmark.py",
    "visualize.py",
}
MAX_LINES = 330  # "~300"
# one concept each that reads better whole; DEVELOPERS.md says why
LONG_FILES = {
    "visualize.py",
    "training/lit_module.py",
    "tools/summarize.py",
    "training/callbacks.py",
}


def test_only_the_entry_points_and_the_layers_at_the_top() -> None:
    top = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert top - ENTRY_POINTS - LAYERS == set()


def test_files_stay_short_or_are_named_in_developers_md() -> None:
    developers = (ROOT / "DEVELOPERS.md").read_text()
    too_long = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if len(path.read_text().splitlines()) > MAX_LINES
    }
    unexplained = too_long - LONG_FILES
    assert not unexplained, f"split them, or say why in DEVELOPERS.md: {unexplained}"
    for name in LONG_FILES:
        assert f"`{name}`" in developers


def test_the_long_files_named_are_long() -> None:
    # a file split since stays off the list, so the list (and DEVELOPERS.md) says what is long
    short = {
        name for name in LONG_FILES if len((PACKAGE / name).read_text().splitlines()) <= MAX_LINES
    }
    assert not short, f"no longer over {MAX_LINES} lines: take them off LONG_FILES: {short}"


def _layout_block() -> str:
    developers = (ROOT / "DEVELOPERS.md").read_text()
    start = developers.index("## Layout")
    return developers[start : developers.index("\n## ", start + 1)]


def test_developers_md_layout_names_every_file_and_only_files_that_exist() -> None:
    layout = _layout_block()
    missing = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" and not re.search(rf"\b{path.stem}\b", layout)
    }
    assert not missing, f"not in DEVELOPERS.md's layout: {missing}"
    named = set(re.findall(r"\b([a-z_]+\.py)\b", layout))
    existing = {p.name for d in (PACKAGE, ROOT / "tests") for p in d.rglob("*.py")}
    assert named - existing == set(), "DEVELOPERS.md names files that do not exist"
