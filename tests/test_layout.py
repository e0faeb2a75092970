"""The README's layout list names every module of the package, and only those."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_layout_matches_the_modules() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("### Layout", 1)[1].split("```", 2)[1]
    listed = set(re.findall(r"^  (\S+\.py)\s", block, flags=re.MULTILINE))
    package = ROOT / "dbresilience"
    present = {str(p.relative_to(package)) for p in package.rglob("*.py")}
    assert listed == present, {
        "missing from the README": sorted(present - listed),
        "listed but absent": sorted(listed - present),
    }
