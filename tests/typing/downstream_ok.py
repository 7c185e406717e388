"""Downstream code that must type-check under mypy --strict (checked by tests/test_typing.py)."""

from typing import assert_type

import jax
import jax.numpy as jnp
from flax import nnx

import attnax


def build_and_call() -> None:
    layer = attnax.MultiHeadAttention(nnx.Rngs(0), num_heads=4, in_features=16, num_kv_heads=2)
    x = jnp.ones((1, 3, 16))
    assert_type(layer(x), jax.Array)
    cache = attnax.KVLayerCache(
        keys=jnp.zeros((1, 2, 8, 4)),
        values=jnp.zeros((1, 2, 8, 4)),
        length=jnp.zeros((1,), jnp.int32),
        overflow=jnp.zeros((1,), bool),
    )
    out, new_cache = layer(x, kv_cache=cache)
    assert_type(out, jax.Array)
    assert_type(new_cache, attnax.KVLayerCache)


def spec_fields(spec: attnax.AttentionSpec) -> None:
    assert_type(spec.num_heads, int)
    assert_type(spec.num_kv_heads, int | None)
    assert_type(spec.head_dim, int)
    assert_type(spec.attention_type, attnax.AttentionType)
    assert_type(spec.dropout_rate, float)
    assert_type(spec.score_mod, attnax.ScoreMod | None)
    layer = attnax.MultiHeadAttention.from_spec(spec, rngs=nnx.Rngs(0))
    assert_type(layer, attnax.MultiHeadAttention)
    assert_type(layer.spec, attnax.AttentionSpec)


kernel: attnax.AttentionFn = attnax.standard_attention
score_mod: attnax.ScoreMod = attnax.alibi_mod(4)
mask_mod: attnax.MaskMod = lambda b, h, q, kv: q >= kv
