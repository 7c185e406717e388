"""mypy --strict proves the downstream typing files: one clean, one whose every misuse is caught."""

from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_downstream_files_type_check() -> None:
    files = [str(ROOT / "tests" / "typing" / name) for name in ("downstream_ok.py", "downstream_misuse.py")]
    stdout, stderr, status = mypy_api.run(
        ["--strict", "--warn-unused-ignores", "--config-file", str(ROOT / "pyproject.toml"), *files]
    )
    assert status == 0, stdout + stderr
