"""Memory-efficient attention: online softmax over tiles, FlashAttention-2 style backward.

The forward walks query blocks (outer loop) and key blocks (inner loop) with ``lax.fori_loop``,
keeping a float32 running maximum, denominator and accumulator per query row, so no (T, S)
matrix ever exists and the compiled program does not grow with the sequence length. It saves
only the output and the per-row log-sum-exp. The backward (a ``jax.custom_vjp``) walks key
blocks (outer) and query blocks (inner), recomputes each probability tile from the saved
log-sum-exp and accumulates dQ, dK and dV blockwise (Dao, "FlashAttention-2", 2023, Alg. 2), so
activation memory is O(T * D) in both passes.

Masks are described per tile: the mask part of the score mod and the dense ``mask`` are turned
into block classes (:func:`attnax._mods.block_sparsity`); query blocks only visit the range of
key blocks that holds an allowed pair, ``lax.switch`` skips empty tiles inside that range, and
full tiles skip the mask evaluation. Grouped-query heads are handled by viewing the query as
(B, Hk, G, T, D), never by repeating key/value heads.

On an NVIDIA GPU the tiles above are XLA fusions that write every float32 score tile to memory
and read it back three times, which caps them below XLA's own dense attention's speed times two
(``benchmarks/NOTES.md``). There, for half-precision inputs without dropout and with built-in
mods, the same loop runs with a fused tile: an XLA ``lax.scan`` over steps of ``block_size``
keys, each step one Pallas kernel (PALLAS_FLASH's forward, reading and writing the float32
running maximum, denominator and accumulator in place) and the FlashAttention-2 backward
kernels given the saved log-sum-exp. ``implementation`` picks a path explicitly.

Modules: ``plan`` (configuration, padding, block classes), ``tiles`` (one tile's indices, mask,
dropout and scores), ``forward`` and ``backward`` (the two loops and the custom_vjp's halves),
``fused`` (the GPU fused-tile path) and ``api`` (the public function and the custom_vjp).
"""

from .api import memory_efficient_attention as memory_efficient_attention

__all__ = ["memory_efficient_attention"]
