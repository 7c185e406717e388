"""FlexAttention-style score mods and mask mods, mask builders, and block sparsity.

A *mask mod* says which (query, key) pairs may attend; a *score mod* rewrites scores. Built-in
mods are frozen dataclasses registered as JAX pytrees: their arrays (document ids, prefix
lengths, a bias) are leaves, so mods pass through ``jit``, ``grad`` and ``vmap`` like any other
argument, and a learnable bias receives its gradient.

Masking score mods (:class:`MaskScoreMod`) keep their mask mod, also through
:func:`compose_score_mods` and :func:`shift_positions`, so kernels can recover it with
:func:`split_score_mod` and skip whole blocks that the mask rules out
(:func:`block_sparsity`). Inside a composition, mask components exclude their positions
whatever their place in the order; value components (ALiBi, softcap, a bias) apply left to
right. A plain user callable keeps working, without block skipping.

The pieces: ``masks`` (mask-mod classes), ``values`` (score-mod classes), ``constructors`` (the
public ``*_mod`` functions), ``compose`` (composition and the mask/value split), ``builders``
(dense boolean masks), ``blocks`` (block sparsity) and ``offsets`` (shifted positions).
"""

from .blocks import BLOCK_EMPTY as BLOCK_EMPTY
from .blocks import BLOCK_FULL as BLOCK_FULL
from .blocks import BLOCK_PARTIAL as BLOCK_PARTIAL
from .blocks import block_sparsity as block_sparsity
from .blocks import block_sparsity_from_mask as block_sparsity_from_mask
from .builders import make_causal_mask as make_causal_mask
from .builders import make_document_mask as make_document_mask
from .builders import make_padding_mask as make_padding_mask
from .builders import make_sliding_window_mask as make_sliding_window_mask
from .builders import mask_mod_to_boolean_mask as mask_mod_to_boolean_mask
from .compose import ComposedScoreMod as ComposedScoreMod
from .compose import combine_masks as combine_masks
from .compose import compose_score_mods as compose_score_mods
from .compose import shift_positions as shift_positions
from .compose import split_score_mod as split_score_mod
from .constructors import additive_bias_mod as additive_bias_mod
from .constructors import alibi_mod as alibi_mod
from .constructors import alibi_slopes as alibi_slopes
from .constructors import causal_mod as causal_mod
from .constructors import document_mask_mod as document_mask_mod
from .constructors import mask_mod_to_score_mod as mask_mod_to_score_mod
from .constructors import prefix_lm_mod as prefix_lm_mod
from .constructors import sliding_window_mod as sliding_window_mod
from .constructors import softcap_mod as softcap_mod
from .masks import AndMask as AndMask
from .masks import BlockOverlapMask as BlockOverlapMask
from .masks import BoxMask as BoxMask
from .masks import CausalMask as CausalMask
from .masks import DocumentMask as DocumentMask
from .masks import OffsetMask as OffsetMask
from .masks import PrefixLMMask as PrefixLMMask
from .masks import SlidingWindowMask as SlidingWindowMask
from .values import AdditiveBiasMod as AdditiveBiasMod
from .values import AlibiMod as AlibiMod
from .values import MaskScoreMod as MaskScoreMod
from .values import OffsetScoreMod as OffsetScoreMod
from .values import SoftcapMod as SoftcapMod
from .values import ValueChain as ValueChain

__all__ = [
    "BLOCK_EMPTY",
    "BLOCK_FULL",
    "BLOCK_PARTIAL",
    "AdditiveBiasMod",
    "AlibiMod",
    "AndMask",
    "BlockOverlapMask",
    "BoxMask",
    "CausalMask",
    "ComposedScoreMod",
    "DocumentMask",
    "MaskScoreMod",
    "OffsetMask",
    "OffsetScoreMod",
    "PrefixLMMask",
    "SlidingWindowMask",
    "SoftcapMod",
    "ValueChain",
    "additive_bias_mod",
    "alibi_mod",
    "alibi_slopes",
    "block_sparsity",
    "block_sparsity_from_mask",
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
    "shift_positions",
    "sliding_window_mod",
    "softcap_mod",
    "split_score_mod",
]
