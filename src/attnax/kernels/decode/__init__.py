"""Split-KV ("flash-decoding") attention for a few query tokens against a long KV cache.

Decoding reads the whole cache for one new token, so it is bound by memory bandwidth, not by
FLOPs. The kernel splits the cache's sequence axis into ``num_splits`` chunks that run as
separate programs (so a small batch still fills the GPU), each program streams its chunk in
tiles of ``block_kv`` keys with an online softmax, and the float32 partial results are merged
by log-sum-exp in XLA:

.. math::

    M = \\max_s m_s, \\quad \\ell = \\sum_s e^{m_s - M} \\ell_s, \\quad
    o = \\frac{1}{\\ell} \\sum_s e^{m_s - M} o_s .

Grouped-query attention shares every key/value tile across the ``H / Hk`` query heads of its
group: the group's query heads (times the query length ``T``) are the rows of the query tile,
padded to at least 16 rows (a power of two) so that every dot has Triton-friendly shapes.

Positions are absolute: key ``j`` of row ``b`` sits at position ``j`` and query ``i`` at
``q_offset[b] + i`` (by default ``lengths[b] - T + i``: the new tokens are the last ``T`` of
each row). Keys at or beyond ``lengths[b]`` are never attended; ``causal=True`` (the default)
adds ``kv <= q``, ``attention_window=w`` adds ``q - kv < w`` and skips the tiles before the
window. Score mods see the same absolute positions.

Backends: a Pallas kernel (Triton lowering on GPU; ``interpret=True`` runs it on CPU for
tests) and an XLA path with the same math (chunked online softmax, also skipping tiles beyond
each batch's longest row). ``use_pallas=None`` picks Pallas on GPU when the configuration is
supported (see :func:`decode_attention`) and XLA otherwise; ``use_pallas=True`` raises
``NotImplementedError`` instead of falling back. These kernels are forward-only (inference):
their loops have data-dependent trip counts, which ``jax.grad`` cannot reverse; train with
``standard_attention`` or a flash kernel.

Modules: :mod:`.api` (:func:`decode_attention`, contiguous cache) and :mod:`.paged`
(:func:`paged_decode_attention`, block table) are the entries; :mod:`.checks` validates their
arguments and decides whether Pallas can run, :mod:`.plan` cuts the cache into tiles and splits,
:mod:`.softmax` holds the partial softmax and the combine, :mod:`.pallas` the Pallas kernel and
:mod:`.xla` the XLA path.
"""

from .api import decode_attention as decode_attention
from .paged import paged_decode_attention as paged_decode_attention

__all__ = ["decode_attention", "paged_decode_attention"]
