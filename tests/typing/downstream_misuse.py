"""Each line below is a misuse mypy must catch; warn_unused_ignores fails if one stops erroring."""

import jax.numpy as jnp
from flax import nnx

import attnax

spec = attnax.AttentionSpec(num_heads="8", in_features=64)  # type: ignore[arg-type]
attnax.AttentionSpec(num_heads=8, in_features=64, heads=8)  # type: ignore[call-arg]
attnax.MultiHeadAttention(nnx.Rngs(0), num_heads=8, in_features=64, num_head=8)  # type: ignore[call-arg]
attnax.MultiHeadAttention(nnx.Rngs(0), num_heads=8.0, in_features=64)  # type: ignore[arg-type]
attnax.AttentionSpec(num_heads=8, in_features=64).num_heads = 4  # type: ignore[misc]
_layer = attnax.MultiHeadAttention(nnx.Rngs(0), num_heads=8, in_features=64)
_cache = attnax.KVLayerCache(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), jnp.zeros(1))
_pair = _layer(jnp.ones((1, 2, 64)), kv_cache=_cache)
_pair.reshape(2, -1)  # type: ignore[attr-defined]
attnax.standard_attention(jnp.ones((1, 1, 1, 1)), jnp.ones((1, 1, 1, 1)), jnp.ones((1, 1, 1, 1)), dropout_rate="0.1")  # type: ignore[arg-type]
attnax.standard_attention(jnp.ones((1, 1, 1, 1)), jnp.ones((1, 1, 1, 1)), jnp.ones((1, 1, 1, 1)), block_size=64)  # type: ignore[call-arg]
_not_a_kernel: attnax.AttentionFn = lambda q, k: q  # type: ignore[assignment]
