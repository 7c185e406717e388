"""GPU helpers every Pallas kernel shares: tile arithmetic and the Triton launch parameters.

One place for them, so the kernels' packages import these public names instead of each other's
private helpers.
"""

from typing import Any


def is_power_of_two(value: int) -> bool:
    """Whether ``value`` is a positive power of two (Triton tiles must be)."""
    return value > 0 and value & (value - 1) == 0


def next_power_of_two(value: int) -> int:
    """The smallest power of two ``>= value`` (1 for ``value <= 1``)."""
    return 1 << max(0, (value - 1).bit_length())


def triton_compiler_params(num_warps: int, num_stages: int, *, interpret: bool = False) -> Any:
    """Pallas-Triton launch parameters; None in interpret mode, where they mean nothing.

    The Triton module is imported on first use: it is needed only on a GPU.
    """
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
