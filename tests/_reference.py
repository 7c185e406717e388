"""An independent float64 reference for softmax attention, and random-input helpers.

The reference is written in NumPy, not with attnax's kernels: score mods (JAX callables) are
evaluated under float64 (``jax.enable_x64``) on dense index grids, everything else is NumPy.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnax._mods import (
    alibi_mod,
    causal_mod,
    compose_score_mods,
    document_mask_mod,
    sliding_window_mod,
    softcap_mod,
)
from attnax._typing import ScoreMod

__all__ = [
    "PAIR_SCORE_MODS",
    "output_and_vjp",
    "random_qkv",
    "reference_attention",
    "reference_attention_vjp",
    "relative_error",
]


def random_qkv(
    seed: int,
    *,
    batch: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    seq_q: int = 16,
    seq_kv: int | None = None,
    head_dim: int = 16,
    dtype: Any = jnp.float32,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fresh normal query/key/value (never zeros) in the (B, H, T, D) layout."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    seq_kv = seq_q if seq_kv is None else seq_kv
    query = jax.random.normal(kq, (batch, num_heads, seq_q, head_dim), jnp.float32)
    key = jax.random.normal(kk, (batch, num_kv_heads, seq_kv, head_dim), jnp.float32)
    value = jax.random.normal(kv, (batch, num_kv_heads, seq_kv, head_dim), jnp.float32)
    return query.astype(dtype), key.astype(dtype), value.astype(dtype)


def _reference_probabilities(
    q: np.ndarray,
    k: np.ndarray,
    *,
    mask: Any,
    score_mod: Any,
    scale: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities of float64 (B, H, T, D) query and head-repeated key, and the
    elementwise derivative of the score mod at the raw scores (ones without a mod)."""
    batch, num_heads, seq_q, _ = q.shape
    seq_kv = k.shape[2]
    s = np.einsum("bhtd,bhsd->bhts", q, k) * scale
    slope = np.ones_like(s)
    if score_mod is not None:
        with jax.enable_x64(True):
            b = jnp.arange(batch).reshape(-1, 1, 1, 1)
            h = jnp.arange(num_heads).reshape(1, -1, 1, 1)
            qi = jnp.arange(seq_q).reshape(1, 1, -1, 1)
            ki = jnp.arange(seq_kv).reshape(1, 1, 1, -1)
            raw = jnp.asarray(s, jnp.float64)
            # A score mod is elementwise in the score, so one forward-mode pass with unit
            # tangents gives its derivative at every (b, h, t, s) exactly.
            modded, tangent = jax.jvp(
                lambda x: jnp.broadcast_to(score_mod(x, b, h, qi, ki), raw.shape),
                (raw,),
                (jnp.ones_like(raw),),
            )
            s = np.asarray(modded, np.float64)
            slope = np.asarray(tangent, np.float64)
    if mask is not None:
        s = np.where(np.broadcast_to(np.asarray(mask, bool), s.shape), s, -np.inf)
    row_max = s.max(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    p = np.exp(s - row_max)
    denominator = p.sum(axis=-1, keepdims=True)
    p = p / np.where(denominator > 0, denominator, 1.0)
    return p, slope


def _float64_heads(
    query: Any, key: Any, value: Any, scale: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, float]:
    q = np.asarray(query, np.float64)
    k = np.asarray(key, np.float64)
    v = np.asarray(value, np.float64)
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    return q, k, v, group, q.shape[-1] ** -0.5 if scale is None else scale


def reference_attention(
    query: Any,
    key: Any,
    value: Any,
    *,
    mask: Any = None,
    score_mod: Any = None,
    scale: float | None = None,
) -> np.ndarray:
    """float64 softmax attention; GQA by repeating heads (fine in a reference)."""
    q, k, v, _, scale = _float64_heads(query, key, value, scale)
    p, _ = _reference_probabilities(q, k, mask=mask, score_mod=score_mod, scale=scale)
    out: np.ndarray = np.einsum("bhts,bhsd->bhtd", p, v)
    return out


def reference_attention_vjp(
    query: Any,
    key: Any,
    value: Any,
    cotangent: Any,
    *,
    mask: Any = None,
    score_mod: Any = None,
    scale: float | None = None,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    r"""float64 output and the gradients (dq, dk, dv) of :math:`\langle O, dO\rangle`.

    The softmax backward written out in NumPy (no JAX autodiff of attention, so it is
    independent of every kernel's ``custom_vjp``): with :math:`P` the probabilities and
    :math:`dO` the cotangent, :math:`dV = P^\top dO`, :math:`dP = dO V^\top`,
    :math:`dS = P \odot (dP - \mathrm{rowsum}(dP \odot P))`, times the score mod's derivative,
    then :math:`dQ = s\,dS K`, :math:`dK = s\,dS^\top Q`; grouped heads sum into their K/V head.
    A masked pair has :math:`P = 0`, so it gets no gradient, and a fully masked row none at all.
    """
    q, k, v, group, scale = _float64_heads(query, key, value, scale)
    p, slope = _reference_probabilities(q, k, mask=mask, score_mod=score_mod, scale=scale)
    out: np.ndarray = np.einsum("bhts,bhsd->bhtd", p, v)
    d_out = np.asarray(cotangent, np.float64)
    d_value = np.einsum("bhts,bhtd->bhsd", p, d_out)
    d_p = np.einsum("bhtd,bhsd->bhts", d_out, v)
    d_s = p * (d_p - np.sum(d_p * p, axis=-1, keepdims=True))
    # A pair with p = 0 gets no gradient whatever the mod's slope there (np.where, not a product,
    # so a non-finite slope at a masked pair cannot leak a NaN).
    d_raw = np.where(p > 0, d_s * slope, 0.0) * scale
    d_query: np.ndarray = np.einsum("bhts,bhsd->bhtd", d_raw, k)
    d_key = np.einsum("bhts,bhtd->bhsd", d_raw, q)

    def per_kv_head(x: np.ndarray) -> np.ndarray:
        batch, num_heads, seq, dim = x.shape
        summed: np.ndarray = x.reshape(batch, num_heads // group, group, seq, dim).sum(axis=2)
        return summed

    return out, (d_query, per_kv_head(d_key), per_kv_head(d_value))


def relative_error(actual: Any, expected: Any) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64; NaN anywhere gives inf."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - e)) / max(float(np.linalg.norm(e)), 1e-30)


def output_and_vjp(
    fn: Callable[..., jax.Array], args: tuple[jax.Array, ...], cotangent: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """``fn(*args)`` and the gradients of <fn(*args), cotangent> w.r.t. every arg, in one jit."""

    def run(*a: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        out, pullback = jax.vjp(fn, *a)
        return out, pullback(cotangent.astype(out.dtype))

    result: tuple[jax.Array, tuple[jax.Array, ...]] = jax.jit(run)(*args)
    return result


def _doubled(
    scores: jax.Array, b_idx: jax.Array, h_idx: jax.Array, q_idx: jax.Array, kv_idx: jax.Array, /
) -> jax.Array:
    return scores * 2.0


def _causal_softcap() -> ScoreMod:
    mod = compose_score_mods(causal_mod(), softcap_mod(5.0))
    assert mod is not None
    return mod


# Score mods that need per-pair scores (value mods, mask mods other than causal, and causal
# combined with either), for the kernels without them (LINEAR, LITE), which must refuse them.
# Built on call: some hold arrays. Documents are sized for seq 8.
PAIR_SCORE_MODS: dict[str, Callable[[], ScoreMod]] = {
    "softcap": lambda: softcap_mod(5.0),
    "alibi": lambda: alibi_mod(2),
    "document": lambda: document_mask_mod(jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]] * 2)),
    "window": lambda: sliding_window_mod(4),
    "causal_softcap": _causal_softcap,
    "plain_callable": lambda: _doubled,
}
