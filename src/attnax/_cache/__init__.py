"""KV caches for autoregressive decoding: contiguous (per layer) and paged (block table).

Both caches are frozen dataclasses registered as JAX pytrees, so they pass through ``jit``,
``lax.scan`` and ``nnx.jit`` and are updated functionally (every operation returns a new
cache). Positions are absolute: row ``b`` holds tokens ``0 .. length[b] - 1`` and the next
``T`` new tokens take positions :func:`cache_positions` ``= length[b] + arange(T)``, which is
where the layer rotates them with RoPE and where score mods, the causal mask and the sliding
window see them. A prefill followed by one-token steps therefore equals the full causal pass.

Overflow is never silent. Outside ``jit`` (concrete values) a write beyond the capacity raises
``ValueError`` naming the capacity and the requested length. Under ``jit`` the row's write is
dropped (no stored token is overwritten, its length does not move) and its ``overflow`` flag
is set; with shape checks on (:func:`attnax.shape_checks`) it is also a checkify error, which
the caller sees by functionalising the step::

    from jax.experimental import checkify
    err, (out, cache) = checkify.checkify(jax.jit(step))(x, cache)
    err.throw()  # raises JaxRuntimeError: "KV cache overflow: capacity ..., requested ..."

Without ``checkify.checkify`` the check is a no-op (``checkify.debug_check``), so checked code
still jits.

Package map: :mod:`.contiguous` holds :class:`KVLayerCache` with :func:`init_kv_layer_cache` /
:func:`update_kv_layer_cache`; :mod:`.paged` holds :class:`PagedKVCache` with
:func:`init_paged_kv_cache`, the eager :func:`append_kv`, the jittable :func:`append_kv_batched`
and :func:`gather_kv`; :mod:`.allocator` the eager :func:`allocate_blocks`,
:func:`free_sequence` and the host-side :class:`BlockAllocator`; :mod:`.paged_attention`
:func:`paged_attention` / :func:`paged_attention_batched`; :mod:`.attend`, for the layer,
:func:`cache_positions` and :func:`attend_with_cache`; :mod:`.checks` the validation they
share. The decode kernels themselves (plain arrays in, no cache types) live in
:mod:`attnax.kernels.decode` (contiguous and paged).
"""

from .allocator import BlockAllocator as BlockAllocator
from .allocator import allocate_blocks as allocate_blocks
from .allocator import free_sequence as free_sequence
from .attend import attend_with_cache as attend_with_cache
from .attend import cache_positions as cache_positions
from .contiguous import KVLayerCache as KVLayerCache
from .contiguous import init_kv_layer_cache as init_kv_layer_cache
from .contiguous import update_kv_layer_cache as update_kv_layer_cache
from .paged import PagedKVCache as PagedKVCache
from .paged import append_kv as append_kv
from .paged import append_kv_batched as append_kv_batched
from .paged import gather_kv as gather_kv
from .paged import init_paged_kv_cache as init_paged_kv_cache
from .paged_attention import paged_attention as paged_attention
from .paged_attention import paged_attention_batched as paged_attention_batched

__all__ = [
    "BlockAllocator",
    "KVLayerCache",
    "PagedKVCache",
    "allocate_blocks",
    "append_kv",
    "append_kv_batched",
    "attend_with_cache",
    "cache_positions",
    "free_sequence",
    "gather_kv",
    "init_kv_layer_cache",
    "init_paged_kv_cache",
    "paged_attention",
    "paged_attention_batched",
    "update_kv_layer_cache",
]
