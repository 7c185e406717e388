"""The cases every softmax kernel runs (``test_softmax_kernels.py``), and the kernels themselves.

One case names a shape (head grouping, lengths, head size, dtype), a mask and/or score mod, and
extra kernel arguments; the base test runs it through every kernel in :data:`KERNELS` and
compares values and (dq, dk, dv) with the float64 NumPy reference. Mods and masks are built
lazily (functions) so importing this file creates no arrays. Shapes stay small (T, S <= 64,
D <= 32): Pallas in interpret mode compiles slowly and the whole CPU suite has a time budget.

Kernels are reached through the public API only (``attnax.<kernel>``), so moving a kernel
between private modules cannot break the base.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import attnax

__all__ = ["CASES", "KERNELS", "SoftmaxCase"]

# Small tiles so that every length below spans several of them (and most need padding).
# pallas_flash runs interpret=True on every backend: the base checks numerics at float32
# precision, and the Triton/Mosaic paths are tested on GPU in test_pallas_flash.py.
KERNELS: dict[str, Callable[..., jax.Array]] = {
    "standard": attnax.standard_attention,
    "memory_efficient": functools.partial(attnax.memory_efficient_attention, block_size=4),
    "flash": functools.partial(attnax.flash_attention, block_size=4),
    "pallas_flash": functools.partial(
        attnax.pallas_flash_attention, block_q=16, block_kv=16, interpret=True
    ),
}


@dataclasses.dataclass(frozen=True)
class SoftmaxCase:
    """One input of the base: shape, mask, score mod, extra kernel arguments.

    Attributes:
      name: the pytest id.
      seed: seeds the query/key/value, the cotangent and any random mask or bias.
      shape: keyword arguments of :func:`tests._reference.random_qkv`.
      mask: builds the boolean mask (or None) from the seed.
      score_mod: builds the score mod (or None) from the seed.
      kwargs: builds extra keyword arguments for every kernel from the seed.
    """

    name: str
    seed: int
    shape: dict[str, Any]
    mask: Callable[[int], Any] = lambda seed: None
    score_mod: Callable[[int], Any] = lambda seed: None
    kwargs: Callable[[int], dict[str, Any]] = lambda seed: {}

    @property
    def low_precision(self) -> bool:
        """bf16/fp16 inputs: the kernels accumulate in float32, so compare loosely."""
        return bool(jnp.dtype(self.shape.get("dtype", jnp.float32)).itemsize < 4)


def _tril_mask(seed: int) -> jax.Array:
    # One mask for every batch row and head: broadcast over (B, H).
    return jnp.tril(jnp.ones((7, 11), bool), k=4)[None, None]


def _half_mask_with_empty_row(seed: int) -> jax.Array:
    mask = jax.random.bernoulli(jax.random.key(seed), 0.5, (2, 1, 8, 12))
    return mask.at[:, :, 3, :].set(False)  # row 3 sees nothing


def _random_mask_with_empty_row(seed: int) -> jax.Array:
    mask = jax.random.bernoulli(jax.random.key(seed), 0.6, (2, 1, 10, 9))
    return mask.at[:, :, 3].set(False).at[1, :, 8].set(False)  # rows that see no key


def _bias_causal(seed: int) -> Any:
    bias = jax.random.normal(jax.random.key(seed), (2, 1, 10, 9))
    return attnax.compose_score_mods(attnax.causal_mod(), attnax.additive_bias_mod(bias))


def _document_prefix_offset(seed: int) -> Any:
    ids = jnp.array([[0] * 6 + [1] * 8, [0] * 3 + [1] * 11])
    return attnax.compose_score_mods(
        attnax.document_mask_mod(ids[:, :10], ids),
        attnax.shift_positions(
            attnax.prefix_lm_mod(jnp.array([2, 5])), q_offset=jnp.array([4, 2]), kv_offset=0
        ),
    )


def _plain_callable(
    s: jax.Array, b: jax.Array, h: jax.Array, q: jax.Array, kv: jax.Array
) -> jax.Array:
    # A mod attnax knows nothing about (no block description): every kernel must trace it.
    return s + 0.1 * jnp.cos(1.0 * (q - 2 * kv + h))


def _mod(make: Callable[[], Any]) -> Callable[[int], Any]:
    return lambda seed: make()


_GQA = {"num_heads": 4, "num_kv_heads": 2}
_MQA = {"num_heads": 6, "num_kv_heads": 1}

CASES: list[SoftmaxCase] = [
    # Head groupings and lengths, no mod (T != S and odd lengths need padding to the tiles).
    SoftmaxCase("mha", 1, {"seq_q": 16}),
    SoftmaxCase("mha-cross-odd", 22, {"seq_q": 13, "seq_kv": 19}),
    SoftmaxCase("gqa-cross-odd", 2, {**_GQA, "seq_q": 9, "seq_kv": 23}),
    SoftmaxCase("mqa-cross-odd", 3, {**_MQA, "seq_q": 17, "seq_kv": 5}),
    SoftmaxCase("d32-odd-causal", 4, {"num_heads": 2, "seq_q": 33, "seq_kv": 47, "head_dim": 32},
                score_mod=_mod(attnax.causal_mod)),
    # Masks as score mods.
    SoftmaxCase("causal-mha", 5, {"seq_q": 16}, score_mod=_mod(attnax.causal_mod)),
    SoftmaxCase("causal-gqa", 6, {**_GQA, "seq_q": 17}, score_mod=_mod(attnax.causal_mod)),
    SoftmaxCase("causal-mqa-cross", 7, {**_MQA, "seq_q": 17, "seq_kv": 5},
                score_mod=_mod(attnax.causal_mod)),
    SoftmaxCase("window-gqa-cross", 8, {**_GQA, "seq_q": 9, "seq_kv": 23},
                score_mod=_mod(lambda: attnax.sliding_window_mod(4))),
    SoftmaxCase("window-noncausal-mqa", 9, {"num_heads": 4, "num_kv_heads": 1, "seq_q": 15,
                                            "seq_kv": 11},
                score_mod=_mod(lambda: attnax.sliding_window_mod(3, causal=False))),
    SoftmaxCase("document-prefix-offset", 10, {"seq_q": 10, "seq_kv": 14},
                score_mod=_document_prefix_offset),
    # Value mods.
    SoftmaxCase("softcap", 11, {"seq_q": 16}, score_mod=_mod(lambda: attnax.softcap_mod(2.0))),
    SoftmaxCase("alibi-causal-gqa-cross", 12, {**_GQA, "seq_q": 11, "seq_kv": 13},
                score_mod=_mod(lambda: attnax.compose_score_mods(
                    attnax.causal_mod(), attnax.alibi_mod(4)))),
    SoftmaxCase("softcap-causal-alibi", 13, {"seq_q": 12},
                score_mod=_mod(lambda: attnax.compose_score_mods(
                    attnax.softcap_mod(2.0), attnax.causal_mod(), attnax.alibi_mod(4)))),
    SoftmaxCase("bias-causal-masked-rows", 14, {**_GQA, "seq_q": 10, "seq_kv": 9},
                mask=_random_mask_with_empty_row, score_mod=_bias_causal),
    SoftmaxCase("plain-callable", 15, {"seq_q": 9}, score_mod=_mod(lambda: _plain_callable)),
    # Boolean masks broadcast over batch and heads.
    SoftmaxCase("mask-broadcast-gqa", 16, {**_GQA, "seq_q": 7, "seq_kv": 11}, mask=_tril_mask),
    SoftmaxCase("mask-per-batch-empty-row", 23, {**_GQA, "seq_q": 8, "seq_kv": 12},
                mask=_half_mask_with_empty_row),
    # Length-1 queries and keys (a length-1 axis must not be taken for a broadcast one).
    SoftmaxCase("one-query", 17, {**_GQA, "seq_q": 1, "seq_kv": 5},
                score_mod=_mod(lambda: attnax.alibi_mod(4))),
    SoftmaxCase("one-key", 18, {"seq_q": 6, "seq_kv": 1}),
    SoftmaxCase("one-by-one", 19, {"seq_q": 1, "seq_kv": 1}),
    # bf16 in and out, float32 accumulation.
    SoftmaxCase("bf16-causal-gqa", 20, {**_GQA, "seq_q": 64, "head_dim": 32,
                                        "dtype": jnp.bfloat16},
                score_mod=_mod(attnax.causal_mod)),
    # Dropout switched off by `deterministic` even with a rate and a key: no effect at all.
    SoftmaxCase("dropout-off", 21, {**_GQA, "seq_q": 12}, score_mod=_mod(attnax.causal_mod),
                kwargs=lambda seed: {"dropout_rate": 0.5, "dropout_rng": jax.random.key(seed),
                                     "deterministic": True}),
]
