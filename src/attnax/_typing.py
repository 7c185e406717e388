"""The one shape vocabulary of attnax, and the protocols every kernel and mod follows.

Shape names (bound across the arguments of one call by jaxtyping):

* ``B`` batch, ``H`` query heads, ``Hk`` key/value heads (``Hk`` divides ``H``),
* ``T`` query length, ``S`` key/value length, ``D`` head dimension.

Query ``"B H T D"``, key and value ``"B Hk S D"``, output ``"B H T D"``; boolean masks are
broadcastable to ``"B H T S"`` (True means attend).
"""

from typing import Protocol, TypeAlias, runtime_checkable

import jax
from jaxtyping import Array, Bool, Float, Int, Shaped

__all__ = [
    "AttentionFn",
    "AttentionMask",
    "AttentionOutput",
    "KeyArray",
    "MaskMod",
    "PRNGKeyArray",
    "QueryArray",
    "ScoreIndex",
    "ScoreMod",
    "Scores",
    "ValueArray",
]

QueryArray: TypeAlias = Float[Array, "B H T D"]
KeyArray: TypeAlias = Float[Array, "B Hk S D"]
ValueArray: TypeAlias = Float[Array, "B Hk S D"]
AttentionOutput: TypeAlias = Float[Array, "B H T D"]
AttentionMask: TypeAlias = Bool[Array, "#B #H #T #S"]

# Score mods see scores and indices that broadcast together to (B, H, T, S); a blockwise
# kernel hands them a tile (for example scalars for b and h and (bq, 1) / (1, bk) positions),
# so mods must only use broadcasting operations.
Scores: TypeAlias = Float[Array, "*#tile"]
ScoreIndex: TypeAlias = Int[Array, "*#tile"]
PRNGKeyArray: TypeAlias = Shaped[jax.Array, "..."]


@runtime_checkable
class ScoreMod(Protocol):
    """``(scores, b_idx, h_idx, q_idx, kv_idx) -> scores``; indices are absolute positions.

    Args:
      scores: scaled scores, broadcastable with the indices (a whole (B, H, T, S) array or one
        kernel tile).
      b_idx: batch indices.
      h_idx: query-head indices.
      q_idx: absolute query positions.
      kv_idx: absolute key positions.

    Returns:
      The modified scores, same shape; ``-inf`` excludes a pair.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> def distance_penalty(scores, b_idx, h_idx, q_idx, kv_idx):
      ...     # Only broadcasting operations, so blockwise kernels can apply it tile by tile.
      ...     return scores - 0.5 * jnp.abs(q_idx - kv_idx)
      >>> isinstance(distance_penalty, attnax.ScoreMod)
      True
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> out = attnax.standard_attention(q, q, q, score_mod=distance_penalty)
      >>> out.shape
      (1, 2, 8, 4)
    """

    def __call__(
        self,
        scores: Scores,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_idx: ScoreIndex,
        kv_idx: ScoreIndex,
        /,
    ) -> Scores: ...


@runtime_checkable
class MaskMod(Protocol):
    """``(b_idx, h_idx, q_idx, kv_idx) -> bool``; True means the query may attend to the key.

    Args:
      b_idx: batch indices, broadcastable with the others (a whole grid or one kernel tile).
      h_idx: query-head indices.
      q_idx: absolute query positions.
      kv_idx: absolute key positions.

    Returns:
      A boolean array of the broadcast shape; True means attend.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> def causal(b_idx, h_idx, q_idx, kv_idx):
      ...     return q_idx >= kv_idx
      >>> isinstance(causal, attnax.MaskMod)
      True
      >>> mask = attnax.mask_mod_to_boolean_mask(causal, batch=1, num_heads=1, seq_q=3, seq_kv=3)
      >>> mask[0, 0].tolist()
      [[True, False, False], [True, True, False], [True, True, True]]
      >>> score_mod = attnax.mask_mod_to_score_mod(causal)  # use it in any kernel
    """

    def __call__(
        self,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_idx: ScoreIndex,
        kv_idx: ScoreIndex,
        /,
    ) -> Bool[Array, "*#tile"]: ...


@runtime_checkable
class AttentionFn(Protocol):
    """What every attention kernel is: (batch, heads, seq, head_dim) in, the query's layout out.

    ``key`` and ``value`` may carry fewer heads than ``query`` when their number divides it
    (grouped-query and multi-query attention); kernels never materialise repeated heads.

    Args:
      query: (batch, heads, seq_q, head_dim).
      key: (batch, kv_heads, seq_kv, head_dim); ``kv_heads`` divides ``heads``.
      value: like ``key``.
      mask: boolean, broadcastable to (batch, heads, seq_q, seq_kv); True means attend.
      score_mod: a :class:`ScoreMod` applied to the scaled scores.
      dropout_rng: key for dropout on the attention weights.
      dropout_rate: probability of dropping a weight, in [0, 1).
      deterministic: no dropout when True.

    Returns:
      (batch, heads, seq_q, head_dim) in the query's dtype.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> def causal_standard(query, key, value, *, mask=None, score_mod=None,
      ...                     dropout_rng=None, dropout_rate=0.0, deterministic=True):
      ...     # A conforming kernel: standard attention with a causal mask added.
      ...     score_mod = attnax.compose_score_mods(attnax.causal_mod(), score_mod)
      ...     return attnax.standard_attention(
      ...         query, key, value, mask=mask, score_mod=score_mod, dropout_rng=dropout_rng,
      ...         dropout_rate=dropout_rate, deterministic=deterministic)
      >>> isinstance(causal_standard, attnax.AttentionFn)
      True
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> kv = jax.random.normal(jax.random.key(1), (1, 1, 8, 4))  # one key/value head (MQA)
      >>> causal_standard(q, kv, kv).shape
      (1, 2, 8, 4)
    """

    def __call__(
        self,
        query: QueryArray,
        key: KeyArray,
        value: ValueArray,
        *,
        mask: AttentionMask | None = None,
        score_mod: ScoreMod | None = None,
        dropout_rng: PRNGKeyArray | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = True,
    ) -> AttentionOutput: ...
