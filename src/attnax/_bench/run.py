"""``attnax bench``'s entry: validate the arguments, run the sweep, print and write the results."""

import argparse
import importlib

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .config import BenchError, bench_config
from .table import plot_rows, results_table, write_json
from .timing import sweep


# --------------------------------------------------------------------------- entry


def run_bench(args: argparse.Namespace) -> int:
    """Run the sweep described by the parsed ``attnax bench`` arguments.

    Returns:
      0 on success; 2 for a bad argument (unknown backend, bad size) or a missing optional
      dependency, with the reason printed to stderr.
    """
    console = Console()
    errors = Console(stderr=True)
    try:
        config = bench_config(args)
    except BenchError as error:
        errors.print(
            f"[bold red]attnax bench[/]: {escape(str(error))}", highlight=False, soft_wrap=True
        )
        return 2
    if args.plot is not None:
        # Checked before the sweep, so a missing extra does not cost a whole run.
        try:
            importlib.import_module("matplotlib")
        except ImportError:
            errors.print(
                "[bold red]attnax bench[/]: --plot needs matplotlib, which is not installed; "
                "install it with: pip install 'attnax\\[plot]'",
                highlight=False,
                soft_wrap=True,
            )
            return 2
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        rows = sweep(config, progress)
    console.print(results_table(rows, config))
    if args.out is not None:
        write_json(args.out, rows, config)
        console.print(f"wrote {args.out}")
    if args.plot is not None:
        plot_rows(args.plot, rows, config)
        console.print(f"wrote {args.plot}")
    return 0
