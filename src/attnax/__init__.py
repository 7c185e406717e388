"""attnax: strictly typed attention for JAX and Flax NNX."""

from ._checks import shape_checks as shape_checks
from ._checks import shape_checks_enabled as shape_checks_enabled
from ._typing import AttentionFn as AttentionFn
from ._typing import MaskMod as MaskMod
from ._typing import ScoreMod as ScoreMod
from .kernels import standard_attention as standard_attention

__all__ = [
    "AttentionFn",
    "MaskMod",
    "ScoreMod",
    "shape_checks",
    "shape_checks_enabled",
    "standard_attention",
]
