"""The scripts in examples/ run end to end at a tiny size, each in its own Python process."""

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_train_tiny_lm_then_generate(tmp_path: Path) -> None:
    model = tmp_path / "model.pkl"
    train_args = ["--steps", "30", "--batch", "4", "--seq", "32", "--d-model", "32"]
    printed = _run("train_tiny_lm.py", *train_args, "--layers", "1", "--out", str(model))
    losses = [float(value) for value in re.findall(r"loss (\d+\.\d+)", printed)]
    assert len(losses) >= 3, printed
    assert losses[-1] < losses[0], printed
    assert model.stat().st_size > 0

    generated = _run("generate.py", "--model", str(model), "--prompt", "The ", "--tokens", "8")
    assert generated.startswith("The "), generated
    assert len(generated.rstrip("\n")) > len("The ")


def test_long_context_ring_attention_matches_single_device() -> None:
    printed = _run(
        "long_context.py",
        *("--devices", "4", "--seq", "64", "--d-model", "16", "--heads", "4", "--kv-heads", "2"),
        *("--block-size", "8", "--repeats", "1"),
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )
    match = re.search(r"max \|ring - single device\| = (\S+)", printed)
    assert match is not None, printed
    assert float(match.group(1)) < 1e-5, printed
    assert "over 4 cpu devices" in printed
