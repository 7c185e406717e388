r"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

Softmax is replaced by the positive feature map :math:`\phi(x) = \mathrm{elu}(x) + 1`, so
attention factorises through a (head_dim × head_dim) state per head and never forms the
(T, S) score matrix:

.. math::

    o_t = \frac{\phi(s\,q_t)^\top \sum_{s' \in A(t)} \phi(k_{s'})\, v_{s'}^\top}
               {\phi(s\,q_t)^\top \sum_{s' \in A(t)} \phi(k_{s'})}

where :math:`A(t)` is the set of allowed keys (all unpadded keys, and only those up to
:math:`t` when causal) and :math:`s` the query scale.

The causal form is chunkwise parallel: inside a chunk of ``chunk_size`` positions a masked
(chunk × chunk) quadratic term, across chunks the (D × D) state of all earlier chunks, whose
prefix over chunks is one parallel matmul. On a GPU the causal form runs as fused Pallas
kernels around that prefix, forward (:mod:`attnax.kernels.linear.pallas`) and backward
(:mod:`attnax.kernels.linear.pallas_vjp`, around a suffix sum of the same kind); elsewhere as
the XLA formulation (:mod:`attnax.kernels.linear.xla`), differentiated by autodiff.

Modules: :mod:`.api` (:func:`linear_attention`), :mod:`.checks` (the argument checks LITE
shares), :mod:`.xla`, :mod:`.fused` (the fused path's ``custom_vjp`` and when it runs),
:mod:`.pallas` and :mod:`.pallas_vjp`.
"""

from .api import linear_attention as linear_attention

__all__ = ["linear_attention"]
