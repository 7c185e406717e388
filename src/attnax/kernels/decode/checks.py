"""Argument checks of the decode kernels and the rules for when their Pallas kernel can run."""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ..._checks import positive_int
from ..._typing import ScoreMod
from .._gpu import is_power_of_two
from .plan import MAX_ROWS


def has_array_leaves(score_mod: ScoreMod | None) -> bool:
    """Whether a score mod carries arrays (which a Pallas kernel cannot close over)."""
    if score_mod is None:
        return False
    return any(
        isinstance(leaf, (jax.Array, np.ndarray)) and np.ndim(leaf) > 0
        for leaf in jax.tree_util.tree_leaves(score_mod)
    )


def check_decode_arguments(
    query: Array,
    lengths: Array,
    q_offset: Array | None,
    *,
    num_kv_heads: int,
    head_dim: int,
    attention_window: int | None,
    num_splits: int | None,
    name: str,
) -> None:
    """Static checks shared by the contiguous and the paged decode kernels."""
    if query.ndim != 4:
        raise ValueError(
            f"{name}: `query` must have rank 4 (batch, heads, seq_q, head_dim), got {query.shape}."
        )
    batch, num_heads, _, query_dim = query.shape
    if query_dim != head_dim:
        raise ValueError(
            f"{name}: `query` head_dim {query_dim} differs from the cache's head_dim {head_dim}."
        )
    if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"{name}: the cache has {num_kv_heads} KV heads, which does not divide the query's "
            f"{num_heads} heads; use a key/value head count that divides it."
        )
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(
            f"{name}: `lengths` must be an integer array of shape (batch,) = ({batch},), got "
            f"{lengths.dtype}{list(lengths.shape)}."
        )
    if q_offset is not None and (
        q_offset.shape != (batch,) or not jnp.issubdtype(q_offset.dtype, jnp.integer)
    ):
        raise ValueError(
            f"{name}: `q_offset` must be an integer array of shape (batch,) = ({batch},), got "
            f"{q_offset.dtype}{list(q_offset.shape)}."
        )
    if attention_window is not None:
        positive_int(attention_window, "attention_window", caller=name)
    if num_splits is not None:
        positive_int(num_splits, "num_splits", caller=name)


def pallas_unsupported_reason(
    *,
    head_dim: int,
    rows: int,
    tile: int,
    score_mod: ScoreMod | None,
) -> str | None:
    """Why the Pallas kernel cannot run this configuration (None when it can)."""
    if not is_power_of_two(head_dim) or head_dim < 16:
        return f"head_dim {head_dim} is not a power of two >= 16"
    if rows > MAX_ROWS:
        return (
            f"the query tile needs {rows} rows (query heads per KV head times seq_q, padded to a "
            f"power of two), more than {MAX_ROWS}; decode fewer tokens per call"
        )
    if not is_power_of_two(tile) or tile < 16:
        return f"the KV tile of {tile} keys is not a power of two >= 16"
    if has_array_leaves(score_mod):
        return "the score mod carries arrays, which a Pallas kernel cannot close over"
    return None


def resolve_use_pallas(
    use_pallas: bool | None, interpret: bool, reason: str | None, *, name: str
) -> bool:
    """Whether the Pallas kernel serves the call (``reason``: why it cannot, or None)."""
    if use_pallas is None:
        return reason is None and (interpret or jax.default_backend() == "gpu")
    if use_pallas and reason is not None:
        raise NotImplementedError(
            f"{name}: the Pallas kernel does not support this call ({reason}); pass "
            "use_pallas=False for the XLA path."
        )
    return use_pallas


def check_contiguous_arguments(
    query: Array,
    keys: Array,
    values: Array,
    lengths: Array,
    q_offset: Array | None,
    *,
    attention_window: int | None,
    num_splits: int | None,
    block_kv: int,
    name: str,
) -> None:
    """Static checks of :func:`~attnax.kernels.decode.api.decode_attention`'s arguments."""
    if keys.ndim != 4 or keys.shape != values.shape:
        raise ValueError(
            f"{name}: `keys` {keys.shape} and `values` {values.shape} must have the same shape "
            "(batch, kv_heads, max_len, head_dim)."
        )
    if keys.shape[0] != query.shape[0]:
        raise ValueError(
            f"{name}: `query` batch {query.shape[0]} differs from `keys` batch {keys.shape[0]}."
        )
    check_decode_arguments(
        query,
        lengths,
        q_offset,
        num_kv_heads=keys.shape[1],
        head_dim=keys.shape[3],
        attention_window=attention_window,
        num_splits=num_splits,
        name=name,
    )
    if not is_power_of_two(block_kv) or block_kv < 1:
        raise ValueError(f"{name}: `block_kv` must be a power of two, got {block_kv}.")


def check_paged_arguments(
    query: Array,
    key_pool: Array,
    value_pool: Array,
    block_table: Array,
    lengths: Array,
    q_offset: Array | None,
    *,
    attention_window: int | None,
    num_splits: int | None,
    block_kv: int,
    name: str,
) -> None:
    """Static checks of :func:`~attnax.kernels.decode.paged.paged_decode_attention`'s arguments."""
    if key_pool.ndim != 4 or key_pool.shape != value_pool.shape:
        raise ValueError(
            f"{name}: `key_pool` {key_pool.shape} and `value_pool` {value_pool.shape} must have "
            "the same shape (num_blocks, block_size, kv_heads, head_dim)."
        )
    if block_table.ndim != 2 or block_table.shape[0] != query.shape[0]:
        raise ValueError(
            f"{name}: `block_table` must have shape (batch, max_blocks_per_seq) with batch "
            f"{query.shape[0]}, got {block_table.shape}."
        )
    if not is_power_of_two(block_kv):
        raise ValueError(f"{name}: `block_kv` must be a power of two, got {block_kv}.")
    _, _, num_kv_heads, head_dim = key_pool.shape
    check_decode_arguments(
        query,
        lengths,
        q_offset,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        attention_window=attention_window,
        num_splits=num_splits,
        name=name,
    )
