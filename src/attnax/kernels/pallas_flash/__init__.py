"""PALLAS_FLASH: FlashAttention-2 in Pallas (Triton on any GPU, Mosaic GPU for full attention on
Hopper), with score mods in the inner loop and block-sparse skipping.

The public entry is :func:`pallas_flash_attention`; :func:`flash_attention_with_config` exposes
every tile and launch knob (:class:`FlashConfig`). The other names here are the pieces the
memory-efficient kernel's GPU path and the ring's Pallas pairs build on: the configurations
(:func:`default_config`, :func:`stepped_config`), whether a mod tiles (:func:`kernel_can_tile`),
and the padded forward and backward calls (:func:`prepare`, :func:`forward`, :func:`row_terms`,
:func:`dkv_call`, :func:`dq_call`).
"""

from .api import flash_attention_with_config as flash_attention_with_config
from .api import forward as forward
from .api import pallas_flash_attention as pallas_flash_attention
from .config import FAST_FORWARD_BLOCK_KV as FAST_FORWARD_BLOCK_KV
from .config import FlashConfig as FlashConfig
from .config import default_config as default_config
from .config import stepped_config as stepped_config
from .plan import Prepared as Prepared
from .plan import prepare as prepare
from .tile_mods import kernel_can_tile as kernel_can_tile
from .triton_vjp import dkv_call as dkv_call
from .triton_vjp import dq_call as dq_call
from .triton_vjp import row_terms as row_terms

__all__ = [
    "FAST_FORWARD_BLOCK_KV",
    "FlashConfig",
    "Prepared",
    "default_config",
    "dkv_call",
    "dq_call",
    "flash_attention_with_config",
    "forward",
    "kernel_can_tile",
    "pallas_flash_attention",
    "prepare",
    "row_terms",
    "stepped_config",
]
