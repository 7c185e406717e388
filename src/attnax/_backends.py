"""The one backend table: from :class:`AttentionType` to the kernels that serve it.

(Groundwork: for now this module only registers the fallbacks that kernels reach through
``attnax.kernels._fallback``; the table itself follows.)
"""

from jaxtyping import Array

from ._typing import AttentionMask, ScoreMod
from .kernels._fallback import register_fallback
from .kernels._memory_efficient import memory_efficient_attention


def _memory_efficient_fallback(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: AttentionMask | None,
    score_mod: ScoreMod | None,
    scale: float | None,
    block_size: int,
) -> Array:
    out: Array = memory_efficient_attention(
        query, key, value, mask=mask, score_mod=score_mod, scale=scale, block_size=block_size
    )
    return out


register_fallback("pallas_flash_attention", _memory_efficient_fallback)
