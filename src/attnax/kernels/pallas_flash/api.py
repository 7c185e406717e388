"""PALLAS_FLASH's entries: :func:`pallas_flash_attention` and :func:`flash_attention_with_config`,
the ``jax.custom_vjp`` that joins the forward to the backward, and the choice of kernels.

Structure (see ``benchmarks/NOTES.md``):

* **Preparation** (:mod:`.plan`, :mod:`.tile_mods`): pad T/S to whole blocks (and head_dim to
  a power of two), split the score mod into its mask part and its value part, compute the
  block classes and turn them into per-row block lists or ranges. Mods that hold arrays become
  kernel operands.
* **Triton forward** (:mod:`.triton`): a program owns one (query block, batch, head) and walks
  its partial blocks with the mask and then its full blocks without it; optionally stepped
  over a few key blocks at a time (memory_efficient_attention's GPU path).
* **Mosaic-GPU forward** (:mod:`.mosaic`): full attention on a Hopper GPU (no mask, mod or
  operand; 2-byte inputs; whole tiles) takes a warp-specialised wgmma kernel in place of the
  Triton forward (:func:`.plan.mosaic_forward_applies`); it returns the same (out, lse2), so
  either backward reads it.
* **Triton backward** (:mod:`.triton_vjp`): a dK/dV kernel per key block (looping over the
  query heads of its GQA group and their query blocks) and a dQ kernel per query block,
  recomputing probabilities from the saved log-sum-exp; the value mod is differentiated inside
  the kernel with :func:`jax.vjp`, which also yields the gradient of an additive bias tile.
* **Mosaic-GPU backward** (:mod:`.mosaic_vjp`): where the Mosaic-GPU forward runs, its dK/dV
  and dQ kernels (warp-specialised pipelines, wgmma) replace the Triton ones
  (:func:`.plan.mosaic_backward_applies`).

Off the GPU without ``interpret=True``, and with ``force_fallback=True``, calls go to the
fallback the backend table names (``attnax._backends``), reached through
``attnax.kernels._fallback``: this package imports no other kernel.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..._checks import shape_checked
from ..._typing import (
    AttentionMask,
    AttentionOutput,
    KeyArray,
    PRNGKeyArray,
    QueryArray,
    ScoreMod,
    ValueArray,
)
from .._common import check_dropout, check_mask, check_qkv, default_scale
from .._fallback import fallback
from .._gpu import is_power_of_two
from .config import NAME, FlashConfig, default_config
from .mosaic import mosaic_forward
from .mosaic_vjp import mosaic_backward
from .plan import Prepared, mosaic_backward_applies, mosaic_forward_applies, prepare
from .tile_mods import StaticMod, partition
from .triton import triton_forward
from .triton_vjp import dkv_call, dq_call, row_terms

__all__ = [
    "backward",
    "flash_attention_with_config",
    "forward",
    "pallas_flash_attention",
]


# --------------------------------------------------------------------------- the kernels' choice


def forward(config: FlashConfig, prepared: Prepared, scale: float) -> tuple[jax.Array, jax.Array]:
    """Run the forward on prepared (padded) inputs; returns (out_padded, lse2_padded).

    The Mosaic-GPU kernel where :func:`.plan.mosaic_forward_applies`, else the Triton one (one
    kernel call, or with ``config.key_step_blocks`` an XLA scan of stepped calls).
    """
    if mosaic_forward_applies(config, prepared, scale):
        return mosaic_forward(
            prepared.query,
            prepared.key,
            prepared.value,
            scale=scale,
            block_kv=config.mosaic_block_kv,
            stages=config.mosaic_stages,
        )
    return triton_forward(config, prepared, scale)


def backward(
    config: FlashConfig,
    prepared: Prepared,
    scale: float,
    out: jax.Array,
    lse: jax.Array,
    d_out: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, ...]]:
    """Gradients of query, key, value and of each additive bias (in the plan's bias order):
    the Mosaic-GPU pair where :func:`.plan.mosaic_backward_applies`, else the Triton pair."""
    seq_q, seq_kv, head_dim = prepared.seq_q, prepared.seq_kv, prepared.head_dim
    do, delta = row_terms(prepared, out, d_out)
    if mosaic_backward_applies(config, prepared, scale):
        d_query, d_key, d_value = mosaic_backward(
            prepared.query,
            prepared.key,
            prepared.value,
            do,
            lse,
            delta,
            scale=scale,
            dkv_block_q=config.mosaic_dkv_block_q,
            dq_block_kv=config.mosaic_dq_block_kv,
            dkv_stages=config.mosaic_dkv_stages,
            dq_stages=config.mosaic_dq_stages,
        )
        d_scores: tuple[jax.Array, ...] = ()
    else:
        d_key, d_value = dkv_call(config, prepared, scale, do, lse, delta)
        d_query, d_scores = dq_call(config, prepared, scale, do, lse, delta)
    d_biases = []
    for leaf, d_score in zip(prepared.plan.bias_leaves, d_scores, strict=True):
        d_score = d_score[:, :, :seq_q, :seq_kv]
        axes = tuple(axis for axis in range(4) if leaf.shape[axis] == 1)
        d_bias = jnp.sum(d_score, axis=axes, keepdims=True) if axes else d_score
        d_biases.append(d_bias.astype(leaf.dtype))
    return (
        d_query[:, :, :seq_q, :head_dim],
        d_key[:, :, :seq_kv, :head_dim],
        d_value[:, :, :seq_kv, :head_dim],
        tuple(d_biases),
    )


# --------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(
    config: FlashConfig,
    static_mod: StaticMod,
    scale: float,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    mod_arrays: tuple[jax.Array, ...],
) -> jax.Array:
    out, _ = _flash_forward(config, static_mod, scale, query, key, value, mask, mod_arrays)
    return out


def _flash_forward(
    config: FlashConfig,
    static_mod: StaticMod,
    scale: float,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    mod_arrays: tuple[jax.Array, ...],
) -> tuple[jax.Array, jax.Array]:
    score_mod = static_mod.rebuild(mod_arrays)
    prepared = prepare(config, query, key, value, mask, score_mod)
    out, lse = forward(config, prepared, scale)
    seq_q, head_dim = query.shape[2], query.shape[3]
    return out[:, :, :seq_q, :head_dim], lse


def _flash_fwd_rule(
    config: FlashConfig,
    static_mod: StaticMod,
    scale: float,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    mod_arrays: tuple[jax.Array, ...],
) -> tuple[jax.Array, tuple[Any, ...]]:
    out, lse = _flash_forward(config, static_mod, scale, query, key, value, mask, mod_arrays)
    return out, (query, key, value, mask, mod_arrays, out, lse)


def _flash_bwd_rule(
    config: FlashConfig,
    static_mod: StaticMod,
    scale: float,
    residuals: tuple[Any, ...],
    d_out: jax.Array,
) -> tuple[Any, ...]:
    query, key, value, mask, mod_arrays, out, lse = residuals
    score_mod = static_mod.rebuild(mod_arrays)
    prepared = prepare(config, query, key, value, mask, score_mod)
    d_query, d_key, d_value, d_biases = backward(
        config, prepared, scale, out, lse, d_out
    )
    # Each bias leaf gets the gradient of its tile; every other mod leaf a zero cotangent.
    by_identity = {id(leaf): grad for leaf, grad in zip(prepared.plan.bias_leaves, d_biases, strict=True)}
    d_mod = tuple(
        by_identity[id(leaf)] if id(leaf) in by_identity else _zero_cotangent(leaf)
        for leaf in mod_arrays
    )
    return d_query, d_key, d_value, None, d_mod


def _zero_cotangent(x: jax.Array) -> Any:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


_flash.defvjp(_flash_fwd_rule, _flash_bwd_rule)

_flash_jit = jax.jit(_flash, static_argnums=(0, 1, 2))


# --------------------------------------------------------------------------- public entry


def flash_attention_with_config(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    config: FlashConfig,
    mask: jax.Array | None = None,
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
) -> jax.Array:
    """The kernel with every tile/launch knob exposed (benchmarks sweep these); no fallback."""
    arrays, static_mod = partition(score_mod)
    scale_value = default_scale(query.shape[-1], scale)
    out: jax.Array = _flash_jit(config, static_mod, scale_value, query, key, value, mask, arrays)
    return out


# About 100 lines, most of them the public docstring (its mods, fallbacks and an example).
@shape_checked
def pallas_flash_attention(
    query: QueryArray,
    key: KeyArray,
    value: ValueArray,
    *,
    mask: AttentionMask | None = None,
    score_mod: ScoreMod | None = None,
    dropout_rng: PRNGKeyArray | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    block_q: int = 128,
    block_kv: int = 128,
    force_fallback: bool = False,
    interpret: bool = False,
    scale: float | None = None,
) -> AttentionOutput:
    r"""FlashAttention-2 in Pallas: :math:`\mathrm{softmax}(\mathrm{mod}(s QK^\top)) V`, tiled.

    A Pallas kernel (Triton lowering on GPU) with an online float32 softmax. On a Hopper GPU,
    full attention (no mask, no mod) on bf16/fp16 inputs at head_dim 33-128 whose lengths are
    multiples of 128 runs its forward and backward through Mosaic-GPU kernels instead
    (warp-specialised, wgmma; :mod:`.mosaic`, :mod:`.mosaic_vjp`). The score
    mod is traced into the inner loop with absolute indices; its mask part is turned into a
    per-(query block, key block) map outside the kernel, so blocks with no allowed pair are
    never loaded and blocks where every pair is allowed skip the mask. Grouped-query heads read
    their key/value head through the BlockSpec index maps (no repeated K/V). The backward is a
    ``jax.custom_vjp`` with Pallas dK/dV and dQ kernels that recompute the probabilities from
    the saved log-sum-exp and differentiate the value mod inside the kernel (an
    :class:`~attnax._mods.AdditiveBiasMod` receives its gradient).

    Supported mods: ``CausalMask``, ``SlidingWindowMask``, ``DocumentMask``, ``PrefixLMMask``,
    ``AlibiMod``, ``SoftcapMod``, ``AdditiveBiasMod``, their compositions, ``OffsetMask`` /
    ``OffsetScoreMod`` with int or per-batch offsets, and plain callables that capture no
    arrays (Pallas rejects a callable that closes over an array at trace time).

    Fallbacks (documented, never silent on failure): with ``force_fallback=True``, or on a
    non-GPU backend without ``interpret=True``, the call is served by the fallback the backend
    table names (``attnax._backends``: memory_efficient_attention, ``block_size =
    block_kv``), reached through ``attnax.kernels._fallback``. On GPU a lowering or compile
    error propagates.

    Args:
      query: (batch, heads, seq_q, head_dim).
      key: (batch, kv_heads, seq_kv, head_dim); ``kv_heads`` divides ``heads``.
      value: like ``key``.
      mask: boolean, broadcastable to (batch, heads, seq_q, seq_kv); True means attend.
      score_mod: applied to the scaled scores with absolute (batch, head, query, key) indices.
      dropout_rng: must be None unless dropout is inactive.
      dropout_rate: must be 0 unless ``deterministic``; the kernel has no dropout.
      deterministic: no dropout when True.
      block_q: forward query tile (power of two >= 16; shrunk for short sequences).
      block_kv: forward key tile (power of two >= 16). At head_dim <= 128 on an H100,
        :data:`FAST_FORWARD_BLOCK_KV` (64) ran masked forwards 5-16% faster than this default
        128; ``MultiHeadAttention`` and :func:`~attnax.kernels.flash_attention` pass it.
      force_fallback: use memory_efficient_attention instead of the kernel.
      interpret: run the Pallas kernels in interpret mode (CPU tests).
      scale: score scale, ``1 / sqrt(head_dim)`` by default.

    Returns:
      (batch, heads, seq_q, head_dim) in the query's dtype; a row with no allowed key is zero.

    Raises:
      ValueError: for shapes that do not fit together or bad block sizes.
      NotImplementedError: for active dropout, or a mod that holds arrays the kernel cannot tile.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 16, 16))
      >>> kv = jax.random.normal(jax.random.key(1), (1, 2, 16, 16))
      >>> out = attnax.pallas_flash_attention(  # interpret=True runs the kernel on any backend
      ...     q, kv, kv, score_mod=attnax.causal_mod(), block_q=16, block_kv=16, interpret=True)
      >>> ref = attnax.standard_attention(q, kv, kv, score_mod=attnax.causal_mod())
      >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
      ((1, 2, 16, 16), True)
    """
    query, key, value = check_qkv(query, key, value, name=NAME)
    check_mask(mask, query, key, name=NAME)
    if check_dropout(dropout_rate, dropout_rng, deterministic, name=NAME):
        raise NotImplementedError(
            f"{NAME}: attention dropout is not implemented in the Pallas kernel; use "
            "standard_attention or memory_efficient_attention for dropout_rate > 0."
        )
    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        _check_block(name, block)
    config = default_config(query.shape[-1], block_q, block_kv, interpret)
    if force_fallback or (jax.default_backend() != "gpu" and not interpret):
        out: AttentionOutput = fallback(NAME)(
            query,
            key,
            value,
            mask=mask,
            score_mod=score_mod,
            scale=scale,
            block_size=block_kv,
            dropout_rng=dropout_rng,
            dropout_rate=dropout_rate,
            deterministic=deterministic,
        )
        return out
    return flash_attention_with_config(
        query, key, value, config=config, mask=mask, score_mod=score_mod, scale=scale
    )


def _check_block(name: str, block: object) -> None:
    """A forward tile of the public entry: a power of two >= 16 (an int, not a bool)."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 16 or not is_power_of_two(
        block
    ):
        raise ValueError(f"{NAME}: `{name}` must be a power of two >= 16, got {block!r}.")
