"""attnax: strictly typed attention for JAX and Flax NNX."""

from ._cache import KVLayerCache as KVLayerCache
from ._cache import PagedKVCache as PagedKVCache
from ._checks import shape_checks as shape_checks
from ._checks import shape_checks_enabled as shape_checks_enabled
from ._layer import MultiHeadAttention as MultiHeadAttention
from ._mods import additive_bias_mod as additive_bias_mod
from ._mods import alibi_mod as alibi_mod
from ._mods import alibi_slopes as alibi_slopes
from ._mods import causal_mod as causal_mod
from ._mods import combine_masks as combine_masks
from ._mods import compose_score_mods as compose_score_mods
from ._mods import document_mask_mod as document_mask_mod
from ._mods import make_causal_mask as make_causal_mask
from ._mods import make_document_mask as make_document_mask
from ._mods import make_padding_mask as make_padding_mask
from ._mods import make_sliding_window_mask as make_sliding_window_mask
from ._mods import mask_mod_to_boolean_mask as mask_mod_to_boolean_mask
from ._mods import mask_mod_to_score_mod as mask_mod_to_score_mod
from ._mods import prefix_lm_mod as prefix_lm_mod
from ._mods import shift_positions as shift_positions
from ._mods import sliding_window_mod as sliding_window_mod
from ._mods import softcap_mod as softcap_mod
from ._mods import split_score_mod as split_score_mod
from ._spec import AttentionSpec as AttentionSpec
from ._spec import AttentionType as AttentionType
from ._typing import AttentionFn as AttentionFn
from ._typing import MaskMod as MaskMod
from ._typing import ScoreMod as ScoreMod
from .kernels import standard_attention as standard_attention

__all__ = [
    "AttentionFn",
    "AttentionSpec",
    "AttentionType",
    "KVLayerCache",
    "MaskMod",
    "MultiHeadAttention",
    "PagedKVCache",
    "ScoreMod",
    "additive_bias_mod",
    "alibi_mod",
    "alibi_slopes",
    "causal_mod",
    "combine_masks",
    "compose_score_mods",
    "document_mask_mod",
    "make_causal_mask",
    "make_document_mask",
    "make_padding_mask",
    "make_sliding_window_mask",
    "mask_mod_to_boolean_mask",
    "mask_mod_to_score_mod",
    "prefix_lm_mod",
    "shape_checks",
    "shape_checks_enabled",
    "shift_positions",
    "sliding_window_mod",
    "softcap_mod",
    "split_score_mod",
    "standard_attention",
]
