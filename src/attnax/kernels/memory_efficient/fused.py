"""The fused GPU tile: PALLAS_FLASH's stepped kernels serve memory_efficient_attention's loop.

On an NVIDIA GPU the XLA tiles write every float32 score tile to memory and read it back three
times (``benchmarks/NOTES.md``); for half-precision inputs without dropout and with built-in
mods an XLA ``lax.scan`` over steps of ``block_size`` keys, one Pallas kernel per step, runs
instead, with the FlashAttention-2 backward kernels given the saved log-sum-exp.
"""

from typing import Any

import jax
import jax.numpy as jnp

from ..._typing import AttentionMask, AttentionOutput, KeyArray, QueryArray, ScoreMod, ValueArray
from .._common import cuda_compute_capability
from ..pallas_flash import flash_attention_with_config, kernel_can_tile, stepped_config
from .plan import NAME

HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def use_fused_tile(
    implementation: Any, query: jax.Array, score_mod: Any, dropout_active: bool
) -> bool:
    """Whether the fused Pallas tile serves this call; ValueError if asked for and it cannot."""
    if implementation not in (None, "xla", "pallas"):
        raise ValueError(
            f"{NAME}: `implementation` must be None, 'xla' or 'pallas', got {implementation!r}."
        )
    if implementation == "xla":
        return False
    refusal = None
    if cuda_compute_capability() is None:
        refusal = "it runs on an NVIDIA GPU only"
    elif dropout_active:
        refusal = "the fused tile has no attention dropout"
    elif not kernel_can_tile(score_mod):
        refusal = (
            "the score mod is not built from attnax's mods (a plain callable may capture "
            "arrays, which a Pallas kernel cannot take)"
        )
    if implementation == "pallas":
        if refusal is not None:
            raise ValueError(
                f"{NAME}: implementation='pallas' cannot serve this call: {refusal}; use "
                "implementation='xla' (or None to choose automatically)."
            )
        return True
    return refusal is None and jnp.dtype(query.dtype) in HALF_DTYPES



def fused_attention(
    query: QueryArray,
    key: KeyArray,
    value: ValueArray,
    *,
    mask: AttentionMask | None,
    score_mod: ScoreMod | None,
    scale: float | None,
    block_size: int,
) -> AttentionOutput:
    """The fused tile's call: steps of ``block_size`` keys, one stepped Pallas kernel each."""
    head_dim, seq_kv = query.shape[3], key.shape[2]
    fused: AttentionOutput = flash_attention_with_config(
        query,
        key,
        value,
        config=stepped_config(head_dim, seq_kv, block_size),
        mask=mask,
        score_mod=score_mod,
        scale=scale,
    )
    return fused
