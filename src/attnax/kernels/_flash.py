"""FLASH attention: cuDNN's fused flash attention on NVIDIA GPUs, with documented fallbacks.

The fast path is cuDNN's fused attention. :func:`flash_attention_bthd` calls it through
``jax.nn.dot_product_attention(..., implementation="cudnn")`` in that function's (batch, seq,
heads, head_dim) layout (the layer produces it straight from its projections);
:func:`flash_attention`, the (batch, heads, seq, head_dim) ``AttentionFn``, calls JAX's cuDNN
module with ``qkv_layout="BNTH"``, the same kernel without transposes (with transposes around
jax.nn on a JAX whose module lacks that entry point).

Score mods are translated into cuDNN's own arguments, never into a dense (T, S) mask:

* :class:`~attnax._mods.CausalMask` -> ``is_causal=True`` (top-left aligned, ``q >= kv``, as
  in :func:`~attnax.standard_attention`);
* :class:`~attnax._mods.SlidingWindowMask` ``(w, causal=True)`` -> ``is_causal=True`` and
  ``local_window_size=(w - 1, 0)``: jax's window ``(left, right)`` admits keys in
  ``[q - left, q + right]``, i.e. ``0 <= q - kv < w``; cuDNN receives
  ``sliding_window_length = left + 1 = w`` (keys in ``(q - w, q]``);
* :class:`~attnax._mods.AdditiveBiasMod` (and a composition of several) -> ``bias=``;
* compositions of the above (an intersection of causal and windows is the smallest window).

Everything else routes elsewhere (see :func:`flash_attention`).
"""

import dataclasses
from typing import Any, Literal, TypeAlias

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._checks import positive_int, shape_checked
from .._mods import (
    AdditiveBiasMod,
    AndMask,
    CausalMask,
    SlidingWindowMask,
    ValueChain,
    split_score_mod,
)
from .._typing import (
    AttentionMask,
    AttentionOutput,
    KeyArray,
    MaskMod,
    PRNGKeyArray,
    QueryArray,
    ScoreMod,
    ValueArray,
)
from ._common import (
    check_dropout,
    check_mask,
    check_qkv,
    cuda_compute_capability,
    cudnn_internals,
    cudnn_internals_have,
    default_scale,
)
from ._fallback import fallback

__all__ = ["flash_attention", "flash_attention_bthd"]

QueryBTHD: TypeAlias = Float[Array, "B T H D"]
KeyBTHD: TypeAlias = Float[Array, "B S Hk D"]
ValueBTHD: TypeAlias = Float[Array, "B S Hk D"]
OutputBTHD: TypeAlias = Float[Array, "B T H D"]

_HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# --------------------------------------------------------------------------- planning


@dataclasses.dataclass(frozen=True)
class _CudnnPlan:
    """How a call maps onto ``jax.nn.dot_product_attention``'s own arguments."""

    is_causal: bool
    window_size: int | None  # causal sliding window: 0 <= q - kv < window_size
    biases: tuple[Array, ...]  # each broadcastable to (B, H, T, S)


def _cudnn_mask(mask_mod: MaskMod | None) -> tuple[bool, int | None] | None:
    """(is_causal, causal window) for mask mods cuDNN expresses natively, else None."""
    if mask_mod is None:
        return False, None
    if isinstance(mask_mod, CausalMask):
        return True, None
    if isinstance(mask_mod, SlidingWindowMask):
        # cuDNN has no right window without causal masking (jax raises for it).
        return (True, mask_mod.window_size) if mask_mod.causal else None
    if isinstance(mask_mod, AndMask):
        is_causal, window = False, None
        for part in mask_mod.mask_mods:
            translated = _cudnn_mask(part)
            if translated is None:
                return None
            part_causal, part_window = translated
            is_causal = is_causal or part_causal
            if part_window is not None:
                window = part_window if window is None else min(window, part_window)
        return is_causal, window
    return None


def _cudnn_biases(value_mod: ScoreMod | None) -> tuple[Array, ...] | None:
    """The additive biases of a value mod made only of biases, else None."""
    if value_mod is None:
        return ()
    if isinstance(value_mod, AdditiveBiasMod):
        return (value_mod.bias,)
    if isinstance(value_mod, ValueChain):
        biases: list[Array] = []
        for part in value_mod.score_mods:
            translated = _cudnn_biases(part)
            if translated is None:
                return None
            biases.extend(translated)
        return tuple(biases)
    return None


def cudnn_plan(
    *,
    dtypes: tuple[Any, Any, Any],
    head_dim: int,
    seq_q: int,
    seq_kv: int,
    score_mod: ScoreMod | None,
    compute_capability: tuple[int, int] | None,
) -> _CudnnPlan | None:
    """The cuDNN plan for this call, or None when cuDNN cannot serve it exactly."""
    if compute_capability is None or compute_capability < (8, 0):
        return None  # cuDNN flash attention needs an Ampere or newer NVIDIA GPU
    query_dtype, key_dtype, value_dtype = (jnp.dtype(d) for d in dtypes)
    if query_dtype not in _HALF_DTYPES or not query_dtype == key_dtype == value_dtype:
        return None
    max_head_dim = 256 if compute_capability >= (9, 0) else 128
    if head_dim % 8 != 0 or head_dim > max_head_dim:
        return None
    mask_mod, value_mod = split_score_mod(score_mod)
    translated = _cudnn_mask(mask_mod)
    biases = _cudnn_biases(value_mod)
    if translated is None or biases is None:
        return None
    # cuDNN's backward with a bias needs even sequence lengths (jax raises otherwise).
    if biases and (seq_q % 2 or seq_kv % 2):
        return None
    is_causal, window = translated
    return _CudnnPlan(is_causal=is_causal, window_size=window, biases=biases)


# --------------------------------------------------------------------------- cuDNN call


def _full_ts(x: jax.Array, seq_q: int, seq_kv: int) -> jax.Array:
    """Broadcast the last two axes to (T, S), keeping size-1 batch/head axes (cuDNN's rule)."""
    return jnp.broadcast_to(x, (*x.shape[:2], seq_q, seq_kv))


def heads_major_cudnn_available() -> bool:
    """Whether cuDNN can be called on (B, H, T, D) arrays directly (JAX's private entry point).

    ``jax.nn.dot_product_attention`` takes (B, T, H, D) only, so the (B, H, T, D) entry point
    would transpose its inputs and output (up to 1.5x the time and 3 more (T, H, D) arrays of
    memory: benchmarks/NOTES.md). JAX's own cuDNN module takes the layout as an argument; a
    JAX release without it keeps the transposes.
    """
    return cudnn_internals_have("dot_product_attention", "MaskType")


def _call_dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: jax.Array | None,
    plan: _CudnnPlan,
    scale: float,
    implementation: Literal["xla", "cudnn"],
    layout: Literal["bhtd", "bthd"] = "bthd",
) -> jax.Array:
    """cuDNN attention in ``layout`` with rows that see no key set to zero.

    (B, T, H, D) goes through ``jax.nn.dot_product_attention``; (B, H, T, D) through JAX's
    cuDNN module with ``qkv_layout="BNTH"`` (same kernel, no transposes; only called when
    :func:`heads_major_cudnn_available`). ``implementation="xla"`` runs the same argument
    mapping through jax.nn's XLA path on any backend, which is how it is tested on CPU.
    """
    seq_axis = 2 if layout == "bhtd" else 1
    seq_q, seq_kv = query.shape[seq_axis], key.shape[seq_axis]
    bias: jax.Array | None = None
    for part in plan.biases:
        # Cast to the query dtype: cuDNN adds the bias in the input precision.
        full = _full_ts(jnp.asarray(part), seq_q, seq_kv).astype(query.dtype)
        bias = full if bias is None else bias + full
    dense_mask = None if mask is None else _full_ts(mask, seq_q, seq_kv)
    if layout == "bhtd" and implementation == "cudnn":
        cudnn = cudnn_internals
        # jax.nn's own mapping: causal -> CAUSAL, a causal window w -> sliding_window_length w.
        out: jax.Array = cudnn.dot_product_attention(
            query,
            key,
            value,
            bias,
            dense_mask,
            scale=scale,
            mask_type=cudnn.MaskType.CAUSAL if plan.is_causal else cudnn.MaskType.NO_MASK,
            qkv_layout="BNTH",
            sliding_window_length=plan.window_size,
        )
    else:
        swap = (lambda x: jnp.swapaxes(x, 1, 2)) if layout == "bhtd" else (lambda x: x)
        window = None if plan.window_size is None else (plan.window_size - 1, 0)
        out = swap(
            jax.nn.dot_product_attention(
                swap(query),
                swap(key),
                swap(value),
                bias=bias,
                mask=dense_mask,
                scale=scale,
                is_causal=plan.is_causal,
                local_window_size=window,
                implementation=implementation,
            )
        )
    # A boolean mask becomes a large negative bias inside jax, so a row that sees no key would
    # average all values; attnax's contract is zeros. Only rows a mask can empty are checked.
    row_has_key: jax.Array | None = None  # (B | 1, H | 1, T) in the end
    if dense_mask is not None:
        allowed = dense_mask
        q_pos = jnp.arange(seq_q).reshape(1, 1, seq_q, 1)
        kv_pos = jnp.arange(seq_kv).reshape(1, 1, 1, seq_kv)
        if plan.is_causal:
            allowed = allowed & (q_pos >= kv_pos)
        if plan.window_size is not None:
            allowed = allowed & (q_pos - kv_pos < plan.window_size)
        row_has_key = jnp.any(allowed, axis=-1)
    elif plan.window_size is not None and seq_q > seq_kv + plan.window_size - 1:
        # Queries past the last key by a whole window see no key.
        row_has_key = (jnp.arange(seq_q) <= seq_kv + plan.window_size - 2).reshape(1, 1, -1)
    if row_has_key is not None:
        if layout == "bthd":
            row_has_key = jnp.swapaxes(row_has_key, 1, 2)
        out = jnp.where(row_has_key[..., None], out, jnp.zeros((), out.dtype))
    return out


# --------------------------------------------------------------------------- dispatch


def _cudnn_plan_for(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    seq_q: int,
    seq_kv: int,
    score_mod: ScoreMod | None,
    dropout_active: bool,
    name: str,
) -> _CudnnPlan | None:
    capability = cuda_compute_capability()
    plan = cudnn_plan(
        dtypes=(query.dtype, key.dtype, value.dtype),
        head_dim=query.shape[-1],
        seq_q=seq_q,
        seq_kv=seq_kv,
        score_mod=score_mod,
        compute_capability=capability,
    )
    if plan is not None and dropout_active:
        raise NotImplementedError(
            f"{name}: dropout on the attention weights is not available on the cuDNN path "
            "(jax.nn.dot_product_attention has no dropout); use memory_efficient_attention "
            "or standard_attention for attention dropout, or set dropout_rate=0."
        )
    return plan


# --------------------------------------------------------------------------- public


def _flash(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    layout: Literal["bhtd", "bthd"],
    mask: AttentionMask | None,
    score_mod: ScoreMod | None,
    dropout_rng: PRNGKeyArray | None,
    dropout_rate: float,
    deterministic: bool,
    block_size: int,
    scale: float | None,
    name: str,
) -> jax.Array:
    """Both public entry points: cuDNN runs in either layout (see
    :func:`heads_major_cudnn_available`), the fallbacks in (B, H, T, D); the arrays are
    transposed only for a path that needs the other layout."""
    query, key, value = check_qkv(query, key, value, name=name, layout=layout)
    check_mask(mask, query, key, name=name, layout=layout)
    dropout_active = check_dropout(dropout_rate, dropout_rng, deterministic, name=name)
    positive_int(block_size, "block_size", caller=name)
    seq_axis = 2 if layout == "bhtd" else 1
    plan = _cudnn_plan_for(
        query,
        key,
        value,
        seq_q=query.shape[seq_axis],
        seq_kv=key.shape[seq_axis],
        score_mod=score_mod,
        dropout_active=dropout_active,
        name=name,
    )

    def swap(x: jax.Array) -> jax.Array:
        return jnp.swapaxes(x, 1, 2)

    if plan is None:
        to_bhtd = swap if layout == "bthd" else (lambda x: x)
        # The backend table names who serves what cuDNN cannot (attnax._backends).
        out = fallback("flash_attention")(
            to_bhtd(query),
            to_bhtd(key),
            to_bhtd(value),
            mask=mask,
            score_mod=score_mod,
            dropout_rng=dropout_rng,
            dropout_rate=dropout_rate,
            deterministic=deterministic,
            block_size=block_size,
            scale=scale,
        )
        return to_bhtd(out)
    # cuDNN takes either layout where JAX's cuDNN module is there; else (B, T, H, D) only.
    cudnn_layout = layout if heads_major_cudnn_available() else "bthd"
    to_cudnn = swap if cudnn_layout != layout else (lambda x: x)
    out = _call_dot_product_attention(
        to_cudnn(query),
        to_cudnn(key),
        to_cudnn(value),
        mask=mask,
        plan=plan,
        scale=default_scale(query.shape[-1], scale),
        implementation="cudnn",
        layout=cudnn_layout,
    )
    return to_cudnn(out)


@shape_checked
def flash_attention(
    query: QueryArray,
    key: KeyArray,
    value: ValueArray,
    *,
    mask: AttentionMask | None = None,
    score_mod: ScoreMod | None = None,
    dropout_rng: PRNGKeyArray | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    block_size: int = 512,
    scale: float | None = None,
) -> AttentionOutput:
    """Flash attention in the (batch, heads, seq, head_dim) layout.

    Paths, chosen from static facts (backend, dtypes, head_dim, the score mod's type); paths
    2 and 3 are FLASH's fallback in the backend table (``attnax._backends``), which this kernel
    reaches through ``attnax.kernels._fallback``:

    1. cuDNN (``jax.nn.dot_product_attention(implementation="cudnn")``): NVIDIA GPU with compute
       capability >= 8.0, query/key/value all bf16 or all fp16, head_dim a multiple of 8 and at
       most 256 (128 before Hopper), and a score mod made only of causal masks, causal
       sliding windows and additive biases (a bias also needs even seq_q and seq_kv, which
       cuDNN's backward requires). A dense ``mask`` is passed as cuDNN's ``mask=`` (jax turns
       it into a large negative bias), and rows it leaves without any key are set to zero.
       Dropout is not available here: ``NotImplementedError``.
    2. Pallas flash (``attnax.kernels.pallas_flash.pallas_flash_attention``, 128 x 64
       forward tiles): NVIDIA GPU, bf16/fp16 inputs, and a score mod cuDNN cannot express
       (ALiBi, softcap, document, prefix-LM, non-causal windows, offsets, plain callables) or
       any other reason cuDNN is out (head_dim, mixed dtypes).
    3. :func:`~attnax.kernels.memory_efficient_attention` (``block_size`` is its tile): float32
       or float64 inputs on GPU, and every input on CPU/TPU. Dropout is supported here.

    Args:
      query: (batch, heads, seq_q, head_dim).
      key: (batch, kv_heads, seq_kv, head_dim); ``kv_heads`` divides ``heads`` (cuDNN, Pallas
        and the memory-efficient kernel all take fewer key/value heads natively).
      value: like ``key``.
      mask: boolean, broadcastable to (batch, heads, seq_q, seq_kv); True means attend.
      score_mod: applied to the scaled scores with absolute indices (see the paths).
      dropout_rng: key for dropout on the attention weights.
      dropout_rate: probability of dropping a weight, in [0, 1).
      deterministic: no dropout when True.
      block_size: tile of the memory-efficient fallback (cuDNN and Pallas pick their own).
      scale: score scale, ``1 / sqrt(head_dim)`` by default.

    Returns:
      (batch, heads, seq_q, head_dim) in the query's dtype; rows with no allowed key are zero.

    Raises:
      ValueError: for shapes that do not fit together or bad dropout/block arguments.
      NotImplementedError: dropout on the cuDNN path.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> kv = jax.random.normal(jax.random.key(1), (1, 2, 8, 4))
      >>> out = attnax.flash_attention(q, kv, kv, score_mod=attnax.causal_mod())
      >>> ref = attnax.standard_attention(q, kv, kv, score_mod=attnax.causal_mod())
      >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
      ((1, 2, 8, 4), True)
    """
    out: AttentionOutput = _flash(
        query,
        key,
        value,
        layout="bhtd",
        mask=mask,
        score_mod=score_mod,
        dropout_rng=dropout_rng,
        dropout_rate=dropout_rate,
        deterministic=deterministic,
        block_size=block_size,
        scale=scale,
        name="flash_attention",
    )
    return out


@shape_checked(head_axis=2)
def flash_attention_bthd(
    query: QueryBTHD,
    key: KeyBTHD,
    value: ValueBTHD,
    *,
    mask: AttentionMask | None = None,
    score_mod: ScoreMod | None = None,
    dropout_rng: PRNGKeyArray | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    block_size: int = 512,
    scale: float | None = None,
) -> OutputBTHD:
    """:func:`flash_attention` in cuDNN's (batch, seq, heads, head_dim) layout.

    For the layer, which can produce this layout from its projections for free: the cuDNN path
    then runs without any transpose. Fallback paths transpose to (batch, heads, seq, head_dim)
    and back. ``mask`` and score-mod indices keep the (batch, heads, seq_q, seq_kv) order.
    Arguments, paths and errors are those of :func:`flash_attention`; shapes are checked by
    jaxtyping (``"B T H D"``, ``"B S Hk D"``) when shape checks are on.
    """
    out: OutputBTHD = _flash(
        query,
        key,
        value,
        layout="bthd",
        mask=mask,
        score_mod=score_mod,
        dropout_rng=dropout_rng,
        dropout_rate=dropout_rate,
        deterministic=deterministic,
        block_size=block_size,
        scale=scale,
        name="flash_attention_bthd",
    )
    return out
