"""The package's data-flow order: no module imports, at module level, from a later stage.

The order is documented in docs/design.md#package-layout. Imports inside functions are
allowed (they are how a module reaches a later stage lazily, e.g. the CLI); module-level
ones, including those under ``if``/``try`` at the top level, are not.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.paths import REPO

PACKAGE = REPO / "harmoniad"

#: Stages in data-flow order; a module may import from its own stage or an earlier one.
STAGES = (
    ("runtime", ("harmoniad", "harmoniad.runtime")),
    ("data", ("harmoniad.data",)),
    ("backbone", ("harmoniad.backbone",)),
    ("model", ("harmoniad.model",)),
    ("maps", ("harmoniad.maps",)),
    ("train", ("harmoniad.train",)),
    ("methods", ("harmoniad.methods",)),
    ("metrics", ("harmoniad.metrics", "harmoniad.stats", "harmoniad.thresholds", "harmoniad.analysis",
                 "harmoniad.operating")),
    ("store", ("harmoniad.store",)),
    ("evaluate", ("harmoniad.evaluate",)),
    ("reports", ("harmoniad.charts", "harmoniad.report")),
    ("interfaces", ("harmoniad.cli", "harmoniad.__main__", "harmoniad.demo", "harmoniad.visualize", "dashboard",
                    "pages")),
)


def stage_of(module: str) -> int | None:
    """Index in :data:`STAGES` of a dotted module name (longest prefix wins); None if not ours."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def module_name(path: Path, repo: Path = REPO) -> str:
    parts = list(path.relative_to(repo).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements executed at import time: the module body and its if/try/with blocks."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                pending.extend(getattr(node, field, []) or [])
    return sorted(found, key=lambda node: node.lineno)


def _target(base: str, alias: str) -> str:
    """``from base import alias``: the submodule ``base.alias`` when it belongs to another stage."""
    candidate = f"{base}.{alias}"
    return candidate if stage_of(candidate) != stage_of(base) else base


def imported_modules(path: Path, repo: Path = REPO) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every module-level import in ``path``, relative ones resolved."""
    name = module_name(path, repo)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in _top_level_imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        out += [(node.lineno, _target(base, alias.name)) for alias in node.names]
    return out


def offenders(repo: Path = REPO) -> list[str]:
    """One line per module-level import of a later stage, under ``repo/harmoniad``."""
    problems = []
    for path in sorted((repo / "harmoniad").rglob("*.py")):
        name = module_name(path, repo)
        own = stage_of(name)
        assert own is not None, f"{path}: module {name} has no stage in STAGES; add it"
        for line, target in imported_modules(path, repo):
            theirs = stage_of(target)
            if theirs is not None and theirs > own:
                problems.append(
                    f"{path.relative_to(repo)}:{line}: {name} ({STAGES[own][0]}) imports "
                    f"{target} ({STAGES[theirs][0]}), a later stage"
                )
    return problems


def test_every_stage_names_existing_code() -> None:
    """A renamed or moved module cannot silently drop out of the check."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert len(modules) > 40  # the walk found the package, not an empty folder
    missing = [p for _, prefixes in STAGES for p in prefixes if p.startswith("harmoniad") and p not in modules]
    assert not missing, f"STAGES names modules that do not exist: {missing}"


def test_no_module_imports_from_a_later_stage() -> None:
    problems = offenders()
    print("\n".join(problems))
    assert not problems, "imports against the data-flow order (docs/design.md#package-layout):\n" + "\n".join(problems)


def test_the_check_catches_a_backward_import(tmp_path: Path) -> None:
    """Backward imports at module level are reported, in every spelling; lazy and forward ones are not."""
    model = tmp_path / "harmoniad" / "model"
    model.mkdir(parents=True)
    (tmp_path / "harmoniad" / "__init__.py").write_text('__version__ = "0"\n')
    (model / "__init__.py").write_text("from . import net\n")
    (model / "net.py").write_text(
        "import torch\n"
        "from harmoniad.runtime.device import autocast\n"  # earlier stage: fine
        "from harmoniad import __version__\n"  # the package root: fine
        "from harmoniad.store import ResultStore\n"  # later: reported
        "from harmoniad import evaluate\n"  # later, as a submodule: reported
        "try:\n    from ..methods import base\nexcept ImportError:\n    pass\n"  # relative, in try: reported
        "def lazy():\n    from harmoniad.cli import main\n"  # inside a function: allowed
    )
    found = offenders(tmp_path)
    assert [line.split(": ", 1)[0] for line in found] == [
        "harmoniad/model/net.py:4", "harmoniad/model/net.py:5", "harmoniad/model/net.py:7"
    ], found
    assert "harmoniad.store (store)" in found[0] and "harmoniad.evaluate (evaluate)" in found[1]
    assert "harmoniad.methods (methods)" in found[2]


def test_nothing_patches_sys_path() -> None:
    """The package is installed (pip install -e .); app, pages, benchmarks and tests import it as such."""
    import re

    pattern = re.compile(r"\bsys\.path\s*(\.(insert|append|extend)\b|\[|\+=|=)")
    hits = [
        f"{path.relative_to(REPO)}:{number}"
        for folder in ("harmoniad", "dashboard", "pages", "benchmarks", "tests")
        for path in sorted((REPO / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith("#") and path.name != "test_layout.py"
    ]
    assert hits == []
