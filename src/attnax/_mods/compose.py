"""Composition: several score mods as one, shifted positions, the mask/value split, mask AND.

Inside a composition, mask components exclude their positions whatever their place in the
order; value components apply left to right. :func:`split_score_mod` recovers the mask part
(an :class:`~attnax._mods.masks.AndMask` of several) so kernels can skip blocks.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from .._typing import AttentionMask, MaskMod, ScoreIndex, ScoreMod, Scores
from .masks import AndMask, OffsetMask
from .offsets import Offset
from .values import MaskScoreMod, OffsetScoreMod, ValueChain


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class ComposedScoreMod:
    """Several score mods; mask parts exclude positions, value parts apply left to right."""

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
        mask_mod, value_mod = split_score_mod(self)
        if value_mod is not None:
            scores = value_mod(scores, b_idx, h_idx, q_idx, kv_idx)
        if mask_mod is not None:
            scores = jnp.where(mask_mod(b_idx, h_idx, q_idx, kv_idx), scores, -jnp.inf)
        return scores



def compose_score_mods(*score_mods: ScoreMod | None) -> ScoreMod | None:
    """Compose score mods left to right; ``None`` entries are skipped.

    Returns ``None`` when every entry is ``None`` and a single mod unchanged.

    Args:
      *score_mods: score mods or ``None``, applied in order (mask parts exclude their
        positions wherever they stand).

    Returns:
      A :class:`ComposedScoreMod`, the single mod given, or ``None``.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mod = attnax.compose_score_mods(attnax.causal_mod(), attnax.softcap_mod(30.0), None)
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> attnax.standard_attention(q, q, q, score_mod=mod).shape
      (1, 2, 8, 4)
      >>> attnax.compose_score_mods(None, None) is None
      True
    """
    present = tuple(m for m in score_mods if m is not None)
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    return ComposedScoreMod(present)


def shift_positions(
    score_mod: ScoreMod | None, *, q_offset: Offset = 0, kv_offset: Offset = 0
) -> ScoreMod | None:
    """Make ``score_mod`` see ``q_idx + q_offset`` and ``kv_idx + kv_offset`` (ints or (B,)).

    Args:
      score_mod: the mod to shift; ``None`` stays ``None``.
      q_offset: added to query indices: an int or a (batch,) int array.
      kv_offset: added to key indices: an int or a (batch,) int array.

    Returns:
      An :class:`OffsetScoreMod` (its mask part stays visible to :func:`split_score_mod`), or
      ``None``.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> # Two new queries at absolute positions 3 and 4 of a 5-token sequence:
      >>> mod = attnax.shift_positions(attnax.causal_mod(), q_offset=3)
      >>> mask_mod, _ = attnax.split_score_mod(mod)
      >>> mask = attnax.mask_mod_to_boolean_mask(mask_mod, batch=1, num_heads=1, seq_q=2, seq_kv=5)
      >>> mask[0, 0].astype(int).tolist()
      [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    """
    if score_mod is None:
        return None
    return OffsetScoreMod(score_mod, q_offset, kv_offset)


def split_score_mod(score_mod: ScoreMod | None) -> tuple[MaskMod | None, ScoreMod | None]:
    """Split a score mod into its mask part and its value part.

    ``score_mod(s) == where(mask_mod(...), value_mod(s), -inf)`` for built-in mods. A plain
    callable is all value part (kernels then cannot skip blocks, but results are the same).

    Args:
      score_mod: any score mod, or ``None``.

    Returns:
      ``(mask_mod, value_mod)``, either ``None`` when that part is absent.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mod = attnax.compose_score_mods(attnax.causal_mod(), attnax.alibi_mod(2))
      >>> mask_mod, value_mod = attnax.split_score_mod(mod)
      >>> type(mask_mod).__name__, type(value_mod).__name__
      ('CausalMask', 'AlibiMod')
      >>> attnax.split_score_mod(None)
      (None, None)
    """
    if score_mod is None:
        return None, None
    if isinstance(score_mod, MaskScoreMod):
        return score_mod.mask_mod, None
    if isinstance(score_mod, ComposedScoreMod):
        masks: list[Any] = []
        values: list[Any] = []
        for part in score_mod.score_mods:
            part_mask, part_value = split_score_mod(part)
            if part_mask is not None:
                masks.extend(part_mask.mask_mods if isinstance(part_mask, AndMask) else [part_mask])
            if part_value is not None:
                values.append(part_value)
        mask: MaskMod | None = None
        if len(masks) == 1:
            mask = masks[0]
        elif masks:
            mask = AndMask(tuple(masks))
        value: ScoreMod | None = None
        if len(values) == 1:
            value = values[0]
        elif values:
            value = ValueChain(tuple(values))
        return mask, value
    if isinstance(score_mod, OffsetScoreMod):
        inner_mask, inner_value = split_score_mod(score_mod.score_mod)
        shifted_mask = (
            None
            if inner_mask is None
            else OffsetMask(inner_mask, score_mod.q_offset, score_mod.kv_offset)
        )
        shifted_value = (
            None
            if inner_value is None
            else OffsetScoreMod(inner_value, score_mod.q_offset, score_mod.kv_offset)
        )
        return shifted_mask, shifted_value
    return None, score_mod


def combine_masks(*masks: AttentionMask | None) -> AttentionMask | None:
    """Logical AND of broadcastable boolean masks; ``None`` entries are skipped.

    Args:
      *masks: rank-4 boolean masks or ``None``.

    Returns:
      Their broadcast AND, or ``None`` when every entry is ``None``.

    Raises:
      ValueError: when a mask is not rank 4.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> padding = attnax.make_padding_mask(jnp.array([[3, 4, 0]]), pad_token_id=0)
      >>> mask = attnax.combine_masks(attnax.make_causal_mask(3), padding, None)
      >>> mask[0, 0].astype(int).tolist()
      [[1, 0, 0], [1, 1, 0], [1, 1, 0]]
      >>> attnax.combine_masks(None) is None
      True
    """
    present = [jnp.asarray(m, dtype=bool) for m in masks if m is not None]
    if not present:
        return None
    for m in present:
        if m.ndim != 4:
            raise ValueError(
                f"masks must be rank 4, broadcastable to (batch, heads, seq_q, seq_kv); got {m.shape}."
            )
    combined = present[0]
    for m in present[1:]:
        combined = combined & m
    return combined
