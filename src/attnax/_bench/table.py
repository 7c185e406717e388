"""The sweep's outputs: the terminal table, the JSON file and the plot."""

import dataclasses
import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from rich import box
from rich.table import Table

import attnax

from .config import BenchConfig, BenchRow, Case

_AttentionType = attnax.AttentionType


# --------------------------------------------------------------------------- output


def _device_name() -> str:
    device = jax.devices()[0]
    return f"{device.device_kind} ({device.platform})"


def results_table(rows: Sequence[BenchRow], config: BenchConfig) -> Table:
    table = Table(
        title=(
            f"attnax bench on {_device_name()}: {rows[0].passes if rows else 'forward'}, "
            f"H{config.heads} D{config.head_dim} {config.dtype}, median of {config.repeats}"
        ),
        box=box.SIMPLE_HEAD,
        caption=(
            "TFLOP/s: 4·B·H·S²·D per forward, halved when causal, x3.5 with backward. "
            "max |error|: forward output against standard_attention in float32 at HIGHEST "
            "precision."
        ),
    )
    table.add_column("backend", overflow="fold")
    table.add_column("case")
    for column in ("B", "S", "ms", "TFLOP/s", "max |error|"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("note", ratio=1)
    for row in rows:
        if row.status == "ok":
            ms = f"{row.ms:.3f}"
            tflops = f"{row.tflops:.3g}" if row.tflops is not None else "-"
            error = f"{row.max_error:.1e}" if row.max_error is not None else "-"
            note = row.note
        else:
            ms, tflops, error = "-", "-", "-"
            label = "not implemented" if row.status == "not_implemented" else "skipped"
            note = f"[yellow]{label}:[/] {row.note}"
        table.add_row(row.backend, row.case, str(row.batch), str(row.seq), ms, tflops, error, note)
    return table


def write_json(path: Path, rows: Sequence[BenchRow], config: BenchConfig) -> None:
    payload = {
        "device": _device_name(),
        "platform": jax.default_backend(),
        "jax_version": jax.__version__,
        "config": {
            "backends": [backend.value for backend in config.backends],
            "seqs": list(config.seqs),
            "heads": config.heads,
            "head_dim": config.head_dim,
            "dtype": config.dtype,
            "repeats": config.repeats,
            "backward": config.backward,
            "seed": config.seed,
        },
        "rows": [dataclasses.asdict(row) for row in rows],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")


def plot_rows(path: Path, rows: Sequence[BenchRow], config: BenchConfig) -> None:
    # Imported here: matplotlib is the optional ``plot`` extra, checked before the sweep.
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")  # no display needed, and no GUI backend is started
    pyplot = importlib.import_module("matplotlib.pyplot")
    cases = [case for case in Case if any(r.case == case.value for r in rows)]
    figure, axes = pyplot.subplots(
        1, len(cases), figsize=(4.5 * len(cases) + 1.5, 4), sharey=True, squeeze=False
    )
    # One colour per backend across every panel, and one legend for the figure.
    colours = {backend: f"C{index}" for index, backend in enumerate(_AttentionType)}
    handles: dict[str, Any] = {}
    for axis, case in zip(axes[0], cases, strict=True):
        for backend in config.backends:
            points = sorted(
                (row.seq, row.tflops)
                for row in rows
                if row.backend == backend.value and row.case == case.value and row.tflops
            )
            if points:
                seqs, tflops = zip(*points, strict=True)
                (line,) = axis.plot(
                    seqs, tflops, marker="o", color=colours[backend], label=backend.value
                )
                handles.setdefault(backend.value, line)
        axis.set_xscale("log", base=2)
        axis.set_xticks(list(config.seqs), [str(seq) for seq in config.seqs])
        axis.minorticks_off()
        axis.set_title(case.value)
        axis.set_xlabel("sequence length")
        axis.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("TFLOP/s")
    names = [backend.value for backend in config.backends if backend.value in handles]
    figure.legend([handles[name] for name in names], names, loc="center right", fontsize="small")
    passes = rows[0].passes if rows else "forward"
    figure.suptitle(
        f"attnax {passes} on {_device_name()}: H{config.heads} D{config.head_dim} {config.dtype}"
    )
    figure.tight_layout(rect=(0, 0, 1 - 1.6 / (4.5 * len(cases) + 1.5), 1))
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
