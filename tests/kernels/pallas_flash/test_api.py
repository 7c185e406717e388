"""The public entry pallas_flash_attention: its refusals, its fallback and its values through
the default configuration on a GPU."""

import os
import pathlib
import re
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax import _mods as mods
from attnax.kernels.pallas_flash import api, pallas_flash_attention
from tests._reference import random_qkv, reference_attention, relative_error
from tests.kernels.pallas_flash._cases import gpu_case


def test_dropout_is_not_implemented() -> None:
    q, k, v = random_qkv(9)
    with pytest.raises(NotImplementedError, match="memory_efficient_attention"):
        pallas_flash_attention(
            q, k, v, dropout_rate=0.1, dropout_rng=jax.random.key(0), deterministic=False
        )


@jax.tree_util.register_pytree_node_class
class _TableMod:
    """A user mod holding an array the kernel cannot tile."""

    def __init__(self, table: jax.Array) -> None:
        self.table = table

    def __call__(self, s: Any, b: Any, h: Any, q: Any, kv: Any) -> Any:
        return s + self.table[h]

    def tree_flatten(self) -> tuple[tuple[jax.Array], None]:
        return (self.table,), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: tuple[jax.Array]) -> "_TableMod":
        return cls(*children)


def test_array_holding_user_mod_is_rejected_by_name() -> None:
    q, k, v = random_qkv(10)
    with pytest.raises(NotImplementedError, match="_TableMod.*memory_efficient_attention"):
        pallas_flash_attention(q, k, v, score_mod=_TableMod(jnp.ones(4)), interpret=True)


def test_fallback_matches_reference() -> None:
    # force_fallback (and any non-GPU backend without interpret) uses the backend table's
    # fallback, memory_efficient_attention.
    q, k, v = random_qkv(11, seq_q=20, seq_kv=28, num_kv_heads=1)
    out = pallas_flash_attention(q, k, v, score_mod=mods.causal_mod(), force_fallback=True)
    expected = reference_attention(q, k, v, score_mod=mods.causal_mod())
    assert relative_error(out, expected) < 1e-5


def test_bad_block_size_names_the_argument() -> None:
    q, k, v = random_qkv(12)
    with pytest.raises(ValueError, match="block_q"):
        pallas_flash_attention(q, k, v, block_q=48, interpret=True)
    # FlashConfig's own refusals (mosaic_block_kv, mosaic_stages): test_config.py.


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [256, 64, 128])
def test_gpu_causal_head_dims(head_dim: int) -> None:
    gpu_case(mods.causal_mod(), seq=1000, dtype=jnp.bfloat16, head_dim=head_dim)


@pytest.mark.gpu
def test_gpu_alibi_window_gqa() -> None:
    score_mod = mods.compose_score_mods(mods.alibi_mod(8), mods.sliding_window_mod(256))
    gpu_case(score_mod, seq=2048, dtype=jnp.bfloat16, num_kv_heads=2)


@pytest.mark.gpu
def test_gpu_documents_softcap_float32() -> None:
    ids = jnp.asarray(np.repeat(np.arange(4), [300, 500, 200, 24])[None].repeat(2, 0))
    score_mod = mods.compose_score_mods(mods.softcap_mod(20.0), mods.document_mask_mod(ids))
    gpu_case(score_mod, seq=1024, dtype=jnp.float32, num_kv_heads=1, head_dim=64)


def test_import_leaves_mosaic_gpu_and_triton_unloaded() -> None:
    # jax's Mosaic-GPU and Triton Pallas modules are imported on first use (0.3 s), not with
    # attnax; a fresh interpreter shows it whatever this test session has imported.
    source = str(pathlib.Path(api.__file__).parents[3])  # the attnax under test
    code = (
        "import sys, attnax; "
        "print('jax.experimental.pallas.mosaic_gpu' in sys.modules, "
        "'jax.experimental.pallas.triton' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": source})
    assert result.stdout.split() == ["False", "False"]


def test_pallas_flash_imports_no_other_kernel() -> None:
    # The fallback goes through attnax.kernels._fallback: no module of the package imports
    # another kernel, the backend table or the layer (the cycle through _memory_efficient is
    # gone).
    other = re.compile(
        r"from \.\.(_memory_efficient|_flash|_standard|_ring\w*|_linear\w*|_lite|_decode|_paged)\b"
        r"|from \.\.\.(_backends|_layer|_spec|_cli)\b"
    )
    package = pathlib.Path(api.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert len(modules) == 10
    for path in modules:
        assert not other.search(path.read_text()), path.name
