"""Attention kernels: pure functions of arrays, usable without the layer."""

from ._standard import standard_attention as standard_attention

__all__ = ["standard_attention"]
