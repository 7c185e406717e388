"""The runtime shape-check switch.

Checks are off by default and then cost one boolean test per call. ``ATTNAX_SHAPE_CHECKS=1`` in
the environment (read at import) or the :func:`shape_checks` context manager turns them on:
every public kernel then runs through jaxtyping + beartype, so a wrong rank, a head_dim that
differs between query and key, or a key/value head count that does not divide the query's
raises ``TypeError`` naming the argument, also while tracing under ``jax.jit``.
"""

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar, overload

import beartype
import jax.numpy as jnp
import jaxtyping
import numpy as np

__all__ = [
    "check_attention_output",
    "check_float_inputs",
    "check_head_grouping",
    "positive_int",
    "shape_checked",
    "shape_checks",
    "shape_checks_enabled",
]


def positive_int(value: int, argument: str, *, caller: str | None = None) -> int:
    """``value`` as an int if it is a positive integer (not a bool), else a ValueError naming
    ``argument`` (and the ``caller``, when given)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        where = f"{caller}: " if caller else ""
        raise ValueError(f"{where}`{argument}` must be a positive int, got {value!r}.")
    return int(value)


def check_float_inputs(name: str, **arrays: Any) -> None:
    """Raise ``TypeError`` unless every given array has a real floating dtype.

    Attention is a softmax over dot products: integers, booleans and complex numbers have no
    meaning there, and the kernels used to give a different wrong answer each. The test is on
    the dtype, a static fact, so it costs nothing under ``jit`` and runs whether or not shape
    checks are on (with checks on, it runs before jaxtyping so the message names the fix).

    Args:
      name: the calling kernel or function, named first in the message.
      **arrays: the arguments by the names the caller's signature gives them; ``None`` skipped.

    Raises:
      TypeError: naming the first argument that is not floating point, its dtype and the fix.
    """
    for arg, array in arrays.items():
        if array is None:
            continue
        dtype = jnp.result_type(array)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{name}: `{arg}` must have a floating dtype (bfloat16, float16, float32 or "
                f"float64), got {dtype}; cast it first, e.g. `{arg}.astype(jnp.float32)`."
            )


# The arguments the dtype rule covers, by the names kernels and caches give them.
_FLOAT_ARGUMENTS = (
    "query", "key", "value", "keys", "values", "keys_new", "values_new", "key_pool", "value_pool"
)


def _float_arguments_of(kernel: Callable[..., Any]) -> tuple[tuple[int, str], ...]:
    """(position, name) of the parameters of ``kernel`` that the dtype rule covers."""
    names = list(inspect.signature(kernel).parameters)
    return tuple((i, n) for i, n in enumerate(names) if n in _FLOAT_ARGUMENTS)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _env_flag() -> bool:
    return os.environ.get("ATTNAX_SHAPE_CHECKS", "").strip().lower() in {"1", "true", "yes", "on"}


# A list, not a bare bool, so the context manager nests and restores exactly.
_enabled_stack: list[bool] = [_env_flag()]


def shape_checks_enabled() -> bool:
    """Whether runtime shape checks are on.

    Returns:
      True inside ``with shape_checks():``, or with ``ATTNAX_SHAPE_CHECKS=1`` at import.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> with attnax.shape_checks(True):
      ...     print(attnax.shape_checks_enabled())
      ...     with attnax.shape_checks(False):
      ...         print(attnax.shape_checks_enabled())
      True
      False
    """
    return _enabled_stack[-1]


@contextlib.contextmanager
def shape_checks(enabled: bool = True) -> Iterator[None]:
    """Turn runtime shape checks on (or off) inside a ``with`` block.

    Checks happen when a kernel is traced, so a function jitted outside the block keeps the
    behaviour it was traced with.

    Args:
      enabled: turn checks on (True) or off (False) inside the block; blocks nest.

    Yields:
      Nothing; the previous setting is restored on exit.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> query = jnp.ones((1, 2, 8, 4))
      >>> key = jnp.ones((1, 2, 8, 3))  # head_dim 3 does not match the query's 4
      >>> # On: jaxtyping's TypeError naming `key`; off: the kernel's own ValueError.
      >>> for enabled in (True, False):
      ...     with attnax.shape_checks(enabled):
      ...         try:
      ...             attnax.standard_attention(query, key, key)
      ...         except (TypeError, ValueError) as error:
      ...             print(enabled, isinstance(error, TypeError))
      True True
      False False
    """
    _enabled_stack.append(enabled)
    try:
        yield
    finally:
        _enabled_stack.pop()


def check_head_grouping(query_heads: int, kv_heads: int, *, argument: str = "key") -> None:
    """Raise ``TypeError`` unless the key/value head count divides the query head count."""
    if kv_heads < 1 or query_heads % kv_heads != 0:
        raise TypeError(
            f"`{argument}` has {kv_heads} heads, which does not divide the query's "
            f"{query_heads} heads; give key and value a head count that divides it "
            "(num_kv_heads in the layer)."
        )


def _grouping_of(args: tuple[Any, ...], kwargs: dict[str, Any], head_axis: int) -> None:
    query = kwargs.get("query", args[0] if len(args) > 0 else None)
    key = kwargs.get("key", args[1] if len(args) > 1 else None)
    value = kwargs.get("value", args[2] if len(args) > 2 else None)
    shapes = [getattr(x, "shape", None) for x in (query, key, value)]
    if any(s is None or len(s) != 4 for s in shapes):
        return  # jaxtyping reports rank errors with the argument's name.
    q_shape, k_shape, v_shape = shapes
    assert q_shape is not None and k_shape is not None and v_shape is not None
    check_head_grouping(q_shape[head_axis], k_shape[head_axis], argument="key")
    check_head_grouping(q_shape[head_axis], v_shape[head_axis], argument="value")


@overload
def shape_checked(fn: Callable[_P, _R], /) -> Callable[_P, _R]: ...


@overload
def shape_checked(
    *, head_axis: int | None = 1
) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]: ...


def shape_checked(
    fn: Callable[_P, _R] | None = None, /, *, head_axis: int | None = 1
) -> Callable[_P, _R] | Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Decorate a kernel so that its jaxtyping annotations are enforced while checks are on.

    Besides the annotations, the head count of ``key`` and ``value`` (arguments 2 and 3) must
    divide the query's along ``head_axis`` (1 for (B, H, T, D), 2 for (B, T, H, D)); kernels
    whose second and third arguments are not key and value (a paged pool) pass ``None``.
    The jaxtyping wrapper is built once, at decoration, so a checked call costs no rebuild.
    """

    def decorate(kernel: Callable[_P, _R]) -> Callable[_P, _R]:
        checked = jaxtyping.jaxtyped(typechecker=beartype.beartype)(kernel)
        float_arguments = _float_arguments_of(kernel)

        @functools.wraps(kernel)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            if not _enabled_stack[-1]:
                return kernel(*args, **kwargs)
            check_float_inputs(
                kernel.__name__,
                **{n: kwargs.get(n, args[i] if i < len(args) else None) for i, n in float_arguments},
            )
            if head_axis is not None:
                _grouping_of(args, kwargs, head_axis)
            return checked(*args, **kwargs)

        return wrapper

    return decorate if fn is None else decorate(fn)


def check_attention_output(output: Any, query: Any, *, source: str) -> None:
    """Check a user ``attention_fn``'s output against the query's layout (when checks are on)."""
    if not _enabled_stack[-1]:
        return
    expected = tuple(query.shape)
    got = tuple(getattr(output, "shape", ()))
    if got != expected:
        raise TypeError(
            f"{source} returned an array of shape {got}; an AttentionFn must return the query's "
            f"layout (batch, heads, seq, head_dim) = {expected}."
        )
