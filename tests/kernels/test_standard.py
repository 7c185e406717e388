"""The reference kernel against the float64 NumPy reference: values, dropout, bad layouts.

Gradients, bf16 inputs and dense masks (with rows that see no key) are checked, for this kernel
and every other softmax kernel, by the shared base ``tests/kernels/test_softmax_kernels.py``.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnax
from tests._reference import random_qkv, reference_attention, relative_error

CASES = [
    dict(num_heads=4, num_kv_heads=4, seq_q=16, seq_kv=16),
    dict(num_heads=4, num_kv_heads=2, seq_q=9, seq_kv=23),  # GQA, unequal lengths
    dict(num_heads=6, num_kv_heads=1, seq_q=17, seq_kv=5),  # MQA
]

MODS: dict[str, Callable[[int], attnax.ScoreMod | None]] = {
    "none": lambda heads: None,
    "causal": lambda heads: attnax.causal_mod(),
    "alibi+causal": lambda heads: attnax.compose_score_mods(attnax.causal_mod(), attnax.alibi_mod(heads)),
    "window": lambda heads: attnax.sliding_window_mod(4),
    "softcap": lambda heads: attnax.softcap_mod(2.0),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mod_name", list(MODS))
def test_matches_float64_reference(case: dict[str, int], mod_name: str) -> None:
    q, k, v = random_qkv(hash((mod_name, tuple(case.values()))) % 1000, **case)
    score_mod = MODS[mod_name](case["num_heads"])
    out = attnax.standard_attention(q, k, v, score_mod=score_mod)
    expected = reference_attention(q, k, v, score_mod=score_mod)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert relative_error(out, expected) < 1e-5


def test_dropout_scales_and_is_deterministic_when_asked() -> None:
    q, k, v = random_qkv(13, num_heads=2, seq_q=8, seq_kv=8)
    base = attnax.standard_attention(q, k, v)
    same = attnax.standard_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(0), deterministic=True)
    np.testing.assert_allclose(np.asarray(same), np.asarray(base), rtol=1e-6)
    dropped = attnax.standard_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(0), deterministic=False)
    assert not np.allclose(np.asarray(dropped), np.asarray(base))
    # Inverted dropout keeps the expectation: average over many keys approaches the base output.
    outs = jax.vmap(
        lambda key: attnax.standard_attention(q, k, v, dropout_rate=0.5, dropout_rng=key, deterministic=False)
    )(jax.random.split(jax.random.key(1), 400))
    assert relative_error(outs.mean(0), base) < 0.1
    with pytest.raises(ValueError, match="dropout_rng"):
        attnax.standard_attention(q, k, v, dropout_rate=0.5, deterministic=False)


def test_bad_layouts_are_value_errors_naming_the_argument() -> None:
    q, k, v = random_qkv(1, num_heads=4, num_kv_heads=2)
    with attnax.shape_checks(False):
        with pytest.raises(ValueError, match="`key` has 3 heads"):
            attnax.standard_attention(q, jnp.ones((2, 3, 16, 16)), jnp.ones((2, 3, 16, 16)))
        with pytest.raises(ValueError, match="mask"):
            attnax.standard_attention(q, k, v, mask=jnp.ones((16, 16), bool))
        with pytest.raises(ValueError, match="rank 4"):
            attnax.standard_attention(q[0], k, v)
