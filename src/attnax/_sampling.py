"""Token sampling for :func:`attnax.generate`: temperature, top-k and top-p in one function."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._checks import positive_int
from ._typing import PRNGKeyArray

__all__ = ["sample_logits"]


def sample_logits(
    logits: Float[Array, "B V"],
    rng: PRNGKeyArray,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Int[Array, " B"]:
    """Sample one token per row: temperature, then top-k, then top-p (nucleus) filtering.

    ``temperature=0`` is greedy (``argmax``; ``rng``, ``top_k`` and ``top_p`` are then unused).
    Otherwise the logits are divided by ``temperature``, every logit below the ``top_k``-th
    largest is dropped, then the smallest set of most likely tokens whose probability reaches
    ``top_p`` is kept (the most likely token always is), and a token is drawn from what is
    left. Bind the options with ``functools.partial`` to get :func:`attnax.generate`'s ``sample``.

    Args:
      logits: (batch, vocab).
      rng: a PRNG key.
      temperature: >= 0, a Python float (it decides the greedy branch when tracing).
      top_k: keep the ``top_k`` most likely tokens (ties at the k-th logit are kept).
      top_p: in (0, 1]; keep the nucleus of this probability mass.

    Returns:
      (batch,) int32 tokens.

    Raises:
      ValueError: for a negative temperature, a non-positive ``top_k`` or ``top_p`` outside
        (0, 1].

    Example:
      >>> import functools, jax, jax.numpy as jnp, attnax
      >>> logits = jnp.array([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 4.9, 0.0]])
      >>> key = jax.random.key(0)
      >>> attnax.sample_logits(logits, key, temperature=0.0).tolist()  # greedy
      [1, 0]
      >>> attnax.sample_logits(logits, key, top_k=1).tolist()
      [1, 0]
      >>> sample = functools.partial(attnax.sample_logits, temperature=0.8, top_k=2)
      >>> bool(jnp.all(jnp.isin(sample(logits, key), jnp.array([[1, 3], [0, 2]]))))
      True
    """
    name = "sample_logits"
    if logits.ndim != 2:
        raise ValueError(f"{name}: `logits` must be (batch, vocab), got shape {logits.shape}.")
    if not temperature >= 0:
        raise ValueError(f"{name}: `temperature` must be >= 0 (0 is greedy), got {temperature!r}.")
    if top_k is not None:
        positive_int(top_k, "top_k", caller=name)
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"{name}: `top_p` must be in (0, 1], got {top_p!r}.")
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    drop = jnp.asarray(-jnp.inf, jnp.float32)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, drop, scaled)
    if top_p is not None and top_p < 1:
        descending = -jnp.sort(-scaled, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: the first is kept
        threshold = jnp.take_along_axis(descending, kept - 1, axis=-1)
        scaled = jnp.where(scaled < threshold, drop, scaled)
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
