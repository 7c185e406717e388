"""Validation shared by the caches: concrete-value tests, the overflow check, argument shapes."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jaxtyping import Array, Bool, Int

from .._checks import check_float_inputs, shape_checks_enabled


def is_concrete(*values: Any) -> bool:
    """True when no value is a tracer (eager code, or Python ints under jit)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(values))


def overflow_check(fits: Bool[Array, " B"], capacity: int, requested: Int[Array, " B"]) -> None:
    """A checkify error (only with shape checks on) when a row's write does not fit."""
    if shape_checks_enabled():
        checkify.debug_check(
            jnp.all(fits),
            "KV cache overflow: capacity {capacity} tokens, requested length {requested}; "
            "allocate a larger cache (or more blocks) before appending.",
            capacity=jnp.asarray(capacity, jnp.int32),
            requested=jnp.max(requested),
        )


def check_new_kv(
    keys_new: Array, values_new: Array, *, batch: int, num_kv_heads: int, head_dim: int, name: str
) -> None:
    """Raise ``TypeError`` unless both arrays are floating point (the dtype rule every kernel
    applies) and ``ValueError`` unless both are (batch, kv_heads, T, head_dim) and agree."""
    check_float_inputs(name, keys_new=keys_new, values_new=values_new)
    expected = (batch, num_kv_heads, "T", head_dim)
    for arg, array in (("keys_new", keys_new), ("values_new", values_new)):
        if (
            array.ndim != 4
            or array.shape[0] != batch
            or array.shape[1] != num_kv_heads
            or array.shape[3] != head_dim
        ):
            raise ValueError(
                f"{name}: `{arg}` must have shape (batch, kv_heads, T, head_dim) = {expected} to "
                f"match the cache, got {array.shape}."
            )
    if keys_new.shape != values_new.shape:
        raise ValueError(
            f"{name}: `keys_new` {keys_new.shape} and `values_new` {values_new.shape} differ."
        )


def check_sequence_idx(sequence_idx: int, batch_size: int, name: str) -> int:
    """``sequence_idx`` as an int, after checking it is an int row of a paged cache's table.

    Takes the cache's ``batch_size`` rather than the cache, so this module stays below
    :mod:`attnax._cache.paged` in the import graph.
    """
    if isinstance(sequence_idx, bool) or not isinstance(sequence_idx, (int, np.integer)):
        raise TypeError(f"{name}: `sequence_idx` must be an int, got {sequence_idx!r}.")
    if not 0 <= sequence_idx < batch_size:
        raise ValueError(
            f"{name}: `sequence_idx` {sequence_idx} is out of range for a cache of "
            f"{batch_size} sequences."
        )
    return int(sequence_idx)
