"""Validation and planning of a ring call: what runs, or why it cannot.

:func:`bound_axis_size` tells whether there is a ring at all (a mesh axis bound by an
enclosing ``shard_map``); :func:`check_ring_arguments` and :func:`check_ring_shards` raise for
what no path serves; :func:`pair_ring_for` picks the fused pair ring (cuDNN or PALLAS_FLASH
pairs) that serves a call, following the plans :func:`fused_pair_plan` and
:func:`pallas_pair_plan`, or leaves it to the XLA tiles.
"""

import functools
from collections.abc import Callable, Hashable
from typing import Literal, TypeAlias

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool

from ..._checks import positive_int
from ..._mods import CausalMask, split_score_mod
from ..._typing import AttentionMask, AttentionOutput, PRNGKeyArray, ScoreMod
from .._common import check_dropout, check_mask, check_qkv, cuda_compute_capability
from .._flash import cudnn_plan
from .cudnn import flash_ring
from .layout import check_layout
from .pair_kernels import cudnn_pairs_available
from .pallas import pallas_ring

# How ring_attention computes a (query shard, key shard) pair; see its docstring.
FusedPairs: TypeAlias = bool | Literal["cudnn", "pallas"] | None
_FUSED_PAIRS = (None, True, False, "cudnn", "pallas")


def bound_axis_size(axis_name: Hashable | None) -> int | None:
    """The size of mesh axis ``axis_name`` if it is bound here (inside shard_map/pmap), else None.

    ``jax.lax.axis_size`` raises ``NameError`` for an axis name that no enclosing ``shard_map``
    or ``pmap`` binds, and that is the only ``NameError`` the call can raise (its argument is
    already evaluated, so no Python name lookup of ours happens inside it). Catching exactly
    that error is therefore a reliable "am I inside a mapped axis" test that hides nothing else.
    """
    if axis_name is None:
        return None
    try:
        size = jax.lax.axis_size(axis_name)
    except NameError:
        return None
    return int(size)


def check_ring_arguments(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: AttentionMask | None,
    dropout_rng: PRNGKeyArray | None,
    dropout_rate: float,
    deterministic: bool,
    layout: str,
    block_size: int,
    name: str,
) -> bool:
    """Check what every path (ring or single-device) needs; True when dropout is active."""
    check_qkv(query, key, value, name=name)
    check_mask(mask, query, key, name=name)
    dropout_active = check_dropout(dropout_rate, dropout_rng, deterministic, name=name)
    check_layout(layout, name=name)
    positive_int(block_size, "block_size", caller=name)
    return dropout_active


def check_ring_shards(
    query: Array,
    key: Array,
    *,
    mask: AttentionMask | None,
    dropout_active: bool,
    layout: str,
    num_shards: int,
    fused_pairs: FusedPairs,
    name: str,
) -> Bool[Array, "#B #H 1 S"] | None:
    """Check what the ring itself needs; return the key-padding mask broadcast to the keys.

    Raises:
      NotImplementedError: active dropout or a dense query-dependent mask.
      ValueError: a zigzag shard of odd length, or an unknown ``fused_pairs``.
    """
    if dropout_active:
        raise NotImplementedError(
            f"{name}: attention-weight dropout is not implemented in the ring; use "
            "deterministic=True (dropout on the attention output still works in the layer)."
        )
    seq_q, seq_kv = query.shape[2], key.shape[2]
    if layout == "zigzag" and (seq_q % 2 or seq_kv % 2):
        raise ValueError(
            f"{name}: layout='zigzag' needs an even local shard length (two chunks per device), "
            f"got query {seq_q} and key {seq_kv} tokens per device; the global length must be a "
            f"multiple of 2 x {num_shards}."
        )
    key_mask = ring_key_mask(mask, query, key, name=name)
    if fused_pairs not in _FUSED_PAIRS:
        raise ValueError(
            f"{name}: `fused_pairs` must be None, True, False, 'cudnn' or 'pallas', "
            f"got {fused_pairs!r}."
        )
    return key_mask


def ring_key_mask(
    mask: AttentionMask | None, query: Array, key: Array, *, name: str
) -> Bool[Array, "#B #H 1 S"] | None:
    """The ring supports key-padding masks only (their S axis travels with the keys)."""
    if mask is None:
        return None
    if mask.shape[2] != 1:
        raise NotImplementedError(
            f"{name}: a dense `mask` with a query axis (shape {mask.shape}) cannot travel around "
            "the ring; pass a key-padding mask of shape (batch, 1, 1, seq_kv) sharded like the "
            "keys, and express query-dependent masking as a mask mod (score_mod=causal_mod(), "
            "sliding_window_mod(...), document_mask_mod(...)), which sees global positions."
        )
    return jnp.broadcast_to(mask, (*mask.shape[:3], key.shape[2]))


def fused_pair_plan(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: Array | None,
    score_mod: ScoreMod | None,
    layout: str,
) -> tuple[bool, str | None]:
    """(causal, None) when one cuDNN call per shard pair serves this ring, else (_, reason)."""
    if not cudnn_pairs_available():
        return False, "this JAX does not expose the cuDNN attention backward"
    if mask is not None:
        return False, "a key-padding mask is given"
    seq_q, seq_kv = query.shape[2], key.shape[2]
    if seq_q != seq_kv:
        return False, f"query and key shards differ in length ({seq_q} vs {seq_kv})"
    plan = cudnn_plan(
        dtypes=(query.dtype, key.dtype, value.dtype),
        head_dim=query.shape[-1],
        seq_q=seq_q,
        seq_kv=seq_kv,
        score_mod=score_mod,
        compute_capability=cuda_compute_capability(),
    )
    if plan is None or plan.window_size is not None or plan.biases:
        return False, (
            "it needs an NVIDIA GPU (compute capability 8.0+), bf16/fp16 inputs, a supported "
            "head_dim, and a score mod that is None or causal"
        )
    if plan.is_causal and layout not in ("contiguous", "zigzag"):
        return (
            False,
            f"causal pairs are planned for the contiguous and zigzag layouts, not {layout}",
        )
    return plan.is_causal, None


def pallas_pair_plan(
    query: Array,
    key: Array,
    *,
    mask: Array | None,
    score_mod: ScoreMod | None,
    layout: str,
) -> tuple[bool, str | None]:
    """(causal, None) when PALLAS_FLASH pairs serve this ring, else (_, reason)."""
    if jax.default_backend() != "gpu":
        return False, "its kernels need a GPU (Pallas's Triton lowering)"
    if mask is not None:
        return False, "a key-padding mask is given"
    if query.shape[2] != key.shape[2]:
        return False, f"query and key shards differ in length ({query.shape[2]} vs {key.shape[2]})"
    mask_mod, value_mod = split_score_mod(score_mod)
    if value_mod is not None or not (mask_mod is None or isinstance(mask_mod, CausalMask)):
        return False, "the score mod must be None or causal"
    causal = mask_mod is not None
    if causal and layout not in ("contiguous", "zigzag"):
        return False, f"causal pairs need the zigzag or contiguous layout, not {layout}"
    return causal, None



def pair_ring_for(
    query: Array,
    key: Array,
    value: Array,
    *,
    key_mask: Array | None,
    score_mod: ScoreMod | None,
    layout: str,
    fused_pairs: FusedPairs,
    name: str,
) -> Callable[..., AttentionOutput] | None:
    """The fused pair ring that serves this call (``causal`` bound), or None for the XLA tiles.

    The returned ring takes ``(query, key, value, *, axis_name, num_shards, layout, scale)``.

    Raises:
      NotImplementedError: ``fused_pairs`` asks for pairs that cannot serve this call.
    """
    if fused_pairs == "pallas":
        causal, reason = pallas_pair_plan(
            query, key, mask=key_mask, score_mod=score_mod, layout=layout
        )
        kind, fallback = "PALLAS_FLASH", "None for the cuDNN pairs or the XLA tiles"
        run_pairs: Callable[..., AttentionOutput] = pallas_ring
    else:
        causal, reason = fused_pair_plan(
            query, key, value, mask=key_mask, score_mod=score_mod, layout=layout
        )
        kind, fallback = "fused (cuDNN)", "None to fall back to the XLA tiles"
        run_pairs = functools.partial(flash_ring, pair="cudnn")
    if fused_pairs not in (None, False) and reason is not None:
        raise NotImplementedError(
            f"{name}: fused_pairs={fused_pairs!r}, but the {kind} pairs cannot serve this "
            f"call: {reason}; pass fused_pairs={fallback}."
        )
    if fused_pairs is not False and reason is None:
        return functools.partial(run_pairs, causal=causal)
    return None
