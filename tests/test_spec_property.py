"""Property: any field combination builds a layer that runs, or raises ValidationError."""

import jax
import numpy as np
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import attnax

_fields = st.fixed_dictionaries(
    {
        "num_heads": st.integers(-1, 8),
        "in_features": st.integers(-1, 48),
    },
    optional={
        "qkv_features": st.none() | st.integers(-1, 48),
        "out_features": st.none() | st.integers(-1, 24),
        "num_kv_heads": st.none() | st.integers(-1, 9),
        "dropout_rate": st.floats(-0.5, 1.5, allow_nan=False),
        "broadcast_dropout": st.booleans(),
        "decode": st.booleans(),
        "attention_type": st.sampled_from([t.value for t in attnax.AttentionType] + ["bogus"]),
        "attention_block_size": st.integers(-2, 40),
        "linear_attention_chunk_size": st.integers(-2, 12),
        "attention_window": st.none() | st.integers(-1, 12),
        "use_rope": st.booleans(),
        "rope_base": st.floats(-1.0, 1e5, allow_nan=False),
        "rope_max_positions": st.integers(-1, 64),
        "dtype": st.sampled_from([None, "float32", "bfloat16", "int32", "nonsense"]),
        "param_dtype": st.sampled_from(["float32", "bfloat16", "float16", "bool"]),
        "score_mod": st.sampled_from([None, attnax.causal_mod(), attnax.alibi_mod(4)]),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=_fields, seq=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_spec_builds_a_running_layer_or_raises_validation_error(
    fields: dict[str, object], seq: int, seed: int
) -> None:
    try:
        spec = attnax.AttentionSpec.model_validate(fields)
    except ValidationError:
        return
    layer = attnax.MultiHeadAttention.from_spec(spec, rngs=nnx.Rngs(seed))
    seq = min(seq, spec.rope_max_positions) if spec.use_rope else seq
    x = jax.random.normal(jax.random.key(seed), (2, seq, spec.in_features))
    out = layer(x, deterministic=False)
    assert out.shape == (2, seq, spec.resolved_out_features)
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
