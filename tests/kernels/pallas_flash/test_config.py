"""FlashConfig: a frozen, strict pydantic model whose every rule names the field it refuses."""

from typing import Any

import pydantic
import pytest

from attnax.kernels.pallas_flash import FlashConfig, default_config, stepped_config

TILE_FIELDS = ("block_q", "block_kv", "block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq")


def test_bad_mosaic_settings_name_the_field() -> None:
    # Moved from the public entry's block-size test (test_api.py).
    with pytest.raises(ValueError, match="mosaic_block_kv.*multiple of 64"):
        FlashConfig(mosaic_block_kv=32)
    with pytest.raises(ValueError, match="mosaic_stages"):
        FlashConfig(mosaic_stages=1)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        *((name, 48, "power of two") for name in TILE_FIELDS),
        *((name, 8, "greater than or equal to 16") for name in TILE_FIELDS),
        ("block_q", True, "valid integer"),  # strict: a bool is no tile
        ("block_kv", 64.0, "valid integer"),
        ("num_warps", 0, "greater than 0"),
        ("num_stages", 0, "greater than 0"),
        ("num_warps_bwd", -4, "greater than 0"),
        ("num_stages_bwd", 0, "greater than 0"),
        ("key_step_blocks", -1, "greater than or equal to 0"),
        ("key_step_blocks", True, "valid integer"),
        ("interpret", 1, "valid boolean"),
        ("use_mosaic_forward", "yes", "valid boolean"),
        ("use_mosaic_backward", 0, "valid boolean"),
        ("mosaic_block_kv", 96, "multiple of 64"),
        ("mosaic_block_kv", 192, "power of two"),
        ("mosaic_block_kv", 0, "greater than or equal to 16"),
        ("mosaic_stages", 1, "greater than or equal to 2"),
        ("mosaic_dkv_stages", 1, "greater than or equal to 2"),
        ("mosaic_dq_stages", 0, "greater than or equal to 2"),
        ("mosaic_dkv_block_q", 32, "64 or 128"),
        ("mosaic_dq_block_kv", 256, "64 or 128"),
    ],
)
def test_each_rule_raises_a_validation_error_naming_the_field(
    field: str, value: Any, message: str
) -> None:
    with pytest.raises(pydantic.ValidationError) as raised:
        FlashConfig(**{field: value})
    errors = raised.value.errors()
    assert [error["loc"] for error in errors] == [(field,)]
    assert message in errors[0]["msg"]
    assert field in str(raised.value)


def test_unknown_and_removed_fields_are_refused() -> None:
    # extra="forbid": a misspelt knob, or one removed with the code path it measured, fails.
    for removed in ("mosaic_forward", "transposed_dkv", "wide_dq", "num_warps_dq",
                    "num_stages_dq", "num_stages_listed", "num_stages_bwd_listed"):
        with pytest.raises(pydantic.ValidationError, match=removed):
            FlashConfig(**{removed: True})


def test_valid_edges_are_accepted() -> None:
    config = FlashConfig(
        block_q=16, block_kv=1024, num_warps=None, num_warps_bwd=None, key_step_blocks=0,
        mosaic_block_kv=64, mosaic_stages=2, mosaic_dkv_block_q=128, mosaic_dq_block_kv=64,
    )
    assert config.block_q == 16 and config.mosaic_block_kv == 64
    flags: dict[str, bool] = {"interpret": True, "use_mosaic_forward": False}
    assert FlashConfig(**flags).interpret


def test_frozen_and_hashable_as_a_jit_static() -> None:
    config = FlashConfig()
    assert hash(config) == hash(FlashConfig()) and config == FlashConfig()
    assert hash(FlashConfig(block_q=64)) != hash(config) or FlashConfig(block_q=64) != config
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.block_q = 64
    assert len({config, FlashConfig(), FlashConfig(interpret=True)}) == 2


def test_stepped_config_is_a_copy_with_key_steps() -> None:
    base = default_config(128, 128, 128, False)
    stepped = stepped_config(128, 1000, 512)
    assert stepped.key_step_blocks == 4 and base.key_step_blocks == 0
    assert stepped.model_copy(update={"key_step_blocks": 0}) == base
    # A short sequence shrinks the tile, so a step holds more of them.
    assert stepped_config(128, 40, 512).key_step_blocks == 512 // 64
    assert default_config(256, 128, 128, True).block_q == 64
