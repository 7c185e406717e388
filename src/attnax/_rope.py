"""Rotary position embeddings (RoPE) from a precomputed table.

Rotation in the half-split convention (GPT-NeoX, LLaMA in Hugging Face): the first and second
halves of each head's features form the (real, imaginary) pairs, rotated by
``position * base ** (-2i / head_dim)``.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

__all__ = ["apply_rope", "rope_table"]


def rope_table(
    max_positions: int, head_dim: int, base: float = 10000.0
) -> Float[Array, "L Dh2"]:
    """``(max_positions, head_dim)`` float32 table: cosines in the first half, sines in the second.

    One array keeps the table a single piece of layer state.
    """
    if head_dim % 2 != 0:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}.")
    if not base > 1.0:
        raise ValueError(
            f"RoPE needs a `base` above 1 (frequencies base**(-2i/head_dim) must fall with i; "
            f"10000 is the usual choice), got {base}."
        )
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.arange(max_positions, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _check_positions(positions: jax.Array, max_positions: int, argument: str) -> None:
    # Only concrete positions can be checked eagerly; under jit an out-of-range row gathers NaN
    # (mode="fill" below), which is loud, never a silently reused rotation.
    if isinstance(positions, jax.core.Tracer):
        return
    if positions.size and (int(positions.min()) < 0 or int(positions.max()) >= max_positions):
        raise ValueError(
            f"`{argument}` holds positions in [{int(positions.min())}, {int(positions.max())}], "
            f"outside the RoPE table's [0, {max_positions}); raise rope_max_positions."
        )


def apply_rope(
    x: Float[Array, "B T N D"],
    positions: Int[Array, "#B T"],
    table: Float[Array, "L D"],
    *,
    argument: str = "position_ids",
) -> Float[Array, "B T N D"]:
    """Rotate ``x`` (batch, seq, heads, head_dim) at ``positions`` (batch or 1, seq).

    Computed in float32 and returned in ``x``'s dtype.
    """
    _check_positions(positions, table.shape[0], argument)
    half = x.shape[-1] // 2
    rows = jnp.take(table, positions, axis=0, mode="fill", fill_value=jnp.nan)  # (B, T, D)
    cos = rows[..., None, :half]
    sin = rows[..., None, half:]
    x32 = x.astype(jnp.float32)
    first, second = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
