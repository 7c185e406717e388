"""Pieces every softmax kernel shares: argument checks, scale, masked scores, safe softmax."""

import inspect
import math
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from .._checks import check_float_inputs
from .._typing import AttentionMask, MaskMod, ScoreIndex, ScoreMod
from ._dtypes import promote_qkv

__all__ = [
    "accumulation_dtype",
    "apply_score_mods",
    "check_dropout",
    "check_qkv",
    "cuda_compute_capability",
    "cudnn_internals",
    "cudnn_internals_have",
    "default_scale",
    "kernel_outputs",
    "safe_normaliser",
    "safe_row_max",
    "vary_like",
    "varying_axes",
]


Layout = Literal["bhtd", "bthd"]

# JAX's own cuDNN attention module (private): its entry points take a layout argument and
# return the log-sum-exp, which jax.nn.dot_product_attention does not expose. Typed Any (its
# signatures are not ours); None on a JAX without it, where callers keep their public paths.
cudnn_internals: Any
try:
    from jax._src.cudnn import fused_attention_stablehlo as _cudnn_module
except ImportError:  # pragma: no cover - depends on the JAX release
    cudnn_internals = None
else:
    cudnn_internals = _cudnn_module


def cudnn_internals_have(*names: str) -> bool:
    """Whether this JAX's cuDNN module exists and has every one of ``names``."""
    return cudnn_internals is not None and all(hasattr(cudnn_internals, n) for n in names)


_LAYOUT_NAMES = {"bhtd": "(batch, heads, seq, head_dim)", "bthd": "(batch, seq, heads, head_dim)"}


def _axes(layout: Layout) -> tuple[int, int]:
    """(heads axis, sequence axis) of a rank-4 array in ``layout``."""
    return (1, 2) if layout == "bhtd" else (2, 1)


def check_qkv(
    query: Array, key: Array, value: Array, *, name: str, layout: Layout = "bhtd"
) -> tuple[Array, Array, Array]:
    """Validate dtypes, ranks, head grouping and head_dim with errors that name the argument.

    These checks are free (static dtypes and shapes) and always on: a wrong layout or an integer
    input must never produce a silent wrong answer, whether or not jaxtyping checks are enabled.
    ``layout`` says where the heads axis is ("bthd" is cuDNN's order, used by
    ``flash_attention_bthd``).

    Returns:
      query, key and value in their promoted dtype (:func:`attnax.kernels._dtypes.promote_qkv`:
      mixed floating dtypes are promoted as ``jnp.result_type`` promotes them); kernels go on
      with these.
    """
    check_float_inputs(name, query=query, key=key, value=value)
    heads_axis, _ = _axes(layout)
    for arg, array in (("query", query), ("key", key), ("value", value)):
        if array.ndim != 4:
            raise ValueError(
                f"{name}: `{arg}` must have rank 4 {_LAYOUT_NAMES[layout]}, got shape "
                f"{array.shape}."
            )
    if key.shape != value.shape:
        raise ValueError(
            f"{name}: `key` {key.shape} and `value` {value.shape} must have the same shape."
        )
    if query.shape[0] != key.shape[0]:
        raise ValueError(
            f"{name}: `query` batch {query.shape[0]} differs from `key` batch {key.shape[0]}."
        )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"{name}: `query` head_dim {query.shape[-1]} differs from `key` head_dim "
            f"{key.shape[-1]}."
        )
    if query.shape[heads_axis] % key.shape[heads_axis] != 0:
        raise ValueError(
            f"{name}: `key` has {key.shape[heads_axis]} heads, which does not divide the "
            f"query's {query.shape[heads_axis]}; use a key/value head count that divides it."
        )
    return promote_qkv(query, key, value, name=name)


def check_mask(
    mask: AttentionMask | None, query: Array, key: Array, *, name: str, layout: Layout = "bhtd"
) -> None:
    """A mask must be boolean, rank 4 and broadcastable to (B, H, T, S) in every layout."""
    if mask is None:
        return
    heads_axis, seq_axis = _axes(layout)
    target = (query.shape[0], query.shape[heads_axis], query.shape[seq_axis], key.shape[seq_axis])
    if mask.ndim != 4 or any(m not in (1, t) for m, t in zip(mask.shape, target, strict=True)):
        raise ValueError(
            f"{name}: `mask` of shape {mask.shape} is not broadcastable to (batch, heads, seq_q, "
            f"seq_kv) = {target}; give a rank-4 boolean mask (size-1 axes broadcast; the mask "
            "keeps this order whatever the layout of query and key)."
        )
    if mask.dtype != jnp.bool_:
        raise ValueError(
            f"{name}: `mask` must be boolean (True = attend), got dtype {mask.dtype}; use a "
            "score mod (additive_bias_mod) for additive biases."
        )


def check_dropout(
    dropout_rate: float, dropout_rng: jax.Array | None, deterministic: bool, *, name: str
) -> bool:
    """Validate dropout arguments; returns whether dropout is active."""
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"{name}: `dropout_rate` must be in [0, 1), got {dropout_rate}.")
    active = dropout_rate > 0.0 and not deterministic
    if active and dropout_rng is None:
        raise ValueError(
            f"{name}: `dropout_rng` is required when dropout_rate > 0 and deterministic=False."
        )
    return active


def default_scale(head_dim: int, scale: float | None) -> float:
    """``1 / sqrt(head_dim)`` unless the caller gives a scale."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def accumulation_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for half-precision inputs, the input's own dtype otherwise (float32, float64)."""
    return jnp.dtype(jnp.promote_types(dtype, jnp.float32))


def apply_score_mods(
    scores: Float[Array, "*#tile"],
    *,
    mask_mod: MaskMod | None,
    value_mod: ScoreMod | None,
    b_idx: ScoreIndex,
    h_idx: ScoreIndex,
    q_idx: ScoreIndex,
    kv_idx: ScoreIndex,
    allowed: Bool[Array, "*#tile"] | None = None,
) -> tuple[Float[Array, "*#tile"], Bool[Array, "*#tile"] | None]:
    """Apply the value mod, then the mask mod and an extra boolean ``allowed``.

    Returns the modified scores (disallowed set to -inf) and the combined boolean mask (None
    when nothing masks).
    """
    if value_mod is not None:
        scores = value_mod(scores, b_idx, h_idx, q_idx, kv_idx).astype(scores.dtype)
    if mask_mod is not None:
        mod_allowed = jnp.asarray(mask_mod(b_idx, h_idx, q_idx, kv_idx), bool)
        allowed = mod_allowed if allowed is None else allowed & mod_allowed
    if allowed is not None:
        scores = jnp.where(allowed, scores, -jnp.inf)
    return scores, allowed


def safe_row_max(scores: Float[Array, "*rows S"]) -> Float[Array, "*rows 1"]:
    """Row maximum with fully masked rows (all -inf) mapped to 0, so exp() gives 0, not NaN."""
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    return jnp.where(jnp.isfinite(row_max), row_max, 0.0)


def safe_normaliser(denominator: Float[Array, "*rows"]) -> Float[Array, "*rows"]:
    """A softmax denominator with empty rows mapped to 1, so their output is exactly zero."""
    return jnp.where(denominator > 0.0, denominator, 1.0)


def merge_partials(
    out: Float[Array, "*rows D"],
    lse: Float[Array, "*rows"],
    part_out: Float[Array, "*rows D"],
    part_lse: Float[Array, "*rows"],
) -> tuple[Float[Array, "*rows D"], Float[Array, "*rows"]]:
    """Exact merge of two normalised partial softmax results through their log-sum-exps.

    ``out`` (float32) and ``part_out`` are each normalised over their own keys; rows where both
    are empty (log-sum-exp -inf) stay zero with log-sum-exp -inf.
    """
    top = jnp.maximum(lse, part_lse)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w_old = jnp.exp(lse - top)
    w_new = jnp.exp(part_lse - top)
    total = w_old + w_new
    merged_lse = jnp.where(total > 0.0, top + jnp.log(safe_normaliser(total)), -jnp.inf)
    merged = (out * w_old[..., None] + part_out.astype(out.dtype) * w_new[..., None]) / (
        safe_normaliser(total)[..., None]
    )
    return merged, merged_lse


def rotate_ring(tree: Any, axis_name: Hashable, num_shards: int) -> Any:
    """Send every leaf to the next device of the ring over ``axis_name`` (i -> i + 1)."""
    perm = [(j, (j + 1) % num_shards) for j in range(num_shards)]
    return jax.tree_util.tree_map(
        lambda x: jax.lax.ppermute(x, axis_name, perm),  # type: ignore[no-untyped-call]
        tree,
    )


def varying_axes(*arrays: Array) -> frozenset[Hashable]:
    """The mesh axes any of ``arrays`` varies over inside ``shard_map`` (empty outside it)."""
    axes: set[Hashable] = set()
    for array in arrays:
        aval = jax.typeof(array)
        vma = getattr(aval, "vma", None)  # the attribute's name on most JAX releases
        if vma is None:
            manual = getattr(aval, "manual_axis_type", None)  # JAX 0.10's spelling
            vma = () if manual is None else manual.varying
        axes.update(vma)
    return frozenset(axes)


def vary_like(array: Array, axes: frozenset[Hashable]) -> Array:
    """Mark a freshly built ``array`` (a loop's initial carry) as varying over ``axes``.

    Inside ``shard_map`` a ``fori_loop``/``switch`` carry must keep one manual-axis type: zeros
    built with ``jnp.zeros`` are invariant while tiles computed from sharded inputs vary, so the
    initial carry is cast to the inputs' varying axes. A no-op outside ``shard_map``.
    """
    missing = tuple(axes - varying_axes(array))
    if not missing:
        return array
    pcast = getattr(jax.lax, "pcast", None)
    if pcast is not None:
        cast: Array = pcast(array, missing, to="varying")
        return cast
    pvary = getattr(jax.lax, "pvary", None)  # the older spelling
    if pvary is not None:
        cast = pvary(array, missing)
        return cast
    return array


def cuda_compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the default device when it is an NVIDIA GPU, else None."""
    if jax.default_backend() != "gpu":
        return None
    capability = getattr(jax.devices()[0], "compute_capability", None)
    if not isinstance(capability, str):
        return None
    parts = capability.split(".")
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        return None  # not a CUDA capability string (for example a ROCm gfx name)
    return int(parts[0]), int(parts[1])


# JAX 0.10 names a ShapeDtypeStruct's varying mesh axes `manual_axis_type`, other releases `vma`.
_STRUCT_FIELDS = frozenset(inspect.signature(jax.ShapeDtypeStruct).parameters)


def kernel_outputs(inputs: Sequence[Array], *outputs: tuple[tuple[int, ...], Any]) -> list[Any]:
    """``pallas_call`` output types, one per (shape, dtype), varying like the kernel's inputs.

    With ``shard_map``'s ``check_vma`` on (the default), ``pallas_call`` needs every output's
    varying mesh axes, the union of its inputs'; outside ``shard_map`` they are empty.
    """
    aval = jax.typeof(vary_like(inputs[0], varying_axes(*inputs)))
    typed = {
        field: getattr(aval, field)
        for field in ("vma", "manual_axis_type")
        if field in _STRUCT_FIELDS and getattr(aval, field, None) is not None
    }
    return [
        jax.ShapeDtypeStruct(shape, dtype, **typed)  # type: ignore[no-untyped-call]
        for shape, dtype in outputs
    ]
