"""The one dtype rule every kernel, the layer and the caches apply to query, key and value.

Attention is a softmax over dot products: it has no meaning for integers, booleans or complex
numbers, and the kernels used to give a different wrong answer each (an integer ``exp`` that
truncates, a tile that stays int32). So anything but a real floating dtype is refused with a
``TypeError`` naming the argument. The test is on the dtype, a static fact, so it costs nothing
under ``jit`` and runs whether or not shape checks are on.

Mixed floating dtypes (a bf16 query with a float32 key, a float32 query over a bf16 cache) are
promoted, as ``jnp.result_type`` promotes them, before any kernel work: the call computes and
returns in the promoted dtype, exactly as if the caller had cast first. A fast path that needs
one half type (cuDNN, the Mosaic-GPU forward) then sees the promoted inputs and takes them or
declines them like any other call of that dtype.
"""

import jax.numpy as jnp
from jaxtyping import Array

from .._checks import check_float_inputs

__all__ = ["promote_floats", "promote_qkv"]


def promote_floats(name: str, **arrays: Array) -> tuple[Array, ...]:
    """Check the dtype rule and return ``arrays`` (in the order given) in their promoted dtype.

    The promotion is ``jnp.result_type`` of all of them; an array that already has it is
    returned unchanged (no copy is traced). The keyword names are the caller's argument names,
    used in the error.
    """
    check_float_inputs(name, **arrays)
    dtype = jnp.result_type(*arrays.values())
    return tuple(x if x.dtype == dtype else x.astype(dtype) for x in arrays.values())


def promote_qkv(
    query: Array, key: Array, value: Array, *, name: str
) -> tuple[Array, Array, Array]:
    """:func:`promote_floats` for the (query, key, value) of a softmax kernel."""
    query, key, value = promote_floats(name, query=query, key=key, value=value)
    return query, key, value
