"""PALLAS_FLASH's tile sizes and launch parameters: :class:`FlashConfig` and the two
configurations the entries build from it (:func:`default_config`, :func:`stepped_config`).

A frozen pydantic model, so it is hashable (the kernels take it as a ``jax.jit`` static
argument) and every field is checked when it is built; its errors name the field and the fix.
"""

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt
from pydantic import ValidationInfo

from .._gpu import is_power_of_two, next_power_of_two

__all__ = [
    "FAST_FORWARD_BLOCK_KV",
    "NAME",
    "FlashConfig",
    "default_config",
    "fit",
    "stepped_config",
]

NAME = "pallas_flash_attention"
# The forward key tile our own callers pass (MultiHeadAttention, FLASH's Pallas path): at
# head_dim <= 128 on an H100, 64 ran every masked config's forward 5-16% faster than the
# signature's 128 (benchmarks/NOTES.md, "Tenth session", call 5). Full attention takes the
# Mosaic-GPU kernel there whatever the tile; head_dim 256 halves the tiles anyway.
FAST_FORWARD_BLOCK_KV = 64


def power_of_two_tile(value: int, info: ValidationInfo) -> int:
    """A Triton tile must be a power of two."""
    if not is_power_of_two(value):
        raise ValueError(
            f"`{info.field_name}` must be a power of two (Triton tiles), got {value}."
        )
    return value


def whole_mosaic_tiles(value: int, info: ValidationInfo) -> int:
    """The Mosaic-GPU forward's shared-memory tiles are 64 keys wide."""
    if value % 64:
        raise ValueError(
            f"`{info.field_name}` must be a multiple of 64 (the Mosaic-GPU forward's "
            f"shared-memory tiles are 64 wide), got {value}."
        )
    return value


# A Triton tile: a power of two >= 16 (shrunk to the padded sequence for short ones).
TileSize = Annotated[int, Field(ge=16), AfterValidator(power_of_two_tile)]
# One slot would make the producer wait for a step to finish before loading the next: no
# pipeline (JAX's Mosaic-GPU example requires two as well).
MosaicSlots = Annotated[int, Field(ge=2)]
def mosaic_streamed_tile(value: int, info: ValidationInfo) -> int:
    """Either divides the whole 128-row tiles the Mosaic-GPU backward's selection requires of
    both sequences (``plan.mosaic_backward_applies``)."""
    if value not in (64, 128):
        raise ValueError(f"`{info.field_name}` must be 64 or 128, got {value}.")
    return value


# An int, not a Literal, so that ``FlashConfig(**settings)`` with a ``dict[str, int]`` (the
# benchmarks' sweeps) type-checks.
MosaicStreamedTile = Annotated[int, AfterValidator(mosaic_streamed_tile)]


class FlashConfig(BaseModel):
    """Tile sizes and Triton launch parameters of the three kernels (hashable: a jit static).

    Block sizes are powers of two >= 16; they are shrunk to the (padded) sequence length for
    short sequences. ``num_warps`` ``None`` picks 8 for head_dim > 64 with forward tiles above
    128 x 64, and 4 otherwise.

    Raises:
      pydantic.ValidationError: (a ValueError) naming the field, for a value out of its range.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    block_q: TileSize = 128
    block_kv: TileSize = 128
    # Backward defaults from the H100 sweep (benchmarks/NOTES.md): 64x64 tiles with 4 warps
    # ran B4 S4096 causal forward+backward in 3.26 ms against 6.68 ms for 64x128 / 128x64
    # with 8 warps (register pressure of two (bk, D) float32 accumulators).
    block_q_dkv: TileSize = 64
    block_kv_dkv: TileSize = 64
    block_q_dq: TileSize = 64
    block_kv_dq: TileSize = 64
    num_warps: PositiveInt | None = None
    num_stages: PositiveInt = 2
    # Both backward kernels' launch parameters (the dQ kernel takes its own only where the
    # wide dQ tile applies: ``plan.dq_launch``).
    num_warps_bwd: PositiveInt | None = 4
    num_stages_bwd: PositiveInt = 2
    interpret: bool = False
    # 0: one kernel walks every key block of a query block with its softmax state in
    # registers (PALLAS_FLASH). n > 0: an XLA scan over steps of n key blocks, one kernel per
    # step, with the float32 state (accumulator, maximum, denominator) in HBM between steps
    # (memory_efficient_attention's GPU path: the tile is fused, the loop over key blocks is
    # XLA's). The backward is the same either way.
    key_step_blocks: NonNegativeInt = 0
    # Full attention (no mask, no score mod, no bias) on a Hopper GPU with 2-byte inputs at
    # head_dim 64/128 and lengths in whole tiles: the forward runs the Mosaic-GPU kernel
    # (``mosaic.py``; warp-specialised, wgmma) instead of the Triton one
    # (``plan.mosaic_forward_applies``). False: Triton everywhere.
    use_mosaic_forward: bool = True
    # Its key tile and K/V pipeline slots (the query tile is fixed at 2 x 64 rows).
    mosaic_block_kv: Annotated[
        int, Field(ge=16), AfterValidator(whole_mosaic_tiles), AfterValidator(power_of_two_tile)
    ] = 128
    mosaic_stages: MosaicSlots = 2
    # Where the Mosaic-GPU forward applies, both backward kernels in Mosaic GPU too
    # (``mosaic_vjp.py``): -10% and -14% on full attention's forward+backward against the
    # Triton backward (B4 S4096, B1 S16384; NOTES, "Tenth session"). False: the Triton
    # backward, reading the Mosaic-GPU forward's log-sum-exp.
    use_mosaic_backward: bool = True
    # Its tiles and pipeline slots. The dK/dV kernel owns 2 x 64 keys and streams query tiles
    # of ``mosaic_dkv_block_q`` rows (Q, dO, lse, delta); the dQ kernel owns 2 x 64 queries
    # and streams key tiles of ``mosaic_dq_block_kv`` rows (K, V). On an H100 128-key dQ
    # tiles took 4-6% off the forward+backward; 128-query dK/dV tiles were no better (+2.5%
    # at B4 S4096), nor were three dK/dV slots (within 1%).
    mosaic_dkv_block_q: MosaicStreamedTile = 64
    mosaic_dq_block_kv: MosaicStreamedTile = 128
    mosaic_dkv_stages: MosaicSlots = 2
    mosaic_dq_stages: MosaicSlots = 2


def default_config(head_dim: int, block_q: int, block_kv: int, interpret: bool) -> FlashConfig:
    """The public entry's configuration: forward tiles from the caller, backward from the sweep.

    head_dim 256 halves the tiles (and pipelines less): a 128 x 256 bf16 tile is 64 KiB, and
    the forward's q, k and v tiles at two stages would overflow the H100's 227 KiB of shared
    memory.
    """
    if head_dim > 128:
        return FlashConfig(
            block_q=min(block_q, 64),
            block_kv=min(block_kv, 64),
            block_q_dkv=32,
            block_kv_dkv=64,
            block_q_dq=64,
            block_kv_dq=32,
            num_warps=8,
            num_stages=2,
            num_warps_bwd=4,
            num_stages_bwd=1,
            interpret=interpret,
        )
    return FlashConfig(block_q=block_q, block_kv=block_kv, interpret=interpret)


def stepped_config(
    head_dim: int,
    seq_kv: int,
    block_size: int,
    *,
    interpret: bool = False,
    block_q: int = 128,
    block_kv: int = 128,
) -> FlashConfig:
    """memory_efficient_attention's GPU configuration: steps of ``block_size`` keys.

    The kernel tiles are PALLAS_FLASH's; a step holds ``block_size // tile`` key tiles (at
    least one), so ``block_size`` keeps its meaning, the keys one XLA loop iteration visits.
    """
    config = default_config(head_dim, block_q, block_kv, interpret)
    tile = fit(config.block_kv, seq_kv)
    return config.model_copy(update={"key_step_blocks": max(1, block_size // tile)})


def fit(block: int, length: int) -> int:
    """The tile actually used: ``block`` unless the sequence is shorter (never below 16)."""
    return min(block, max(16, next_power_of_two(length)))
