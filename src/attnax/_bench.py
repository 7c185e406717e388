"""``attnax bench``: time every backend over sequence lengths and masks on the current device.

The sweep is backends x sequence lengths x cases, where a case is full attention, causal
attention or ALiBi + causal (a score mod). Each cell is timed as the median of ``--repeats``
calls of a jitted function after one warm-up call (compilation is not timed), with
``block_until_ready`` around every call and fresh random inputs for each (length, case).

Throughput follows the FlashAttention convention: a forward pass counts ``4 B H S^2 D``
floating-point operations, half of that under a causal mask, and forward + backward counts
3.5 times the forward. Linear and lite attention are charged the same softmax-equivalent count,
so their TFLOP/s compare wall time against the softmax backends, not the hardware's work.

The error column is ``max |out - reference|`` where the reference is :func:`standard_attention`
on the same inputs, upcast to float32, at ``precision=HIGHEST`` (forward output only, also
with ``--backward``). Linear and lite attention compute other functions, so they show "-".

The CLI uses attnax's public API only.
"""

import argparse
import dataclasses
import enum
import functools
import importlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import jax
import jax.numpy as jnp
import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import attnax
from attnax._backends import BACKENDS

__all__ = ["BenchRow", "add_bench_arguments", "run_bench"]

_AttentionType = attnax.AttentionType

# Lengths above 2^20 tokens are refused up front: no single-device backend here is meant for
# them, and the sweep would otherwise fail late, with an out-of-memory error.
MAX_SEQ: Final = 1 << 20

_DTYPES: Final = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class _Defaults:
    seqs: tuple[int, ...]
    heads: int
    head_dim: int
    dtype: str
    repeats: int


# GPU: the ANCHORS.md configurations (B4 S4096 and B1 S16384, i.e. batch = 16384 // seq, 16
# heads of 128, bf16, median of 20). CPU: small enough to finish in seconds.
_GPU_DEFAULTS: Final = _Defaults(
    seqs=(4096, 16384), heads=16, head_dim=128, dtype="bfloat16", repeats=20
)
_CPU_DEFAULTS: Final = _Defaults(
    seqs=(128, 256, 512), heads=4, head_dim=64, dtype="float32", repeats=3
)
_GPU_TOKENS_PER_BATCH: Final = 16384

# Reference scores are computed in query chunks of at most this many float32 elements, so a
# long-sequence reference never holds the whole (B, H, T, S) matrix.
_REFERENCE_CHUNK_ELEMENTS: Final = 1 << 28


class Case(str, enum.Enum):
    """The masking configurations every backend is timed on."""

    FULL = "full"
    CAUSAL = "causal"
    ALIBI_CAUSAL = "alibi+causal"

    @property
    def causal(self) -> bool:
        return self is not Case.FULL


class BenchError(ValueError):
    """A bad ``attnax bench`` argument (reported to the user, exit code 2)."""


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Validated sweep settings."""

    backends: tuple[attnax.AttentionType, ...]
    seqs: tuple[int, ...]
    batch: int | None  # None: per-length default (GPU: 16384 // seq, CPU: 1)
    heads: int
    head_dim: int
    dtype: str
    repeats: int
    backward: bool
    seed: int

    def batch_for(self, seq: int) -> int:
        if self.batch is not None:
            return self.batch
        if jax.default_backend() == "gpu":
            return max(1, _GPU_TOKENS_PER_BATCH // seq)
        return 1


@dataclasses.dataclass(frozen=True)
class BenchRow:
    """One cell of the sweep: a backend on one (length, case), timed or with a reason why not.

    ``status`` is "ok", "not_implemented" (the backend raised NotImplementedError; ``note``
    holds its message), or "skipped" (the combination is outside what the backend computes,
    or would not fit in device memory).
    """

    backend: str
    case: str
    seq: int
    batch: int
    heads: int
    head_dim: int
    dtype: str
    passes: str  # "forward" or "forward+backward"
    status: str
    ms: float | None = None
    tflops: float | None = None
    max_error: float | None = None
    note: str = ""


# --------------------------------------------------------------------------- arguments


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser`` (list values are validated in :func:`run_bench`)."""
    valid = ",".join(backend.value for backend in _AttentionType)
    parser.add_argument(
        "--backends", default=None, help=f"comma-separated backends (default: all of {valid})"
    )
    parser.add_argument(
        "--seq",
        default=None,
        help="comma-separated sequence lengths (default: 128,256,512 on CPU; 4096,16384 on GPU)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch size (default: 1 on CPU; 16384 // seq on GPU)",
    )
    parser.add_argument("--heads", type=int, default=None, help="heads (default: 4 CPU, 16 GPU)")
    parser.add_argument(
        "--head-dim", type=int, default=None, help="head dimension (default: 64 CPU, 128 GPU)"
    )
    parser.add_argument(
        "--dtype", choices=_DTYPES, default=None, help="default: float32 on CPU, bfloat16 on GPU"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per cell (default: 3 CPU, 20 GPU)"
    )
    parser.add_argument(
        "--backward", action="store_true", help="time forward + backward instead of forward"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write every row to this JSON file")
    parser.add_argument(
        "--plot", type=Path, default=None, help="draw TFLOP/s against length to this PNG file"
    )


def _parse_backends(text: str | None) -> tuple[attnax.AttentionType, ...]:
    if text is None:
        return tuple(_AttentionType)
    names = [name.strip() for name in text.split(",") if name.strip()]
    valid = {backend.value: backend for backend in _AttentionType}
    unknown = [name for name in names if name not in valid]
    if unknown or not names:
        given = ", ".join(repr(name) for name in unknown) or "(none given)"
        raise BenchError(
            f"--backends: unknown backend(s) {given}; valid backends are: {', '.join(valid)}."
        )
    return tuple(dict.fromkeys(valid[name] for name in names))


def _parse_seqs(text: str | None, default: Sequence[int]) -> tuple[int, ...]:
    if text is None:
        return tuple(default)
    seqs = []
    for part in text.split(","):
        try:
            seq = int(part.strip())
        except ValueError:
            raise BenchError(
                f"--seq: {part.strip()!r} is not an integer; give comma-separated lengths, "
                "e.g. --seq 128,256,512."
            ) from None
        if not 1 <= seq <= MAX_SEQ:
            raise BenchError(
                f"--seq: length {seq} is out of range; each length must be between 1 and "
                f"{MAX_SEQ} tokens."
            )
        seqs.append(seq)
    return tuple(dict.fromkeys(seqs))


def _positive(value: int | None, default: int, option: str) -> int:
    if value is None:
        return default
    if value < 1:
        raise BenchError(f"{option}: must be a positive integer, got {value}.")
    return value


def _config(args: argparse.Namespace) -> BenchConfig:
    defaults = _GPU_DEFAULTS if jax.default_backend() == "gpu" else _CPU_DEFAULTS
    batch = None if args.batch is None else _positive(args.batch, 1, "--batch")
    config = BenchConfig(
        backends=_parse_backends(args.backends),
        seqs=_parse_seqs(args.seq, defaults.seqs),
        batch=batch,
        heads=_positive(args.heads, defaults.heads, "--heads"),
        head_dim=_positive(args.head_dim, defaults.head_dim, "--head-dim"),
        dtype=args.dtype or defaults.dtype,
        repeats=_positive(args.repeats, defaults.repeats, "--repeats"),
        backward=bool(args.backward),
        seed=int(args.seed),
    )
    for seq in config.seqs:
        elements = config.batch_for(seq) * config.heads * seq * config.head_dim
        if elements > 1 << 34:
            raise BenchError(
                f"--seq {seq}: one (batch, heads, seq, head_dim) input would hold {elements:.3g} "
                "elements; lower --seq, --batch, --heads or --head-dim."
            )
    return config


# --------------------------------------------------------------------------- kernels per cell

_Kernel = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _score_mod(case: Case, num_heads: int) -> attnax.ScoreMod | None:
    if case is Case.FULL:
        return None
    if case is Case.CAUSAL:
        return attnax.causal_mod()
    return attnax.compose_score_mods(attnax.alibi_mod(num_heads), attnax.causal_mod())


def _kernel(backend: attnax.AttentionType, case: Case, num_heads: int) -> _Kernel | str:
    """The call timed for ``backend`` on ``case`` (its row's kernel in the backend table), or
    why the combination is not timed."""
    row = BACKENDS[backend]
    score_mod = _score_mod(case, num_heads)
    if row.pair_scores:
        return lambda q, k, v: row.kernel(q, k, v, score_mod=score_mod)
    if row.score_mod_refusal(score_mod) is not None:
        return "no score mods"
    # Without pair scores a causal mask is the kernel's causal form. LINEAR is timed causal
    # only: its non-causal form is a different function with nothing here to compare to.
    if row.attention_type is _AttentionType.LINEAR and not case.causal:
        return "causal only"
    causal = case.causal
    return lambda q, k, v: row.kernel(q, k, v, causal=causal)


def _timed_function(kernel: _Kernel, backward: bool) -> Callable[..., Any]:
    if not backward:
        return jax.jit(kernel)

    def forward_backward(
        q: jax.Array, k: jax.Array, v: jax.Array, cotangent: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        out, pullback = jax.vjp(kernel, q, k, v)
        grads: tuple[jax.Array, ...] = pullback(cotangent)
        return out, grads

    return jax.jit(forward_backward)


def _block(result: Any) -> None:
    for leaf in jax.tree.leaves(result):
        leaf.block_until_ready()


def _median_seconds(fn: Callable[..., Any], args: Sequence[jax.Array], repeats: int) -> float:
    _block(fn(*args))  # warm-up: compiles, not timed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def flops(
    batch: int, heads: int, seq: int, head_dim: int, *, causal: bool, backward: bool
) -> float:
    """FlashAttention's count: 4 B H S^2 D forward, halved when causal, x3.5 with backward."""
    count = 4.0 * batch * heads * seq * seq * head_dim
    if causal:
        count /= 2
    if backward:
        count *= 3.5
    return count


def _quadratic_memory_note(config: BenchConfig, seq: int) -> str | None:
    """Why standard attention at this size would not fit the device, or None when it fits.

    Standard attention materialises float32 (B, H, S, S) scores, their mask and probabilities
    (about three such buffers; five with the backward's saved and recomputed ones); the
    device's memory limit, where JAX reports one, decides. Off GPU JAX reports none.
    """
    stats = jax.devices()[0].memory_stats()
    limit = None if stats is None else stats.get("bytes_limit")
    if not limit:
        return None
    needed = config.batch_for(seq) * config.heads * seq * seq * 4 * (5 if config.backward else 3)
    if needed <= limit // 2:
        return None
    return f"~{needed / 2**30:.0f} GiB of (S, S) scores; device has {limit / 2**30:.0f} GiB"


def _reference(
    q: jax.Array, k: jax.Array, v: jax.Array, score_mod: attnax.ScoreMod | None
) -> np.ndarray:
    """standard_attention in float32 at HIGHEST precision, over query chunks (float64 out)."""
    batch, heads, seq_q, _ = q.shape
    seq_kv = k.shape[2]
    chunk = seq_q
    while batch * heads * chunk * seq_kv > _REFERENCE_CHUNK_ELEMENTS and chunk % 2 == 0:
        chunk //= 2

    @jax.jit
    def attend(q_chunk: jax.Array, offset: jax.Array) -> jax.Array:
        return attnax.standard_attention(
            q_chunk,
            k.astype(jnp.float32),
            v.astype(jnp.float32),
            score_mod=attnax.shift_positions(score_mod, q_offset=offset),
            precision=jax.lax.Precision.HIGHEST,
        )

    parts = []
    for start in range(0, seq_q, chunk):
        offset = jnp.full((batch,), start, jnp.int32)
        part = attend(q[:, :, start : start + chunk].astype(jnp.float32), offset)
        parts.append(np.asarray(part, np.float64))
    return np.concatenate(parts, axis=2)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _platform_note(backend: attnax.AttentionType) -> str:
    # The rows with a fallback hand every call to the memory-efficient kernel off GPU (the
    # table's fallback notes), so their CPU numbers describe that kernel.
    if jax.default_backend() != "gpu" and BACKENDS[backend].fallback is not None:
        return "memory_efficient fallback"
    return ""


def _measure(
    config: BenchConfig,
    backend: attnax.AttentionType,
    case: Case,
    inputs: Sequence[jax.Array],
    reference: Callable[[], np.ndarray],
    template: BenchRow,
) -> BenchRow:
    """Time one backend on one (length, case) and compare its output with the reference."""
    kernel = _kernel(backend, case, config.heads)
    if isinstance(kernel, str):
        return dataclasses.replace(template, status="skipped", note=kernel)
    if backend is _AttentionType.STANDARD:
        memory_note = _quadratic_memory_note(config, template.seq)
        if memory_note is not None:
            return dataclasses.replace(template, status="skipped", note=memory_note)
    timed = _timed_function(kernel, config.backward)
    try:
        seconds = _median_seconds(timed, inputs, config.repeats)
    except NotImplementedError as error:
        return dataclasses.replace(template, status="not_implemented", note=_first_line(error))
    max_error = None
    # Softmax rows are compared with the reference; the others compute different functions.
    if BACKENDS[backend].pair_scores:
        result = timed(*inputs)
        out = np.asarray(result[0] if config.backward else result, np.float64)
        max_error = float(np.max(np.abs(out - reference())))
    work = flops(
        template.batch,
        config.heads,
        template.seq,
        config.head_dim,
        causal=case.causal,
        backward=config.backward,
    )
    return dataclasses.replace(
        template,
        status="ok",
        ms=seconds * 1e3,
        tflops=work / seconds / 1e12,
        max_error=max_error,
        note=_platform_note(backend),
    )


def _sweep(config: BenchConfig, progress: Progress) -> list[BenchRow]:
    cells = [(seq, case) for seq in config.seqs for case in Case]
    task = progress.add_task("bench", total=len(cells) * len(config.backends))
    dtype = jnp.dtype(config.dtype)
    rows: list[BenchRow] = []
    for index, (seq, case) in enumerate(cells):
        batch = config.batch_for(seq)
        # Fresh standard-normal inputs per (length, case): never zeros, never reused tensors.
        keys = jax.random.split(jax.random.key(config.seed + index), 4)
        shape = (batch, config.heads, seq, config.head_dim)
        q, k, v, cotangent = (jax.random.normal(key, shape, dtype) for key in keys)
        inputs = (q, k, v, cotangent) if config.backward else (q, k, v)
        score_mod = _score_mod(case, config.heads)
        # Computed once per (length, case), and only if a softmax backend runs.
        reference = functools.cache(functools.partial(_reference, q, k, v, score_mod))

        for backend in config.backends:
            progress.update(task, description=f"{backend.value:>16} S={seq:<6} {case.value}")
            template = BenchRow(
                backend=backend.value,
                case=case.value,
                seq=seq,
                batch=batch,
                heads=config.heads,
                head_dim=config.head_dim,
                dtype=config.dtype,
                passes="forward+backward" if config.backward else "forward",
                status="pending",
            )
            rows.append(_measure(config, backend, case, inputs, reference, template))
            progress.advance(task)
    return rows


# --------------------------------------------------------------------------- output


def _device_name() -> str:
    device = jax.devices()[0]
    return f"{device.device_kind} ({device.platform})"


def _table(rows: Sequence[BenchRow], config: BenchConfig) -> Table:
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


def _write_json(path: Path, rows: Sequence[BenchRow], config: BenchConfig) -> None:
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


def _plot(path: Path, rows: Sequence[BenchRow], config: BenchConfig) -> None:
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
        config = _config(args)
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
        rows = _sweep(config, progress)
    console.print(_table(rows, config))
    if args.out is not None:
        _write_json(args.out, rows, config)
        console.print(f"wrote {args.out}")
    if args.plot is not None:
        _plot(args.plot, rows, config)
        console.print(f"wrote {args.plot}")
    return 0
