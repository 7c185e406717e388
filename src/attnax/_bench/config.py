"""``attnax bench`` settings: the command-line options, their validation and the row type."""

import argparse
import dataclasses
import enum
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import jax

import attnax

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


def bench_config(args: argparse.Namespace) -> BenchConfig:
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
