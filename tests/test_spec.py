"""AttentionSpec: rules, JSON, schema drift, example files, hashability."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from pydantic import ValidationError

import attnax

SPEC_DIR = Path(__file__).resolve().parent.parent / "spec"


def test_committed_schema_is_current() -> None:
    committed = json.loads((SPEC_DIR / "attention_spec.schema.json").read_text())
    assert committed == attnax.AttentionSpec.model_json_schema(), (
        "spec/attention_spec.schema.json drifted: run `attnax spec schema --out "
        "spec/attention_spec.schema.json`"
    )


VALID = sorted((SPEC_DIR / "examples" / "valid").glob("*.json"))
INVALID = sorted((SPEC_DIR / "examples" / "invalid").glob("*.json"))


def test_enough_examples() -> None:
    assert len(VALID) >= 3 and len(INVALID) >= 5


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_examples_validate_and_round_trip(path: Path) -> None:
    spec = attnax.AttentionSpec.model_validate_json(path.read_text())
    assert attnax.AttentionSpec.model_validate_json(spec.model_dump_json()) == spec


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_examples_name_their_field(path: Path) -> None:
    field = path.stem.split("__")[0]
    with pytest.raises(ValidationError) as info:
        attnax.AttentionSpec.model_validate_json(path.read_text())
    assert info.value.errors()[0]["loc"][0] == field


RULES = [
    (dict(num_heads=3, in_features=32), "num_heads"),
    (dict(num_heads=4, in_features=32, qkv_features=30), "num_heads"),
    (dict(num_heads=4, in_features=32, num_kv_heads=3), "num_kv_heads"),
    (dict(num_heads=4, in_features=32, num_kv_heads=8), "num_kv_heads"),
    (dict(num_heads=4, in_features=12, use_rope=True), "use_rope"),
    (dict(num_heads=4, in_features=32, attention_type="lite", attention_fn=attnax.standard_attention), "attention_fn"),
    (dict(num_heads=4, in_features=32, dropout_rate=-0.1), "dropout_rate"),
    (dict(num_heads=4, in_features=32, use_rope=True, rope_base=6e-160), "rope_base"),
    (dict(num_heads=4, in_features=32, dropout_rate=1.0), "dropout_rate"),
    (dict(num_heads=0, in_features=32), "num_heads"),
    (dict(num_heads=4, in_features=32, attention_window=0), "attention_window"),
    (dict(num_heads=4, in_features=32, attention_block_size=0), "attention_block_size"),
    (dict(num_heads=4, in_features=32, linear_attention_chunk_size=0), "linear_attention_chunk_size"),
    (dict(num_heads=4, in_features=32, attention_type="lite", attention_window=8), "attention_window"),
    (dict(num_heads=4, in_features=32, param_dtype="int32"), "param_dtype"),
]


@pytest.mark.parametrize(("fields", "named"), RULES)
def test_each_rule_names_its_field(fields: dict[str, object], named: str) -> None:
    with pytest.raises(ValidationError) as info:
        attnax.AttentionSpec(**fields)  # type: ignore[arg-type]
    assert info.value.errors()[0]["loc"] == (named,)
    # The layer's constructor goes through the same rules.
    from flax import nnx

    with pytest.raises(ValueError, match=named):
        attnax.MultiHeadAttention(nnx.Rngs(0), **fields)  # type: ignore[arg-type]


def test_derived_values() -> None:
    spec = attnax.AttentionSpec(num_heads=8, in_features=64, num_kv_heads=2, qkv_features=128)
    assert (spec.head_dim, spec.kv_features, spec.resolved_out_features) == (16, 32, 64)
    assert spec.resolved_num_kv_heads == 2 and spec.resolved_qkv_features == 128
    with pytest.raises(ValidationError):  # derived values are read-only
        spec.head_dim = 3  # type: ignore[misc]


def test_frozen_and_hashable_static_jit_argument() -> None:
    spec = attnax.AttentionSpec(num_heads=2, in_features=8, attention_type=attnax.AttentionType.FLASH)
    assert spec.attention_type is attnax.AttentionType.FLASH
    with pytest.raises(ValidationError):
        spec.num_heads = 4  # type: ignore[misc]
    same = attnax.AttentionSpec.model_validate({"num_heads": 2, "in_features": 8, "attention_type": "flash"})
    assert hash(spec) == hash(same) and spec == same

    traces = []

    def width(x: jax.Array, spec: attnax.AttentionSpec) -> jax.Array:
        traces.append(spec)
        return x * spec.head_dim

    jitted = jax.jit(width, static_argnames="spec")
    assert float(jitted(jnp.ones(()), spec=spec)) == 4.0
    jitted(jnp.ones(()), spec=same)
    assert len(traces) == 1


def test_callables_refuse_json_but_specs_with_callables_stay_hashable() -> None:
    spec = attnax.AttentionSpec(num_heads=2, in_features=8, score_mod=attnax.causal_mod())
    hash(spec)
    with pytest.raises(ValueError, match="callable"):
        spec.model_dump_json()
    assert attnax.AttentionSpec(num_heads=2, in_features=8).model_dump_json()


def test_schema_has_every_field() -> None:
    schema = attnax.AttentionSpec.model_json_schema()
    assert set(schema["properties"]) == set(attnax.AttentionSpec.model_fields)
    assert schema["additionalProperties"] is False
