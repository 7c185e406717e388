"""Timing one sweep: the call each backend is timed with, the reference it is compared with,
and the loop over (length, case, backend)."""

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import jax
import jax.numpy as jnp
import numpy as np
from rich.progress import Progress

import attnax
from attnax._backends import BACKENDS

from .config import BenchConfig, BenchRow, Case


# Reference scores are computed in query chunks of at most this many float32 elements, so a
# long-sequence reference never holds the whole (B, H, T, S) matrix.
_REFERENCE_CHUNK_ELEMENTS: Final = 1 << 28


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
    # Without pair scores a causal mask is the kernel's causal form; a row may be timed causal
    # only (the table says which and why).
    if row.timed_causal_only and not case.causal:
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
    if BACKENDS[backend].dense_scores:
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


def sweep(config: BenchConfig, progress: Progress) -> list[BenchRow]:
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
