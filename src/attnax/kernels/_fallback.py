"""The one door through which a kernel hands on a call it cannot serve itself.

A kernel never imports another kernel's public entry: that kept an import cycle alive and hid
each backend's fallback inside the kernels. Instead a kernel that can decline a call (FLASH
where cuDNN cannot take it, PALLAS_FLASH off the GPU) asks :func:`fallback` for the kernel that
the backend table, ``attnax._backends``, names for it. The table fills this registry when
``attnax`` is imported, which any import of a kernel does first.
"""

from typing import Protocol

from jaxtyping import Array

from .._typing import AttentionMask, ScoreMod


class FallbackKernel(Protocol):
    """What a declining kernel calls: (batch, heads, seq, head_dim) in and out."""

    def __call__(
        self,
        query: Array,
        key: Array,
        value: Array,
        *,
        mask: AttentionMask | None,
        score_mod: ScoreMod | None,
        scale: float | None,
        block_size: int,
        dropout_rng: Array | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = True,
    ) -> Array: ...


_FALLBACKS: dict[str, FallbackKernel] = {}


def register_fallback(kernel: str, fallback_kernel: FallbackKernel) -> None:
    """Name the kernel that serves the calls ``kernel`` declines (the backend table does this)."""
    _FALLBACKS[kernel] = fallback_kernel


def fallback(kernel: str) -> FallbackKernel:
    """The kernel the backend table names for the calls ``kernel`` declines."""
    try:
        return _FALLBACKS[kernel]
    except KeyError:
        raise RuntimeError(
            f"{kernel}: no fallback is registered; import attnax (its backend table, "
            "attnax._backends, registers every kernel's fallback)."
        ) from None


