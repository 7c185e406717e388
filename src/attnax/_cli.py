"""The ``attnax`` command line: ``demo``, ``spec schema``, ``spec check FILE``, ``bench``."""

import argparse
import importlib.resources
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

import attnax
from attnax._bench import add_bench_arguments, run_bench

__all__ = ["main"]


def _bundled_spec_text() -> str:
    return (importlib.resources.files("attnax") / "_data" / "demo_spec.json").read_text()


def _print_validation_error(console: Console, source: str, error: ValidationError) -> None:
    console.print(f"[bold red]invalid spec[/] {source}: {error.error_count()} error(s)")
    for detail in error.errors():
        location = ".".join(str(part) for part in detail["loc"]) or "(spec)"
        console.print(f"  [yellow]{location}[/]: {detail['msg']}")


def _load_spec(console: Console, path: str | None) -> attnax.AttentionSpec | None:
    source = "bundled demo spec" if path is None else path
    try:
        text = _bundled_spec_text() if path is None else Path(path).read_text()
    except OSError as error:
        console.print(f"[bold red]cannot read[/] {source}: {error}")
        return None
    try:
        return attnax.AttentionSpec.model_validate_json(text)
    except ValidationError as error:
        _print_validation_error(console, source, error)
        return None


def _time_call(
    fn: Callable[..., jax.Array], *args: object, repeats: int = 5
) -> tuple[jax.Array, float]:
    out = fn(*args)
    out.block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        out.block_until_ready()
        times.append(time.perf_counter() - start)
    return out, float(np.median(times))


def _demo(args: argparse.Namespace) -> int:
    console = Console()
    spec = _load_spec(console, args.spec)
    if spec is None:
        return 2
    x = jax.random.normal(jax.random.key(args.seed), (args.batch, args.seq, spec.in_features))
    console.print(
        f"attnax demo on [bold]{jax.devices()[0].device_kind}[/] (jax {jax.__version__}): "
        f"{spec.num_heads} heads over {spec.resolved_num_kv_heads} KV heads, head_dim "
        f"{spec.head_dim}, input {tuple(x.shape)}"
    )

    def run_layer(layer: attnax.MultiHeadAttention, inputs: jax.Array) -> jax.Array:
        return layer(inputs, deterministic=True)

    reference_spec = spec.model_copy(update={"attention_type": attnax.AttentionType.STANDARD})
    with jax.default_matmul_precision("highest"):
        reference_layer = attnax.MultiHeadAttention.from_spec(
            reference_spec, rngs=nnx.Rngs(args.seed)
        )
        reference = np.asarray(run_layer(reference_layer, x), np.float64)

    table = Table(title="attnax backends against the standard reference (highest precision)")
    for column in ("backend", "max |error|", "time (ms)", "note"):
        table.add_column(column)
    for backend in attnax.AttentionType:
        backend_spec = spec.model_copy(update={"attention_type": backend})
        try:
            # Same seed, same parameter order: every backend gets the reference's projections.
            backend_spec = attnax.AttentionSpec.model_validate(backend_spec.model_dump())
            layer = attnax.MultiHeadAttention.from_spec(backend_spec, rngs=nnx.Rngs(args.seed))
            out, seconds = _time_call(nnx.jit(run_layer), layer, x)
        except ValidationError as error:
            table.add_row(backend.value, "-", "-", f"not for this spec: {error.errors()[0]['msg']}")
            continue
        except NotImplementedError as error:
            table.add_row(backend.value, "-", "-", f"unavailable: {str(error).splitlines()[0]}")
            continue
        if backend.is_softmax:
            error_text = f"{float(np.max(np.abs(np.asarray(out, np.float64) - reference))):.2e}"
            note = ""
        else:
            error_text = "-"
            note = "not softmax attention: no reference"
        table.add_row(backend.value, error_text, f"{seconds * 1e3:.2f}", note)
    console.print(table)
    return 0


def _spec_schema(args: argparse.Namespace) -> int:
    text = json.dumps(attnax.AttentionSpec.model_json_schema(), indent=2) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
    return 0


def _spec_check(args: argparse.Namespace) -> int:
    console = Console()
    failures = 0
    for path in args.files:
        spec = _load_spec(console, path)
        if spec is None:
            failures += 1
        else:
            console.print(f"[green]valid[/] {path}")
    return 2 if failures else 0


def _bench(args: argparse.Namespace) -> int:
    return run_bench(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnax", description=attnax.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run every backend on random input against the reference")
    demo.add_argument("--spec", help="an AttentionSpec JSON file (default: the bundled demo spec)")
    demo.add_argument("--batch", type=int, default=2)
    demo.add_argument("--seq", type=int, default=128)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_demo)

    spec = commands.add_parser("spec", help="the AttentionSpec schema and validation")
    spec_commands = spec.add_subparsers(dest="spec_command", required=True)
    schema = spec_commands.add_parser("schema", help="print the JSON Schema")
    schema.add_argument("--out", help="write to this file instead of stdout")
    schema.set_defaults(handler=_spec_schema)
    check = spec_commands.add_parser("check", help="validate spec files (exit 2 if any is invalid)")
    check.add_argument("files", nargs="+")
    check.set_defaults(handler=_spec_check)

    bench = commands.add_parser(
        "bench", help="time backends x sequence lengths x masks on this device (table, JSON, plot)"
    )
    add_bench_arguments(bench)
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``attnax`` console script."""
    args = _parser().parse_args(argv)
    handler = args.handler
    result: int = handler(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
