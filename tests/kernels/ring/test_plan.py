"""Which fused pair ring serves a call: the cuDNN and PALLAS_FLASH pair plans, with the GPU
queries answered as on a GPU."""

from typing import Any

import jax
import jax.numpy as jnp
import pytest

from attnax._mods import causal_mod, sliding_window_mod
from tests._reference import random_qkv


@pytest.mark.parametrize(
    ("dtype", "mod", "layout", "masked", "expected"),
    [
        (jnp.bfloat16, "causal", "zigzag", False, (True, None)),
        (jnp.bfloat16, None, "striped", False, (False, None)),
        (jnp.bfloat16, "causal", "striped", False, "striped"),
        (jnp.bfloat16, "window", "zigzag", False, "score mod"),
        (jnp.bfloat16, "causal", "zigzag", True, "key-padding mask"),
        (jnp.float32, "causal", "zigzag", False, "bf16/fp16"),
    ],
)
def test_fused_pair_plan_on_a_hopper(
    dtype: Any,
    mod: str | None,
    layout: str,
    masked: bool,
    expected: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The dispatch rule, with the GPU query answered as an H100 would."""
    from attnax._mods import sliding_window_mod
    from attnax.kernels.ring import plan as ring_plan

    monkeypatch.setattr(ring_plan, "cuda_compute_capability", lambda: (9, 0))
    q, k, v = (x.astype(dtype) for x in random_qkv(5, num_heads=4, num_kv_heads=2, seq_q=16))
    score_mod = {"causal": causal_mod(), "window": sliding_window_mod(4), None: None}[mod]
    mask = jnp.ones((2, 1, 1, 16), bool) if masked else None
    plan = ring_plan.fused_pair_plan(q, k, v, mask=mask, score_mod=score_mod, layout=layout)
    if isinstance(expected, tuple):
        assert plan == expected
    else:
        assert plan[1] is not None and expected in plan[1]


@pytest.mark.parametrize(
    ("mod", "layout", "masked", "expected"),
    [
        ("causal", "zigzag", False, (True, None)),
        (None, "striped", False, (False, None)),
        ("causal", "striped", False, "zigzag or contiguous"),
        ("window", "zigzag", False, "None or causal"),
        ("causal", "zigzag", True, "key-padding mask"),
    ],
)
def test_pallas_pair_plan(
    mod: str | None, layout: str, masked: bool, expected: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dispatch rule, with the backend query answered as on a GPU."""
    from attnax.kernels.ring import plan as ring_plan

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q, k, _ = random_qkv(24, num_heads=4, num_kv_heads=2, seq_q=16)
    score_mod = {"causal": causal_mod(), "window": sliding_window_mod(4), None: None}[mod]
    mask = jnp.ones((2, 1, 1, 16), bool) if masked else None
    plan = ring_plan.pallas_pair_plan(q, k, mask=mask, score_mod=score_mod, layout=layout)
    if isinstance(expected, tuple):
        assert plan == expected
    else:
        assert plan[1] is not None and expected in plan[1]
