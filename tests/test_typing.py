"""The public API's types, as an application sees them (mypy --strict on tests/typing/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent / "typing"


def _mypy(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_user_code_type_checks() -> None:
    result = _mypy(HERE / "user_code.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_misuse_is_caught() -> None:
    result = _mypy(HERE / "misuse.py")
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert result.returncode == 1, result.stdout
    assert len(errors) == 2, errors
    assert "misuse.py:16:" in errors[0] and "[arg-type]" in errors[0]
    assert "misuse.py:23:" in errors[1] and "[arg-type]" in errors[1]
