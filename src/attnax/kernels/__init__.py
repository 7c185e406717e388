"""Attention kernels: pure functions of arrays, usable without the layer."""

from ._flash import flash_attention as flash_attention
from ._lite import lite_attention as lite_attention
from .memory_efficient import memory_efficient_attention as memory_efficient_attention
from .pallas_flash import pallas_flash_attention as pallas_flash_attention
from .ring import from_ring_layout as from_ring_layout
from .ring import ring_attention as ring_attention
from .ring import ring_attention_reference as ring_attention_reference
from .ring import sharded_ring_attention as sharded_ring_attention
from .ring import to_ring_layout as to_ring_layout
from ._standard import standard_attention as standard_attention
from .decode import decode_attention as decode_attention
from .decode import paged_decode_attention as paged_decode_attention
from .linear import linear_attention as linear_attention

__all__ = [
    "decode_attention",
    "flash_attention",
    "from_ring_layout",
    "linear_attention",
    "lite_attention",
    "memory_efficient_attention",
    "paged_decode_attention",
    "pallas_flash_attention",
    "ring_attention",
    "ring_attention_reference",
    "sharded_ring_attention",
    "standard_attention",
    "to_ring_layout",
]
