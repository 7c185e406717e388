"""The benchmarks' timer: calls dispatched back to back, one wait per sample.

Waiting for every call puts the host's round trip into each figure (a multi-kernel program pays
it once per call), and torch's ``do_bench`` (the Flex and SDPA peers) measures device time; so
every script here queues ``calls`` calls, waits for the last, and divides (benchmarks/NOTES.md,
"Timer change").
"""

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def sample_seconds(fn: Callable[..., Any], args: tuple[Any, ...], calls: int) -> float:
    """Seconds per call of ``calls`` calls dispatched back to back, waiting once for the last."""
    start = time.perf_counter()
    for _ in range(calls):
        result = fn(*args)
    jax.block_until_ready(result)
    return (time.perf_counter() - start) / calls


def median_seconds(
    fn: Callable[..., Any], *args: Any, samples: int = 10, calls: int = 10, warmup: int = 1
) -> float:
    """Median over ``samples`` samples of :func:`sample_seconds`, after ``warmup`` waited calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    return statistics.median(sample_seconds(fn, args, calls) for _ in range(samples))
