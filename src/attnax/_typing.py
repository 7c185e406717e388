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
    """``(scores, b_idx, h_idx, q_idx, kv_idx) -> scores``; indices are absolute positions."""

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
    """``(b_idx, h_idx, q_idx, kv_idx) -> bool``; True means the query may attend to the key."""

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
