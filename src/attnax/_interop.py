"""Flax interop: run any attnax kernel as ``flax.nnx.MultiHeadAttention``'s ``attention_fn``."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from ._mods import causal_mod
from ._typing import AttentionFn

__all__ = ["as_flax_attention_fn"]

FlaxAttentionFn = Callable[..., Float[Array, "*B T H D"]]


def as_flax_attention_fn(kernel: AttentionFn) -> FlaxAttentionFn:
    """Adapt an attnax kernel to flax's ``attention_fn`` calling convention.

    Flax calls ``attention_fn(query, key, value, mask=..., dropout_rng=..., dropout_rate=...,
    broadcast_dropout=..., deterministic=..., dtype=..., precision=..., module=...,
    is_causal=...)`` with (batch..., length, heads, head_dim) arrays. The adapter moves heads in
    front of length, turns ``is_causal`` into :func:`attnax.causal_mod`, folds extra leading
    batch axes into one, and passes dropout through to the kernel (attention-weight dropout,
    as flax does; the mask is not broadcast across heads).

    Args:
      kernel: any attnax kernel (:class:`attnax.AttentionFn`).

    Returns:
      A function with flax's ``attention_fn`` signature, returning (batch..., length, heads,
      head_dim).

    Raises:
      NotImplementedError: for ``sow_weights`` (flax passes ``module``): attnax kernels do not
        materialise the attention weights; use flax's own ``dot_product_attention``.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> from flax import nnx
      >>> layer = nnx.MultiHeadAttention(
      ...     num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0),
      ...     attention_fn=attnax.as_flax_attention_fn(attnax.memory_efficient_attention))
      >>> layer(jnp.ones((1, 4, 8))).shape
      (1, 4, 8)
      >>> attention_fn = attnax.as_flax_attention_fn(attnax.standard_attention)
      >>> q = jnp.ones((1, 4, 2, 8))  # flax's (batch, length, heads, head_dim)
      >>> attention_fn(q, q, q, is_causal=True).shape
      (1, 4, 2, 8)
    """

    def attention_fn(
        query: Float[Array, "*B T H D"],
        key: Float[Array, "*B S Hk D"],
        value: Float[Array, "*B S Hk D"],
        bias: Float[Array, "*#B #H #T #S"] | None = None,
        mask: Bool[Array, "*#B #H #T #S"] | None = None,
        broadcast_dropout: bool = True,
        dropout_rng: jax.Array | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype: Any = None,
        precision: Any = None,
        module: Any = None,
        is_causal: bool = False,
    ) -> Float[Array, "*B T H D"]:
        if module is not None:
            raise NotImplementedError(
                "attnax kernels do not return attention weights, so flax's sow_weights cannot "
                "be used with as_flax_attention_fn; call the layer without sow_weights."
            )
        if bias is not None:
            raise NotImplementedError(
                "pass an additive bias as attnax.additive_bias_mod through the attnax kernel; "
                "the flax adapter takes no `bias`."
            )
        lead = query.shape[:-3]

        def to_bhtd(x: Array) -> Array:
            return jnp.swapaxes(x.reshape(-1, *x.shape[-3:]), 1, 2)

        flat_mask = None
        if mask is not None:
            mask = jnp.asarray(mask, bool)
            flat_mask = jnp.broadcast_to(mask, (*lead, *mask.shape[-3:])).reshape(-1, *mask.shape[-3:])
        if dtype is not None:
            query, key, value = (x.astype(dtype) for x in (query, key, value))
        out = kernel(
            to_bhtd(query),
            to_bhtd(key),
            to_bhtd(value),
            mask=flat_mask,
            score_mod=causal_mod() if is_causal else None,
            dropout_rng=dropout_rng,
            dropout_rate=dropout_rate,
            deterministic=deterministic,
        )
        return jnp.swapaxes(out, 1, 2).reshape(query.shape)

    return attention_fn
