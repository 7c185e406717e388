"""The shared base: every softmax kernel, the same cases, values and gradients.

Each case of :data:`tests.kernels._cases.CASES` runs through every kernel of
:data:`tests.kernels._cases.KERNELS`; the output and (dq, dk, dv) of a random cotangent are
compared with the float64 NumPy reference (:func:`tests._reference.reference_attention_vjp`,
independent of every kernel's ``custom_vjp``), in one jitted call per case.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests._reference import output_and_vjp, random_qkv, reference_attention_vjp, relative_error
from tests.kernels._cases import CASES, KERNELS, SoftmaxCase

# float32 kernels at HIGHEST matmul precision (conftest) reach 1e-7 to 3e-7 of the float64
# reference on these cases (values and gradients alike, every kernel): 1e-5 leaves a 30-fold
# margin and is as tight as, or tighter than, every per-kernel test this base replaced.
TOL = 1e-5
# bf16 inputs and outputs with float32 accumulation reach 1.5e-3 to 2.7e-3 (bf16's unit
# roundoff is 2^-8); 1e-2 is the bound test_standard.py held the reference kernel to.
LOW_PRECISION_TOL = 1e-2
# A gradient the reference finds exactly zero (one key: the softmax is 1 whatever the score)
# has no scale to be relative to: it must vanish to float32 rounding (seen: up to 8e-7).
ZERO_GRAD_ATOL = 5e-6


def _assert_close(got: jax.Array, want: np.ndarray, tol: float, what: str) -> None:
    assert got.shape == want.shape, what
    if not np.any(want):
        assert float(jnp.max(jnp.abs(got.astype(jnp.float32)))) < ZERO_GRAD_ATOL, what
        return
    error = relative_error(got, want)
    assert error < tol, f"{what}: relative error {error:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_values_and_gradients_match_float64_reference(case: SoftmaxCase, kernel: str) -> None:
    query, key, value = random_qkv(case.seed, **case.shape)
    cotangent = jax.random.normal(jax.random.key(case.seed + 1000), query.shape, jnp.float32)
    mask, score_mod = case.mask(case.seed), case.score_mod(case.seed)
    kwargs = case.kwargs(case.seed)
    attend = KERNELS[kernel]

    def run(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return attend(q, k, v, mask=mask, score_mod=score_mod, **kwargs)

    out, grads = output_and_vjp(run, (query, key, value), cotangent)
    # The reference sees the cotangent the kernel saw (rounded to the output's dtype).
    want, want_grads = reference_attention_vjp(
        query, key, value, cotangent.astype(out.dtype), mask=mask, score_mod=score_mod
    )
    assert out.shape == query.shape and out.dtype == query.dtype
    tol = LOW_PRECISION_TOL if case.low_precision else TOL
    _assert_close(out, want, tol, "output")
    # A query row that sees no key is exactly zero, and so is its query gradient (no NaN from
    # 0/0, no leak from a padded or skipped tile).
    empty = ~np.any(want, axis=-1)
    assert np.all(np.asarray(out, np.float32)[empty] == 0.0)
    assert np.all(np.asarray(grads[0], np.float32)[empty] == 0.0)
    for name, got, expected in zip(("dq", "dk", "dv"), grads, want_grads, strict=True):
        assert got.dtype == query.dtype, name
        _assert_close(got, expected, tol, name)
