"""The one backend table: from :class:`AttentionType` to the kernels that serve it.

Every choice of backend reads :data:`BACKENDS` and nothing else: the layer builds its kernel
from a row, the cache decodes with the row's decode path, the spec's rules ask a row what it can
apply, and ``attnax bench`` times each row's kernel. A row's fallback serves the calls its kernel
declines; the kernels reach it through ``attnax.kernels._fallback`` (registered at the bottom of
this module), so no kernel imports another kernel's public entry.
"""

import dataclasses
import enum
import functools
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax.numpy as jnp
from jaxtyping import Array

from ._checks import check_attention_output
from ._mods import CausalMask, split_score_mod
from ._typing import AttentionFn, AttentionMask, ScoreMod
from .kernels._common import cuda_compute_capability
from .kernels._fallback import FallbackKernel, register_fallback
from .kernels._flash import flash_attention, flash_attention_bthd
from .kernels.linear import linear_attention
from .kernels._lite import lite_attention
from .kernels.memory_efficient import memory_efficient_attention
from .kernels.pallas_flash import FAST_FORWARD_BLOCK_KV, pallas_flash_attention
from .kernels._standard import standard_attention

__all__ = ["BACKENDS", "AttentionType", "Backend", "KernelSettings", "LayerKernel"]


class AttentionType(str, enum.Enum):
    """The built-in attention backends a layer can use.

    Attributes:
      STANDARD: :func:`attnax.standard_attention`, the dense reference.
      MEMORY_EFFICIENT: :func:`attnax.memory_efficient_attention`, tiled, O(T * D) memory.
      FLASH: :func:`attnax.flash_attention` (cuDNN or Pallas on GPU, else memory-efficient).
      PALLAS_FLASH: :func:`attnax.pallas_flash_attention`.
      LINEAR: :func:`attnax.linear_attention` (no per-pair scores).
      LITE: :func:`attnax.lite_attention` (no per-pair scores).

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> attnax.AttentionType("flash") is attnax.AttentionType.FLASH
      True
      >>> [member.value for member in attnax.AttentionType]
      ['standard', 'memory_efficient', 'flash', 'pallas_flash', 'linear', 'lite']
    """

    STANDARD = "standard"
    MEMORY_EFFICIENT = "memory_efficient"
    FLASH = "flash"
    PALLAS_FLASH = "pallas_flash"
    LINEAR = "linear"
    LITE = "lite"

    @property
    def is_softmax(self) -> bool:
        """Whether this backend forms per-pair softmax scores, so it computes the function
        STANDARD computes and applies any score mod (read from the backend table)."""
        return BACKENDS[self].pair_scores


class LayerKernel(Protocol):
    """A kernel in the layer's (batch, seq, heads, head_dim) layout, in and out."""

    def __call__(
        self,
        query: Array,
        key: Array,
        value: Array,
        *,
        mask: AttentionMask | None = None,
        score_mod: ScoreMod | None = None,
        **extra: Any,
    ) -> Array: ...


@dataclasses.dataclass(frozen=True)
class KernelSettings:
    """The spec fields a row's layer kernel is built from.

    Attributes:
      block_size: ``attention_block_size``, the tile of the blockwise backends.
      chunk_size: ``linear_attention_chunk_size``, LINEAR's chunk.
    """

    block_size: int
    chunk_size: int


@dataclasses.dataclass(frozen=True)
class Backend:
    """One row of the table.

    Attributes:
      attention_type: the row's key.
      kernel: the public (batch, heads, seq, head_dim) kernel.
      layer_kernel: builds the kernel the layer calls, in its (batch, seq, heads, head_dim)
        layout, from the spec's settings.
      pair_scores: whether the kernel forms per-(query, key) scores, so that any score mod,
        mask mod or window applies. Without them only causal masking applies.
      fallback: what serves the calls ``kernel`` declines (None: it declines none).
      fallback_note: when the fallback serves, in words (for docs and errors).
      no_decode_reason: None where the row decodes over a KV cache with the cache's split-KV
        decode kernels, else why it cannot.
      gated: whether the layer builds a gate projection for the kernel (LITE).
      dense_scores: whether the kernel holds the whole (seq_q, seq_kv) score matrix in memory
        (STANDARD), so ``attnax bench`` skips lengths it cannot hold.
      timed_causal_only: ``attnax bench`` times only the causal form (LINEAR: its non-causal
        form is a different function, with no softmax row to compare it to).
    """

    attention_type: AttentionType
    kernel: Callable[..., Array]
    layer_kernel: Callable[[KernelSettings], LayerKernel]
    pair_scores: bool
    fallback: FallbackKernel | None = None
    fallback_note: str = ""
    no_decode_reason: str | None = None
    gated: bool = False
    dense_scores: bool = False
    timed_causal_only: bool = False

    @property
    def name(self) -> str:
        """The row's ``attention_type`` value, as users spell it."""
        return self.attention_type.value

    def score_mod_refusal(self, score_mod: ScoreMod | None) -> str | None:
        """Why this row cannot apply ``score_mod`` (None when it can)."""
        if self.pair_scores or score_mod is None:
            return None
        mask_mod, value_mod = split_score_mod(score_mod)
        if value_mod is None and (mask_mod is None or isinstance(mask_mod, CausalMask)):
            return None
        return (
            f"attention_type={self.name!r} has no per-pair scores, so it can apply no score mod "
            f"but causal masking (got {type(score_mod).__name__}); use one of "
            f"{', '.join(repr(name) for name in softmax_backend_names())}, which apply any "
            "score mod, or drop the mod."
        )

    def refuse_score_mod(self, score_mod: ScoreMod | None) -> bool:
        """Raise ``NotImplementedError`` for a mod this row cannot apply; else whether the mod
        asks for causal masking (the only one a row without pair scores applies)."""
        refusal = self.score_mod_refusal(score_mod)
        if refusal is not None:
            raise NotImplementedError(refusal)
        mask_mod, _ = split_score_mod(score_mod)
        return isinstance(mask_mod, CausalMask)


# --------------------------------------------------------------------------- layer kernels


def _bhtd(kernel: AttentionFn | Callable[..., Array]) -> LayerKernel:
    """Adapt a (batch, heads, seq, head_dim) kernel to the layer's (batch, seq, heads, dim)."""

    def run(query: Array, key: Array, value: Array, **kwargs: Any) -> Array:
        out = kernel(
            jnp.swapaxes(query, 1, 2),
            jnp.swapaxes(key, 1, 2),
            jnp.swapaxes(value, 1, 2),
            **kwargs,
        )
        return jnp.swapaxes(out, 1, 2)

    return run


def user_layer_kernel(attention_fn: AttentionFn) -> LayerKernel:
    """The layer kernel of a user ``attention_fn`` (which beats any row of the table)."""

    def run(query: Array, key: Array, value: Array, **kwargs: Any) -> Array:
        query_bhtd = jnp.swapaxes(query, 1, 2)
        out = attention_fn(
            query_bhtd, jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2), **kwargs
        )
        check_attention_output(out, query_bhtd, source="attention_fn")
        return jnp.swapaxes(out, 1, 2)

    return run


def _standard_layer(settings: KernelSettings) -> LayerKernel:
    return _bhtd(standard_attention)


def _memory_efficient_layer(settings: KernelSettings) -> LayerKernel:
    return _bhtd(functools.partial(memory_efficient_attention, block_size=settings.block_size))


def _flash_layer(settings: KernelSettings) -> LayerKernel:
    # cuDNN takes the layer's (B, T, H, D) layout as it is: no transposes around the kernel.
    kernel: LayerKernel = functools.partial(flash_attention_bthd, block_size=settings.block_size)
    return kernel


def _pallas_flash_layer(settings: KernelSettings) -> LayerKernel:
    # Triton tiles want powers of two with at least 16 rows per dot; larger than 128 spills.
    block = 1 << (settings.block_size.bit_length() - 1)
    block = max(16, min(block, 128))
    # At most FAST_FORWARD_BLOCK_KV keys per forward tile (why: at its definition).
    key_block = min(block, FAST_FORWARD_BLOCK_KV)
    return _bhtd(
        functools.partial(pallas_flash_attention, block_q=block, block_kv=key_block)
    )


def _linear_layer(settings: KernelSettings) -> LayerKernel:
    chunk = settings.chunk_size
    row = BACKENDS[AttentionType.LINEAR]

    def run(query: Array, key: Array, value: Array, *, mask: AttentionMask | None = None,
            score_mod: ScoreMod | None = None, **kwargs: Any) -> Array:
        causal = row.refuse_score_mod(score_mod)
        seq = query.shape[1]
        if causal and seq % chunk != 0:
            # Causal chunking needs whole chunks: pad at the end, where no real query looks.
            pad = chunk - seq % chunk
            widths = ((0, 0), (0, pad), (0, 0), (0, 0))
            query, key, value = (jnp.pad(x, widths) for x in (query, key, value))
            if mask is not None and mask.shape[-1] != 1:
                mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, pad)), constant_values=False)
        out = _bhtd(functools.partial(linear_attention, causal=causal, chunk_size=chunk))(
            query, key, value, mask=mask, **kwargs
        )
        return out[:, :seq]

    return run


def _lite_layer(settings: KernelSettings) -> LayerKernel:
    row = BACKENDS[AttentionType.LITE]

    def run(query: Array, key: Array, value: Array, *, score_mod: ScoreMod | None = None,
            gate: Array | None = None, **kwargs: Any) -> Array:
        causal = row.refuse_score_mod(score_mod)
        gate_bhtd = None if gate is None else jnp.swapaxes(gate, 1, 2)
        return _bhtd(functools.partial(lite_attention, causal=causal, gate=gate_bhtd))(
            query, key, value, **kwargs
        )

    return run


# --------------------------------------------------------------------------- fallbacks


def _memory_efficient_fallback(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: AttentionMask | None,
    score_mod: ScoreMod | None,
    scale: float | None,
    block_size: int,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
) -> Array:
    out: Array = memory_efficient_attention(
        query, key, value, mask=mask, score_mod=score_mod, scale=scale, block_size=block_size,
        dropout_rng=dropout_rng, dropout_rate=dropout_rate, deterministic=deterministic,
    )
    return out


_HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _flash_fallback(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: AttentionMask | None,
    score_mod: ScoreMod | None,
    scale: float | None,
    block_size: int,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
) -> Array:
    """PALLAS_FLASH on an NVIDIA GPU for 2-byte inputs, MEMORY_EFFICIENT otherwise."""
    if cuda_compute_capability() is not None and jnp.dtype(query.dtype) in _HALF_DTYPES:
        out: Array = pallas_flash_attention(
            query, key, value, mask=mask, score_mod=score_mod, scale=scale,
            dropout_rng=dropout_rng, dropout_rate=dropout_rate, deterministic=deterministic,
            block_kv=FAST_FORWARD_BLOCK_KV,
        )
        return out
    return _memory_efficient_fallback(
        query, key, value, mask=mask, score_mod=score_mod, scale=scale, block_size=block_size,
        dropout_rng=dropout_rng, dropout_rate=dropout_rate, deterministic=deterministic,
    )


# --------------------------------------------------------------------------- the table

_NO_RECURRENT_CACHE = (
    "it never forms per-pair scores, so a cache of keys and values does not describe its state "
    "(it would need a recurrent state cache, which attnax does not have)"
)

BACKENDS: Mapping[AttentionType, Backend] = {
    row.attention_type: row
    for row in (
        Backend(
            AttentionType.STANDARD,
            standard_attention,
            _standard_layer,
            pair_scores=True,
            dense_scores=True,
        ),
        Backend(
            AttentionType.MEMORY_EFFICIENT,
            memory_efficient_attention,
            _memory_efficient_layer,
            pair_scores=True,
        ),
        Backend(
            AttentionType.FLASH,
            flash_attention,
            _flash_layer,
            pair_scores=True,
            fallback=_flash_fallback,
            fallback_note=(
                "calls cuDNN cannot take (a mod other than causal, window and bias; float32; no "
                "GPU) go to PALLAS_FLASH on an NVIDIA GPU for bf16/fp16 inputs, else to "
                "MEMORY_EFFICIENT"
            ),
        ),
        Backend(
            AttentionType.PALLAS_FLASH,
            pallas_flash_attention,
            _pallas_flash_layer,
            pair_scores=True,
            fallback=_memory_efficient_fallback,
            fallback_note=(
                "off the GPU without interpret=True, and with force_fallback=True, calls go to "
                "MEMORY_EFFICIENT (block_size = block_kv)"
            ),
        ),
        Backend(
            AttentionType.LINEAR,
            linear_attention,
            _linear_layer,
            pair_scores=False,
            no_decode_reason=_NO_RECURRENT_CACHE,
            timed_causal_only=True,
        ),
        Backend(
            AttentionType.LITE,
            lite_attention,
            _lite_layer,
            pair_scores=False,
            no_decode_reason=_NO_RECURRENT_CACHE,
            gated=True,
        ),
    )
}


def softmax_backend_names() -> tuple[str, ...]:
    """The rows that apply any score mod (they form per-pair scores), as users spell them,
    fastest first (the table lists them from the reference up)."""
    return tuple(reversed([row.name for row in BACKENDS.values() if row.pair_scores]))


for _row in BACKENDS.values():
    if _row.fallback is not None:
        register_fallback(getattr(_row.kernel, "__name__"), _row.fallback)
del _row
# ring_attention is no row (it is sequence parallelism over a mesh axis, not a backend of its
# own), but outside a bound mesh axis of two or more devices it has no ring to run and hands the
# call to MEMORY_EFFICIENT through the same door.
register_fallback("ring_attention", _memory_efficient_fallback)
