"""attnax: strictly typed attention for JAX and Flax NNX."""

from . import _backends as _backends  # the backend table; registers the kernels' fallbacks
from ._cache import BlockAllocator as BlockAllocator
from ._cache import KVLayerCache as KVLayerCache
from ._cache import PagedKVCache as PagedKVCache
from ._cache import allocate_blocks as allocate_blocks
from ._cache import append_kv as append_kv
from ._cache import append_kv_batched as append_kv_batched
from ._cache import attend_with_cache as attend_with_cache
from ._cache import cache_positions as cache_positions
from ._cache import free_sequence as free_sequence
from ._cache import gather_kv as gather_kv
from ._cache import init_kv_layer_cache as init_kv_layer_cache
from ._cache import init_paged_kv_cache as init_paged_kv_cache
from ._cache import paged_attention as paged_attention
from ._cache import paged_attention_batched as paged_attention_batched
from ._cache import update_kv_layer_cache as update_kv_layer_cache
from ._checks import shape_checks as shape_checks
from ._checks import shape_checks_enabled as shape_checks_enabled
from ._generate import GenerateResult as GenerateResult
from ._generate import any_overflow as any_overflow
from ._generate import generate as generate
from ._generate import prefill as prefill
from ._interop import as_flax_attention_fn as as_flax_attention_fn
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
from ._sampling import sample_logits as sample_logits
from ._spec import AttentionSpec as AttentionSpec
from ._spec import AttentionType as AttentionType
from ._typing import AttentionFn as AttentionFn
from ._typing import MaskMod as MaskMod
from ._typing import ScoreMod as ScoreMod
from .kernels import decode_attention as decode_attention
from .kernels import flash_attention as flash_attention
from .kernels import from_ring_layout as from_ring_layout
from .kernels import linear_attention as linear_attention
from .kernels import lite_attention as lite_attention
from .kernels import memory_efficient_attention as memory_efficient_attention
from .kernels import paged_decode_attention as paged_decode_attention
from .kernels import pallas_flash_attention as pallas_flash_attention
from .kernels import ring_attention as ring_attention
from .kernels import ring_attention_reference as ring_attention_reference
from .kernels import sharded_ring_attention as sharded_ring_attention
from .kernels import standard_attention as standard_attention
from .kernels import to_ring_layout as to_ring_layout

__all__ = [
    "AttentionFn",
    "AttentionSpec",
    "AttentionType",
    "BlockAllocator",
    "GenerateResult",
    "KVLayerCache",
    "MaskMod",
    "MultiHeadAttention",
    "PagedKVCache",
    "ScoreMod",
    "additive_bias_mod",
    "alibi_mod",
    "alibi_slopes",
    "allocate_blocks",
    "any_overflow",
    "append_kv",
    "append_kv_batched",
    "as_flax_attention_fn",
    "attend_with_cache",
    "cache_positions",
    "causal_mod",
    "combine_masks",
    "compose_score_mods",
    "decode_attention",
    "document_mask_mod",
    "flash_attention",
    "free_sequence",
    "from_ring_layout",
    "gather_kv",
    "generate",
    "init_kv_layer_cache",
    "init_paged_kv_cache",
    "linear_attention",
    "lite_attention",
    "make_causal_mask",
    "make_document_mask",
    "make_padding_mask",
    "make_sliding_window_mask",
    "mask_mod_to_boolean_mask",
    "mask_mod_to_score_mod",
    "memory_efficient_attention",
    "paged_attention",
    "paged_attention_batched",
    "paged_decode_attention",
    "pallas_flash_attention",
    "prefill",
    "prefix_lm_mod",
    "ring_attention",
    "ring_attention_reference",
    "sample_logits",
    "shape_checks",
    "shape_checks_enabled",
    "sharded_ring_attention",
    "shift_positions",
    "sliding_window_mod",
    "softcap_mod",
    "split_score_mod",
    "standard_attention",
    "to_ring_layout",
    "update_kv_layer_cache",
]
