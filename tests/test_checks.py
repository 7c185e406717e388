"""The runtime shape-check switch: off costs nothing, on raises TypeError naming the argument."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import attnax
from tests._reference import random_qkv


def test_suite_runs_with_checks_on() -> None:
    assert attnax.shape_checks_enabled()


def test_context_manager_nests_and_restores() -> None:
    with attnax.shape_checks(False):
        assert not attnax.shape_checks_enabled()
        with attnax.shape_checks():
            assert attnax.shape_checks_enabled()
        assert not attnax.shape_checks_enabled()
    assert attnax.shape_checks_enabled()


@pytest.mark.parametrize("jit", [False, True])
def test_head_dim_mismatch_names_key(jit: bool) -> None:
    q, k, v = random_qkv(0)
    fn = jax.jit(attnax.standard_attention) if jit else attnax.standard_attention
    with attnax.shape_checks(), pytest.raises(TypeError, match="key"):
        fn(q, k[..., :8], v)


def test_rank_mismatch_names_query() -> None:
    q, k, v = random_qkv(0)
    with attnax.shape_checks(), pytest.raises(TypeError, match="query"):
        attnax.standard_attention(q[0], k, v)


def test_non_dividing_heads_is_type_error() -> None:
    q, _, _ = random_qkv(0, num_heads=4)
    k = jnp.ones((2, 3, 16, 16))
    with attnax.shape_checks(), pytest.raises(TypeError, match="does not divide"):
        attnax.standard_attention(q, k, k)


def test_environment_variable_turns_checks_on_and_off() -> None:
    code = "import attnax; print(attnax.shape_checks_enabled())"
    for value, expected in (("1", "True"), ("0", "False")):
        env = {**os.environ, "ATTNAX_SHAPE_CHECKS": value, "JAX_PLATFORMS": "cpu"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected


def test_user_attention_fn_output_is_checked() -> None:
    from flax import nnx

    def wrong_layout(query, key, value, **kwargs):  # type: ignore[no-untyped-def]
        return jnp.swapaxes(query, 1, 2)  # (B, T, H, D): not the query's layout

    layer = attnax.MultiHeadAttention(nnx.Rngs(0), num_heads=4, in_features=16, attention_fn=wrong_layout)
    x = jax.random.normal(jax.random.key(0), (2, 8, 16))
    with attnax.shape_checks(), pytest.raises(TypeError, match="attention_fn"):
        layer(x)
