"""Documentation links resolve: files exist and #anchors match a heading of the target file.

Code and docs point into docs/design.md by anchor (``docs/design.md#frequency-split``); a
renamed heading would silently break them, so every such reference is checked here, in the
markdown files and in the source.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.paths import REPO

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
#: ``docs/design.md#<anchor>`` written in code, docstrings or prose (not as a markdown link).
DESIGN_REF = re.compile(r"docs/design\.md#([A-Za-z0-9_-]+)")
#: References to the retired numbered design brief (spelled so this file does not match itself).
OLD_REF = re.compile(r"DESIGN(\.md|\s+sections?\b|\s+steps?\b)")
SKIP_DIRS = {".git", "cache", "__pycache__", ".pytest_cache", ".venv", "venv", "node_modules", "build", "dist"}


def markdown_files(repo: Path = REPO) -> list[Path]:
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation removed, spaces -> '-'."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading).strip().lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", text))


def anchors(path: Path) -> set[str]:
    """Anchors of every heading outside code fences, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(path: Path) -> list[str]:
    """Link targets of a markdown file, ignoring code blocks and inline code."""
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    return LINK.findall(text)


def broken_links(path: Path, repo: Path = REPO) -> list[str]:
    """Relative links of ``path`` whose file is missing or whose #anchor is not a heading there."""
    problems = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(repo)}: link {target!r}"
        if not dest.exists():
            problems.append(f"{where}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(repo)}")
    return problems


def repo_text_files(repo: Path = REPO) -> list[Path]:
    """Tracked and untracked-but-not-ignored files (git), else a walk that skips generated folders."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(repo), "ls-files", "-co", "--exclude-standard", "-z"],
            capture_output=True, check=True, timeout=60,
        ).stdout.decode().split("\0")
        files = [repo / name for name in listed if name]
    except (OSError, subprocess.SubprocessError):
        files = [p for p in repo.rglob("*") if not SKIP_DIRS & set(p.relative_to(repo).parts)]
    return [p for p in files if p.is_file() and p.suffix not in {".png", ".jpg", ".bmp", ".parquet", ".sqlite"}]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path: Path) -> None:
    problems = broken_links(path)
    assert not problems, "\n".join(problems)


def test_design_anchors_in_code_resolve() -> None:
    """``docs/design.md#<anchor>`` in any source, docstring or doc names a real heading."""
    design = anchors(REPO / "docs" / "design.md")
    problems, found = [], 0
    for path in repo_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in DESIGN_REF.finditer(text):
            found += 1
            if match.group(1) not in design:
                line = text.count("\n", 0, match.start()) + 1
                problems.append(f"{path.relative_to(REPO)}:{line}: #{match.group(1)} is not a heading of docs/design.md")
    assert found >= 10  # the code does link into the design doc; the scan is not vacuous
    assert not problems, "\n".join(problems)


def test_no_reference_to_the_old_numbered_design() -> None:
    problems = []
    for path in repo_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in OLD_REF.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            problems.append(f"{path.relative_to(REPO)}:{line}: {match.group(0)!r}; link docs/design.md#<section> instead")
    assert not problems, "\n".join(problems)


def test_checker_finds_broken_links(tmp_path: Path) -> None:
    """A missing file, a missing anchor and a heading inside a code fence are all reported."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "d.md").write_text(
        "# Design, as built\n## Frequency split\n## Store schema\n## Store schema\n```\n## Fenced\n```\n"
    )
    (tmp_path / "README.md").write_text(
        "[ok](docs/d.md#frequency-split) [ok2](docs/d.md#design-as-built) [dup](docs/d.md#store-schema-1)\n"
        "[gone](docs/missing.md) [bad](docs/d.md#frequency) [fenced](docs/d.md#fenced) [self](#nothing)\n"
        "`[code](not/checked.md)` [web](https://example.com/x#y)\n"
    )
    problems = broken_links(tmp_path / "README.md", tmp_path)
    assert len(problems) == 4, problems
    assert "missing.md" in problems[0] and "#frequency " in problems[1]
    assert "#fenced" in problems[2] and "#nothing" in problems[3]
    assert slug("`ModelConfig` and *FSAM*: the heads (v2)") == "modelconfig-and-fsam-the-heads-v2"
