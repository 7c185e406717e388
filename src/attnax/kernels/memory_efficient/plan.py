"""Static plumbing of memory_efficient_attention: the call's configuration, tile sizes, padding
and the per-tile block classes that decide which tiles the loops visit."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..._mods import (
    BLOCK_EMPTY,
    BLOCK_FULL,
    block_sparsity,
    block_sparsity_from_mask,
)

NAME = "memory_efficient_attention"

# The operands of one call as the custom_vjp sees them: query, key, value, mask, the mask
# mod's array leaves, the value mod's array leaves and the dropout key.
Operands = tuple[
    jax.Array,
    jax.Array,
    jax.Array,
    jax.Array | None,
    tuple[jax.Array, ...],
    tuple[jax.Array, ...],
    jax.Array | None,
]


# --------------------------------------------------------------------------- static plumbing


@dataclasses.dataclass(frozen=True)
class Partitioned:
    """A pytree split into its array leaves (traced) and everything else (static, hashable)."""

    treedef: Any
    is_array: tuple[bool, ...]
    static_leaves: tuple[Any, ...]

    def rebuild(self, arrays: tuple[jax.Array, ...]) -> Any:
        array_iter = iter(arrays)
        static_iter = iter(self.static_leaves)
        leaves = [next(array_iter) if flag else next(static_iter) for flag in self.is_array]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def partition(tree: Any) -> tuple[tuple[jax.Array, ...], Partitioned]:
    """Arrays become traced arguments; Python leaves (ints, plain callables) stay static."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    is_array = tuple(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves)
    arrays = tuple(jnp.asarray(leaf) for leaf, flag in zip(leaves, is_array) if flag)
    static = tuple(leaf for leaf, flag in zip(leaves, is_array) if not flag)
    return arrays, Partitioned(treedef, is_array, static)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything static about one call (hashable: a ``jax.jit`` static argument)."""

    scale: float
    seq_q: int
    seq_kv: int
    block_q: int
    block_kv: int
    dropout_rate: float
    mask_mod: Partitioned
    value_mod: Partitioned
    has_mask_mod: bool
    has_value_mod: bool

    @property
    def num_q_blocks(self) -> int:
        return -(-self.seq_q // self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.seq_kv // self.block_kv)

    @property
    def padded_q(self) -> int:
        return self.num_q_blocks * self.block_q

    @property
    def padded_kv(self) -> int:
        return self.num_kv_blocks * self.block_kv


def fit_block(length: int, block_size: int) -> int:
    """The smallest tile <= ``block_size`` covering ``length`` in the same number of tiles.

    Rounded up to a multiple of 8 where that stays within ``block_size`` (friendlier matmul
    shapes); this keeps padding below one tile's worth of 8 rows instead of up to a whole tile.
    """
    num_blocks = -(-length // block_size)
    block = -(-length // num_blocks)
    rounded = -(-block // 8) * 8
    return rounded if rounded <= block_size else block


def is_float(x: jax.Array) -> bool:
    return bool(jnp.issubdtype(x.dtype, jnp.inexact))


def zero_cotangent(x: jax.Array) -> Any:
    """The cotangent of a non-differentiable input (float0 for integers, bools and keys)."""
    if is_float(x):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


# --------------------------------------------------------------------------- padding


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The traced, padded operands one tile needs (built once per pass)."""

    query: jax.Array  # (B, Hk, G, Tp, D)
    key: jax.Array  # (B, Hk, Sp, D)
    value: jax.Array  # (B, Hk, Sp, D)
    mask: jax.Array | None  # (#B, #H, Tp or 1, Sp or 1), padded with False
    mask_leaves: tuple[jax.Array, ...]
    dropout_rng: jax.Array | None


def pad_axis(
    x: jax.Array, axis: int, target: int, value: Any = 0, *, broadcast: bool = False
) -> jax.Array:
    """Pad ``axis`` to ``target``; with ``broadcast`` a size-1 axis (a mask's) stays as it is.

    Only masks broadcast: a query or key of length 1 is padded like any other (its tile is 8
    rows), or the tiles would be sliced past its end."""
    if x.shape[axis] == target or (broadcast and x.shape[axis] == 1):
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, target - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def prepare(
    config: Config,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    mask_leaves: tuple[jax.Array, ...],
    dropout_rng: jax.Array | None,
) -> Inputs:
    batch, num_heads, _, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    grouped = query.reshape(batch, num_kv_heads, group, config.seq_q, head_dim)
    padded_mask = None
    if mask is not None:
        padded_mask = pad_axis(
            pad_axis(mask, 2, config.padded_q, False, broadcast=True),
            3,
            config.padded_kv,
            False,
            broadcast=True,
        )
    return Inputs(
        query=pad_axis(grouped, 3, config.padded_q),
        key=pad_axis(key, 2, config.padded_kv),
        value=pad_axis(value, 2, config.padded_kv),
        mask=padded_mask,
        mask_leaves=mask_leaves,
        dropout_rng=dropout_rng,
    )


# --------------------------------------------------------------------------- block classes


def block_classes(
    config: Config,
    batch: int,
    num_heads: int,
    mask: jax.Array | None,
    mask_leaves: tuple[jax.Array, ...],
) -> jax.Array:
    """(NQ, NK) tile classes, reduced over batch and heads (a tile is processed for all)."""
    shape = (config.num_q_blocks, config.num_kv_blocks)
    classes = jnp.full((1, 1, *shape), BLOCK_FULL, jnp.int8)
    common = {
        "block_q": config.block_q,
        "block_kv": config.block_kv,
        "seq_q": config.seq_q,
        "seq_kv": config.seq_kv,
    }
    if config.has_mask_mod:
        mask_mod = config.mask_mod.rebuild(mask_leaves)
        classes = jnp.minimum(
            classes, block_sparsity(mask_mod, batch=batch, num_heads=num_heads, **common)
        )
    if mask is not None:
        classes = jnp.minimum(classes, block_sparsity_from_mask(mask, **common))
    lowest = jnp.min(classes, axis=(0, 1))
    highest = jnp.max(classes, axis=(0, 1))
    return jnp.where(
        highest == BLOCK_EMPTY, BLOCK_EMPTY, jnp.where(lowest == BLOCK_FULL, BLOCK_FULL, 1)
    ).astype(jnp.int32)


def visit_range(nonempty: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First and one-past-last True along the last axis (0, 0 when there is none)."""
    count = nonempty.shape[-1]
    positions = jnp.arange(count)
    first = jnp.min(jnp.where(nonempty, positions, count), axis=-1)
    last = jnp.max(jnp.where(nonempty, positions + 1, 0), axis=-1)
    return jnp.minimum(first, last), last
