"""What the Triton kernels share inside a program: the tile the mods see, the float32
products, the walk over a row's blocks and the online softmax's last step."""

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = [
    "LOG2E",
    "Tile",
    "dot_nn",
    "dot_nt",
    "dot_tn",
    "finish_rows",
    "matmul_precision",
    "operand_specs",
    "walk_row",
]

LOG2E = math.log2(math.e)


class Tile:
    """What the traced mods see inside a kernel: program scalars, tile indices, operand refs.

    A tile is (queries, keys), or (keys, queries) when ``transposed`` (the dK/dV kernel's
    scores, so that no register tile is transposed before its matmuls). The mods are
    element-wise over broadcast index arrays, so they trace the same either way; only the
    index arrays and the operand tiles here know the orientation.
    """

    def __init__(
        self,
        *,
        refs: Sequence[Any],
        b: Any,
        h: Any,
        q_start: Any,
        kv_start: Any,
        block_q: int,
        block_kv: int,
        transposed: bool = False,
    ) -> None:
        self.refs = refs
        self.b = b
        self.h = h
        self.q_start = q_start
        self.kv_start = kv_start
        self.block_q = block_q
        self.block_kv = block_kv
        self.transposed = transposed
        q_axis = 1 if transposed else 0
        self.q_idx = q_start + jax.lax.broadcasted_iota(
            jnp.int32, self._oriented(block_q, 1), q_axis
        )
        self.kv_idx = kv_start + jax.lax.broadcasted_iota(
            jnp.int32, self._oriented(1, block_kv), 1 - q_axis
        )

    def _oriented(self, rows: int, cols: int) -> tuple[int, int]:
        # A (query, key) shape in this tile's orientation.
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def shape(self) -> tuple[int, int]:
        return self._oriented(self.block_q, self.block_kv)

    def scalar(self, slot: int) -> Any:
        return self.refs[slot][0]

    def q_row(self, slot: int) -> Any:
        row = self.refs[slot][pl.ds(self.q_start, self.block_q)]
        return row[None, :] if self.transposed else row[:, None]

    def kv_row(self, slot: int) -> Any:
        row = self.refs[slot][pl.ds(self.kv_start, self.block_kv)]
        return row[:, None] if self.transposed else row[None, :]

    def plane(self, slot: int) -> Any:
        """A (bq | 1, bk | 1) tile of a (#H, Tp | 1, Sp | 1) plane (bias or dense mask), in
        this tile's orientation."""
        ref = self.refs[slot]
        num_h, len_q, len_kv = ref.shape
        h = self.h if num_h > 1 else 0
        rows = pl.ds(self.q_start, self.block_q) if len_q > 1 else pl.ds(0, 1)
        cols = pl.ds(self.kv_start, self.block_kv) if len_kv > 1 else pl.ds(0, 1)
        block = ref[h, rows, cols]
        return block.T if self.transposed else block


def operand_specs(operands: Sequence[jax.Array]) -> list[pl.BlockSpec]:
    """A mod plan's operands are blocked on their batch axis only (every grid puts the batch
    at index 1)."""
    specs = []
    for array in operands:
        rest = (0,) * (array.ndim - 1)
        if array.shape[0] > 1:
            index_map = lambda i, b, h, rest=rest: (b, *rest)
        else:
            index_map = lambda i, b, h, rest=rest: (0, *rest)
        specs.append(pl.BlockSpec((None, *array.shape[1:]), index_map))
    return specs


# --------------------------------------------------------------------------- shared math


def dot_nt(a: Any, b: Any, precision: Any) -> Any:
    """``a @ b.T`` accumulated in float32."""
    return jax.lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def dot_nn(a: Any, b: Any, precision: Any) -> Any:
    """``a @ b`` accumulated in float32."""
    return jax.lax.dot_general(
        a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def dot_tn(a: Any, b: Any, precision: Any) -> Any:
    """``a.T @ b`` accumulated in float32."""
    return jax.lax.dot_general(
        a, b, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def matmul_precision(dtype: Any) -> Any:
    """Full float32 products for float32 inputs (IEEE in Triton), the default for half types."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# --------------------------------------------------------------------------- walking a row


def _range_block(bound_at: Callable[[Any], Any], n_partial: Any) -> Callable[[Any, bool], Any]:
    """``block(j, masked)`` of a row given by its four bounds (:func:`plan.block_ranges`):
    arithmetic, no index load per block."""
    first, first_full, end_full = bound_at(0), bound_at(1), bound_at(2)
    left = first_full - first  # partial blocks before the full ones

    def block(j: Any, masked: bool) -> Any:
        if masked:
            return jnp.where(j < left, first + j, end_full + (j - left))
        return first_full + (j - n_partial)

    return block


def walk_row(
    step: Callable[[Any, Any, bool], Any],
    carry: Any,
    *,
    index_at: Callable[[Any], Any],
    count_at: Callable[[Any], Any],
    ranged: bool,
) -> Any:
    """Run ``step(block, carry, masked)`` over a row's partial blocks (``masked``) and then
    its full ones, returning the carry.

    ``index_at(j)`` reads the row's table and ``count_at(i)`` its two counts
    (:func:`plan.row_blocks`). With ranges (``ranged``) the table is the row's four bounds and
    the block at each step is arithmetic; with lists it is read from the row's list.
    """
    n_partial, n_full = count_at(0), count_at(1)

    def listed(j: Any, masked: bool) -> Any:
        return index_at(j)

    block = _range_block(index_at, n_partial) if ranged else listed
    carry = jax.lax.fori_loop(0, n_partial, lambda j, c: step(block(j, True), c, True), carry)
    return jax.lax.fori_loop(
        n_partial, n_partial + n_full, lambda j, c: step(block(j, False), c, False), carry
    )


def finish_rows(acc: Any, m: Any, l: Any) -> tuple[Any, Any]:
    """The normalised output and log2-sum-exp of an online softmax's (acc, max, denominator).

    A row with nothing allowed gives zeros and +inf, so the backward's exp2(t - lse) is 0 there.
    Serves the kernel (one query block) and the stepped forward's scan (whole arrays).
    """
    nonempty = l > 0.0
    safe_l = jnp.where(nonempty, l, 1.0)
    return acc / safe_l[..., None], jnp.where(nonempty, m + jnp.log2(safe_l), jnp.inf)
