"""The attnax command line: demo, spec schema, spec check (exit codes and output)."""

import json
from pathlib import Path

import pytest

from attnax._cli import main

SPEC_DIR = Path(__file__).resolve().parent.parent / "spec"


def test_spec_schema_prints_the_committed_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["spec", "schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((SPEC_DIR / "attention_spec.schema.json").read_text())


def test_spec_check_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    valid = sorted(str(p) for p in (SPEC_DIR / "examples" / "valid").glob("*.json"))
    assert main(["spec", "check", *valid]) == 0
    invalid = str(SPEC_DIR / "examples" / "invalid" / "num_kv_heads__does_not_divide_heads.json")
    assert main(["spec", "check", invalid]) == 2
    assert "num_kv_heads" in capsys.readouterr().out


def test_demo_runs_every_backend_and_rejects_bad_specs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["demo", "--seq", "16", "--batch", "1"]) == 0
    table = capsys.readouterr().out
    for backend in ("standard", "memory_efficient", "flash", "pallas_flash", "linear", "lite"):
        assert backend in table
    bad = tmp_path / "bad.json"
    bad.write_text('{"num_heads": 3, "in_features": 8}')
    assert main(["demo", "--spec", str(bad)]) == 2
    assert "num_heads" in capsys.readouterr().out
