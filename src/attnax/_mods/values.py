"""Score mods as pytree dataclasses: the masking one, and the value mods (ALiBi, softcap, a bias).

Value mods rewrite scores and mask nothing; :class:`MaskScoreMod` only sets disallowed scores to
``-inf`` and keeps its mask mod visible so kernels can skip blocks.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._checks import positive_int
from .._typing import MaskMod, ScoreIndex, ScoreMod, Scores
from .offsets import Offset, offset_for


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class MaskScoreMod:
    """A score mod that sets disallowed scores to ``-inf``; kernels read ``mask_mod`` to skip."""

    mask_mod: MaskMod

    def __call__(
        self,
        scores: Scores,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_idx: ScoreIndex,
        kv_idx: ScoreIndex,
        /,
    ) -> Scores:
        allowed = self.mask_mod(b_idx, h_idx, q_idx, kv_idx)
        return jnp.where(allowed, scores, -jnp.inf)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AlibiMod:
    """ALiBi: ``scores - slope[h] * |q_idx - kv_idx|`` with the paper's geometric slopes.

    Slopes are computed arithmetically from ``h_idx`` (no table lookup), so the mod traces into a
    Pallas kernel unchanged. Press et al., "Train Short, Test Long", ICLR 2022.
    """

    num_heads: int = dataclasses.field(metadata={"static": True})

    def __post_init__(self) -> None:
        positive_int(self.num_heads, "num_heads")

    def slope(self, h_idx: ScoreIndex) -> Float[Array, "*#tile"]:
        power = 2 ** math.floor(math.log2(self.num_heads))
        h = jnp.asarray(h_idx, jnp.float32)
        main = jnp.exp2(-8.0 * (h + 1.0) / power)
        # Heads beyond the largest power of two take every other slope of the 2*power series.
        extra = jnp.exp2(-4.0 * (2.0 * (h - power) + 1.0) / power)
        return jnp.where(h < power, main, extra)

    def __call__(
        self,
        scores: Scores,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_idx: ScoreIndex,
        kv_idx: ScoreIndex,
        /,
    ) -> Scores:
        distance = jnp.abs(q_idx - kv_idx).astype(jnp.float32)
        return scores - self.slope(h_idx) * distance


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SoftcapMod:
    """``cap * tanh(scores / cap)``, as in Gemma 2."""

    cap: float = dataclasses.field(metadata={"static": True})

    def __post_init__(self) -> None:
        if not (isinstance(self.cap, (int, float)) and self.cap > 0 and math.isfinite(self.cap)):
            raise ValueError(f"`cap` must be a positive finite number, got {self.cap!r}.")

    def __call__(
        self,
        scores: Scores,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_idx: ScoreIndex,
        kv_idx: ScoreIndex,
        /,
    ) -> Scores:
        return self.cap * jnp.tanh(scores / self.cap)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class AdditiveBiasMod:
    """``scores + bias[b, h, q, kv]``; ``bias`` broadcastable to (B, H, T, S) and differentiable."""

    bias: Float[Array, "#B #H #T #S"]

    def __call__(
        self,
        scores: Scores,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_idx: ScoreIndex,
        kv_idx: ScoreIndex,
        /,
    ) -> Scores:
        # A size-1 axis of the bias is broadcast: index it at 0 whatever the index says.
        index = tuple(
            jnp.zeros((), jnp.int32) if size == 1 else idx
            for size, idx in zip(self.bias.shape, (b_idx, h_idx, q_idx, kv_idx), strict=True)
        )
        return scores + self.bias[index].astype(jnp.result_type(scores))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class ValueChain:
    """Value score mods applied left to right (no masks inside)."""

    score_mods: tuple[ScoreMod, ...]

    def __call__(
        self,
        scores: Scores,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_idx: ScoreIndex,
        kv_idx: ScoreIndex,
        /,
    ) -> Scores:
        for score_mod in self.score_mods:
            scores = score_mod(scores, b_idx, h_idx, q_idx, kv_idx)
        return scores


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class OffsetScoreMod:
    """A score mod seen from shifted positions (see :class:`OffsetMask`)."""

    score_mod: ScoreMod
    q_offset: Offset = 0
    kv_offset: Offset = 0

    def __call__(
        self,
        scores: Scores,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_idx: ScoreIndex,
        kv_idx: ScoreIndex,
        /,
    ) -> Scores:
        q_pos = q_idx + offset_for(self.q_offset, b_idx)
        kv_pos = kv_idx + offset_for(self.kv_offset, b_idx)
        return self.score_mod(scores, b_idx, h_idx, q_pos, kv_pos)
