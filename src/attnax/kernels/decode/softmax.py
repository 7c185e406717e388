r"""Partial softmax over KV tiles and the log-sum-exp combine of the splits' partials.

Each split-KV program streams its tiles with an online softmax and leaves float32 partials
(output, running max, running sum); the partials are merged by log-sum-exp:

.. math::

    M = \max_s m_s, \quad \ell = \sum_s e^{m_s - M} \ell_s, \quad
    o = \frac{1}{\ell} \sum_s e^{m_s - M} o_s .

The same math serves the Pallas kernels and the XLA path.
"""

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ..._typing import MaskMod, ScoreMod
from .._common import apply_score_mods

# A finite "minus infinity" for running maxima: masked scores are -inf, and exp(-inf - NEG)
# is 0 while exp(NEG - NEG) of two empty tiles is 1 times a zero sum, so nothing becomes NaN.
NEG_INF_FINITE = -0.7 * float(np.finfo(np.float32).max)


def tile_scores(
    scores: Float[Array, "*#tile"],
    *,
    b_idx: Any,
    h_idx: Any,
    q_pos: Any,
    kv_pos: Any,
    length: Any,
    causal: bool,
    attention_window: int | None,
    mask_mod: MaskMod | None,
    value_mod: ScoreMod | None,
    extra_allowed: Any = None,
) -> Float[Array, "*#tile"]:
    """Scores with the value mod applied and every disallowed pair set to -inf."""
    allowed = kv_pos < length
    if extra_allowed is not None:
        allowed = allowed & extra_allowed
    if causal:
        allowed = allowed & (kv_pos <= q_pos)
    if attention_window is not None:
        allowed = allowed & (q_pos - kv_pos < attention_window)
    masked, _ = apply_score_mods(
        scores,
        mask_mod=mask_mod,
        value_mod=value_mod,
        b_idx=b_idx,
        h_idx=h_idx,
        q_idx=q_pos,
        kv_idx=kv_pos,
        allowed=allowed,
    )
    return masked


def online_softmax_step(
    scores: Float[Array, "*rows C"],
    max_prev: Float[Array, "*rows"],
    sum_prev: Float[Array, "*rows"],
    out_prev: Float[Array, "*rows D"],
    value_product: Callable[[Float[Array, "*rows C"]], Float[Array, "*rows D"]],
) -> tuple[Float[Array, "*rows D"], Float[Array, "*rows"], Float[Array, "*rows"]]:
    """One tile of the online softmax; the running max stays finite (see NEG_INF_FINITE)."""
    max_next = jnp.maximum(max_prev, jnp.max(scores, axis=-1))
    correction = jnp.exp(max_prev - max_next)
    weights = jnp.exp(scores - max_next[..., None])
    sum_next = correction * sum_prev + jnp.sum(weights, axis=-1)
    out_next = correction[..., None] * out_prev + value_product(weights)
    return out_next, max_next, sum_next


def merge_splits(
    out: Float[Array, "*lead S R D"],
    row_max: Float[Array, "*lead S R"],
    row_sum: Float[Array, "*lead S R"],
) -> Float[Array, "*lead R D"]:
    """Log-sum-exp merge of per-split partials; rows with nothing allowed give exact zeros."""
    global_max = jnp.max(row_max, axis=-2, keepdims=True)
    weight = jnp.exp(row_max - global_max)
    total = jnp.sum(weight * row_sum, axis=-2)
    merged = jnp.sum(weight[..., None] * out, axis=-3)
    return merged / jnp.where(total > 0.0, total, 1.0)[..., None]
