"""Argument checks shared by the kernels that never form per-pair scores (LINEAR and LITE)."""

import jax.numpy as jnp
from jaxtyping import Array, Bool

from ..._mods import CausalMask, split_score_mod
from ..._typing import AttentionMask, ScoreMod
from .._common import check_dropout, check_mask

__all__ = [
    "SOFTMAX_BACKEND_NAMES",
    "causal_from_score_mod",
    "check_causal_lengths",
    "key_padding_mask",
    "refuse_weight_dropout",
]

# The attention_type values that apply any score mod (they form per-pair scores), fastest
# first: ``attnax._backends.softmax_backend_names()``, written out because a kernel never
# imports the backend table (tests/kernels/linear/test_linear.py checks that the two agree).
SOFTMAX_BACKEND_NAMES = ("pallas_flash", "flash", "memory_efficient", "standard")


def key_padding_mask(
    mask: AttentionMask | None, query: Array, key: Array, *, name: str
) -> Bool[Array, "B S"] | None:
    """Reduce a key-padding ``mask`` (broadcastable to (B, 1, 1, S)) to a (B, S) boolean.

    Kernels that never form per-(query, key) scores can only honour masks that depend on the
    key alone; anything that varies over heads or query positions is refused by name.
    """
    check_mask(mask, query, key, name=name)
    if mask is None:
        return None
    if mask.shape[1] != 1 or mask.shape[2] != 1:
        raise NotImplementedError(
            f"{name} supports only key-padding masks, broadcastable to (batch, 1, 1, seq_kv), "
            f"got a mask of shape {mask.shape} that varies over heads or query positions; use "
            "causal=True for causal masking, or standard_attention (or another softmax kernel) "
            "for general masks."
        )
    return jnp.broadcast_to(mask[:, 0, 0, :], (query.shape[0], key.shape[2]))


def refuse_weight_dropout(
    dropout_rate: float, dropout_rng: Array | None, deterministic: bool, *, name: str
) -> None:
    """Validate the dropout arguments; active dropout is NotImplementedError (no weights)."""
    if check_dropout(dropout_rate, dropout_rng, deterministic, name=name):
        raise NotImplementedError(
            f"{name} does not implement attention dropout (there are no attention weights to "
            "drop); pass deterministic=True or dropout_rate=0.0, and use dropout on the output "
            "projection, or standard_attention for dropout on the weights."
        )


def check_causal_lengths(causal: bool, seq_q: int, seq_kv: int, *, name: str) -> None:
    """Causal kernels without per-pair scores need query t aligned with key t."""
    if causal and seq_q != seq_kv:
        raise NotImplementedError(
            f"{name} with causal=True needs equal query and key lengths (query t sees keys "
            f"0..t), got seq_q={seq_q} and seq_kv={seq_kv}; for single-token decoding against "
            "a cache, call it with causal=False and a key-padding mask of the filled cache "
            "slots, or use standard_attention with a shifted causal mod."
        )


def causal_from_score_mod(score_mod: ScoreMod | None, *, why: str, name: str) -> bool:
    """Whether ``score_mod`` asks for causal masking, the one mod these kernels can apply.

    A kernel without per-pair scores applies causal masking as its causal form; any other
    mask or value mod is refused (never ignored), naming the softmax backends that apply it.

    Args:
      score_mod: the caller's mod, or None.
      why: the kernel's reason, one sentence: why it has no scores for a mod to rewrite.
      name: the kernel, for the message.

    Returns:
      True for a causal mask mod (``causal_mod()``), False for None or an empty mod.

    Raises:
      NotImplementedError: for any other score mod.
    """
    mask_mod, value_mod = split_score_mod(score_mod)
    if value_mod is None and (mask_mod is None or isinstance(mask_mod, CausalMask)):
        return isinstance(mask_mod, CausalMask)
    quoted = [repr(backend) for backend in SOFTMAX_BACKEND_NAMES]
    kernels = ", ".join(f"{backend}_attention" for backend in SOFTMAX_BACKEND_NAMES)
    raise NotImplementedError(
        f"{name} does not support this `score_mod` ({type(score_mod).__name__}): {why} It "
        "applies no score mod but causal masking (causal_mod() or causal=True), and key "
        f"padding through `mask`; use attention_type={', '.join(quoted[:-1])} or {quoted[-1]} "
        f"(the kernels {kernels}), which apply any score mod, or drop the mod."
    )
