"""The package's layout rules (DEVELOPERS.md): the tree shows the architecture, files stay short."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

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


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _top_level_imports(name: str) -> set[str]:
    """What a module imports when it is imported: its module-level import statements (an import
    inside a function is lazy, with its reason beside it), and its parent packages'."""
    found: set[str] = set()
    for node in ast.parse(MODULES[name].read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {_owner(f) for f in found} | {p for p in parents if p in MODULES}


def _owner(imported: str) -> str:
    """The package's module an imported name lives in, else the outside package's name."""
    parts = imported.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return parts[0]


def _closure(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in MODULES:
            todo.extend(_top_level_imports(current) - seen)
    return seen


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else module


@pytest.mark.parametrize(
    ("layer", "allowed"),
    [
        ("core", {"core"}),  # the detector in plain PyTorch
        ("config", {"config", "core"}),  # the one exit path knows errors by their bases
        ("data", {"data", "config", "core"}),
    ],
)
def test_each_layer_imports_only_the_layers_below_it(layer: str, allowed: set[str]) -> None:
    wrong = {
        f"{name} -> {dep}"
        for name in MODULES
        if _layer(name) == layer
        for dep in _closure(name)
        if dep.startswith("ssd_lightning.") and _layer(dep) not in allowed
    }
    assert not wrong, sorted(wrong)


@pytest.mark.parametrize(
    ("module", "outside"),
    [
        ("ssd_lightning.core", {"lightning", "hydra", "omegaconf"}),
        ("ssd_lightning.predict", {"lightning"}),  # a trained .pt predicts without Lightning
    ],
)
def test_what_a_module_never_pulls_in(module: str, outside: set[str]) -> None:
    names = [m for m in MODULES if m == module or m.startswith(f"{module}.")]
    pulled = {dep for name in names for dep in _closure(name)} & outside
    assert not pulled, pulled
