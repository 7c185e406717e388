"""Block sparsity (``attnax._mods.blocks``) against dense evaluation."""

from typing import Any

import jax.numpy as jnp
import numpy as np

from attnax import _mods as mods


def _random_mask_mod(
    rng: np.random.Generator, batch: int, seq_q: int, seq_kv: int, kind: int
) -> Any:
    if kind == 0:
        return mods.CausalMask()
    if kind == 1:
        return mods.SlidingWindowMask(int(rng.integers(1, 6)), bool(rng.integers(0, 2)))
    if kind == 2:
        return mods.PrefixLMMask(jnp.asarray(rng.integers(0, seq_kv + 1, size=batch)))
    if kind == 3:
        q_ids = np.sort(rng.integers(0, 3, size=(batch, seq_q)), axis=1)
        kv_ids = np.sort(rng.integers(0, 3, size=(batch, seq_kv)), axis=1)
        return mods.DocumentMask(jnp.asarray(q_ids), jnp.asarray(kv_ids))
    if kind == 4:
        offsets = jnp.asarray(rng.integers(0, 5, size=batch))
        return mods.OffsetMask(mods.CausalMask(), offsets, 0)
    if kind == 5:
        return mods.AndMask((mods.CausalMask(), mods.SlidingWindowMask(int(rng.integers(1, 8)))))
    if kind == 6:
        # No block_overlap: classified by dense evaluation.
        return lambda b, h, q, kv: (q + kv + h) % 3 != 0
    if kind == 7:
        q_start, q_stop = np.sort(rng.integers(0, seq_q + 1, size=2))
        kv_start, kv_stop = np.sort(rng.integers(0, seq_kv + 1, size=2))
        return mods.BoxMask(*(jnp.int32(x) for x in (q_start, q_stop, kv_start, kv_stop)))
    return mods.AndMask((mods.CausalMask(), lambda b, h, q, kv: kv % 2 == 0))


def _check_classes(classes: np.ndarray, dense: np.ndarray, block_q: int, block_kv: int) -> None:
    batch, heads = dense.shape[:2]
    classes = np.broadcast_to(classes, (batch, heads, *classes.shape[2:]))
    for i in range(classes.shape[2]):
        for j in range(classes.shape[3]):
            tile = dense[:, :, i * block_q : (i + 1) * block_q, j * block_kv : (j + 1) * block_kv]
            cls = classes[:, :, i, j]
            any_allowed = tile.any(axis=(2, 3))
            all_allowed = tile.all(axis=(2, 3))
            assert not np.any((cls == mods.BLOCK_EMPTY) & any_allowed), (i, j)
            assert not np.any((cls == mods.BLOCK_FULL) & ~all_allowed), (i, j)


def test_block_sparsity_agrees_with_dense_evaluation() -> None:
    rng = np.random.default_rng(0)
    # Every kind of mask mod once, on random sizes (each eager config costs seconds of dispatch).
    for kind in range(9):
        batch, heads = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        seq_q, seq_kv = int(rng.integers(1, 20)), int(rng.integers(1, 20))
        block_q, block_kv = int(rng.integers(1, 8)), int(rng.integers(1, 8))
        mask_mod = _random_mask_mod(rng, batch, seq_q, seq_kv, kind)
        sizes = {"batch": batch, "num_heads": heads, "seq_q": seq_q, "seq_kv": seq_kv}
        classes = np.asarray(
            mods.block_sparsity(mask_mod, block_q=block_q, block_kv=block_kv, **sizes)
        )
        assert classes.shape[2:] == (-(-seq_q // block_q), -(-seq_kv // block_kv))
        dense = np.asarray(mods.mask_mod_to_boolean_mask(mask_mod, **sizes))
        _check_classes(classes, dense, block_q, block_kv)


def test_block_sparsity_is_exact_for_dense_masks() -> None:
    rng = np.random.default_rng(1)
    for _ in range(12):
        seq_q, seq_kv = int(rng.integers(1, 20)), int(rng.integers(1, 20))
        block_q, block_kv = int(rng.integers(1, 8)), int(rng.integers(1, 8))
        density = float(rng.choice([0.0, 0.3, 0.95, 1.0]))
        mask = rng.random((2, 1, seq_q, seq_kv)) < density
        classes = np.asarray(
            mods.block_sparsity_from_mask(
                jnp.asarray(mask), seq_q=seq_q, seq_kv=seq_kv, block_q=block_q, block_kv=block_kv
            )
        )
        _check_classes(classes, mask, block_q, block_kv)
        # Exact: a partial block has some but not all pairs allowed.
        for i in range(classes.shape[2]):
            for j in range(classes.shape[3]):
                tile = mask[
                    :, :, i * block_q : (i + 1) * block_q, j * block_kv : (j + 1) * block_kv
                ]
                partial = tile.any(axis=(2, 3)) & ~tile.all(axis=(2, 3))
                np.testing.assert_array_equal(classes[:, :, i, j] == mods.BLOCK_PARTIAL, partial)


def test_causal_block_sparsity_is_tight() -> None:
    classes = np.asarray(
        mods.block_sparsity(
            mods.CausalMask(), batch=1, num_heads=1, seq_q=8, seq_kv=8, block_q=4, block_kv=4
        )
    )[0, 0]
    np.testing.assert_array_equal(classes, [[1, 0], [2, 1]])
