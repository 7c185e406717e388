"""``attnax bench``: a tiny sweep on CPU (rows, JSON, plot) and its argument errors (exit 2)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from attnax import AttentionType
from attnax._cli import main

TINY = ["bench", "--seq", "32,64", "--heads", "2", "--head-dim", "16", "--repeats", "1"]
SOFTMAX = {"standard", "memory_efficient", "flash", "pallas_flash"}


def test_bench_sweeps_every_backend_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "b.json"
    # The plot is drawn only where the `plot` extra (matplotlib) is installed.
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    plot = ["--plot", str(tmp_path / "b.png")] if has_matplotlib else []
    assert main([*TINY, "--out", str(out), *plot]) == 0
    printed = capsys.readouterr().out
    assert "TFLOP/s" in printed and "max |error|" in printed

    report = json.loads(out.read_text())
    assert report["device"] and report["jax_version"]
    rows = report["rows"]
    cells = {(row["backend"], row["seq"], row["case"]) for row in rows}
    assert cells == {
        (backend.value, seq, case)
        for backend in AttentionType
        for seq in (32, 64)
        for case in ("full", "causal", "alibi+causal")
    }
    for row in rows:
        assert (row["batch"], row["heads"], row["head_dim"]) == (1, 2, 16)
        assert row["dtype"] == "float32" and row["passes"] == "forward"
        skipped = (row["backend"] == "linear" and row["case"] != "causal") or (
            row["backend"] == "lite" and row["case"] == "alibi+causal"
        )
        if skipped:
            assert row["status"] == "skipped" and row["note"], row
            continue
        assert row["status"] == "ok", row
        assert row["ms"] > 0 and row["tflops"] > 0
        if row["backend"] in SOFTMAX:
            assert row["max_error"] < 1e-5, row
        else:
            assert row["max_error"] is None
    # Causal work is half of full work at the same length: the FLOP count behind TFLOP/s.
    full = next(r for r in rows if (r["backend"], r["seq"], r["case"]) == ("standard", 64, "full"))
    causal = next(
        r for r in rows if (r["backend"], r["seq"], r["case"]) == ("standard", 64, "causal")
    )
    expected_full = 4 * 1 * 2 * 64 * 64 * 16 / (full["ms"] * 1e-3) / 1e12
    expected_causal = expected_full / 2 * full["ms"] / causal["ms"]
    assert full["tflops"] == pytest.approx(expected_full)
    assert causal["tflops"] == pytest.approx(expected_causal)
    if plot:
        assert (tmp_path / "b.png").read_bytes().startswith(b"\x89PNG")


def test_bench_backward_times_forward_and_backward(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    args = ["bench", "--backends", "memory_efficient", "--seq", "32", "--heads", "2"]
    assert main([*args, "--head-dim", "8", "--repeats", "1", "--backward", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {row["passes"] for row in rows} == {"forward+backward"}
    assert all(row["status"] == "ok" and row["max_error"] < 1e-5 for row in rows)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--backends", "standard,fastest"], "valid backends are: standard, memory_efficient"),
        (["--seq", "128,0"], "between 1 and"),
        (["--seq", "-64"], "between 1 and"),
        (["--seq", str(1 << 30)], "between 1 and"),
        (["--seq", "1k"], "not an integer"),
        (["--heads", "0"], "--heads"),
        (["--repeats", "-1"], "--repeats"),
    ],
)
def test_bench_rejects_bad_arguments_with_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_plot_without_matplotlib_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A None entry in sys.modules makes `import matplotlib` raise ImportError.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main([*TINY, "--plot", str(tmp_path / "b.png")]) == 2
    assert "pip install 'attnax[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()
