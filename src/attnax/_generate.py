"""Generation in one compiled loop: :func:`prefill` and :func:`generate`.

A decode loop of Python calls to a jitted step pays the host's dispatch on every token and
hands the cache back and forth; here the whole loop is one ``lax.while_loop`` that stops once
every row has ended (or, with ``stop_early=False``, a loop of ``num_steps`` iterations that
XLA knows), so the caller jits it once and donates the cache::

    @functools.partial(jax.jit, donate_argnums=1)  # the cache's buffers are updated in place
    def run(params, cache, prompt):
        step = functools.partial(forward, params)  # (tokens (B, T), cache) -> (logits, cache)
        _, cache = attnax.prefill(step, cache, prompt[:, :-1], chunk_size=512)
        return attnax.generate(step, cache, prompt[:, -1:], num_steps=256, end_token=eos)

Pass the parameters as an argument (not closed over), or they become constants of the program.
The loop carries the cache, so XLA writes each step's keys and values into the carried (and,
donated, the caller's) buffers instead of copying the cache per token.

The model is any function ``(tokens, cache) -> (logits, cache)``; the cache is any pytree. Its
:class:`KVLayerCache` / :class:`PagedKVCache` leaves (a list of per-layer caches, say) are the
ones this module understands: it holds the lengths of rows that have ended, and it reads their
``overflow`` flags, which a jitted write sets instead of raising (see :mod:`attnax._cache`), so an
overflow inside the loop stops that row and is returned, never lost.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, Generic, TypeAlias, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ._cache import KVLayerCache, PagedKVCache
from ._checks import positive_int
from ._typing import PRNGKeyArray

__all__ = ["GenerateResult", "any_overflow", "generate", "prefill"]

CacheT = TypeVar("CacheT")

# (tokens (B, T) int32, cache) -> (logits (B, T, V), new cache); generate also accepts (B, V).
ForwardFn: TypeAlias = Callable[[Int[Array, "B T"], CacheT], tuple[Array, CacheT]]
# (logits (B, V), key) -> tokens (B,)
SampleFn: TypeAlias = Callable[[Float[Array, "B V"], PRNGKeyArray], Int[Array, " B"]]


def _is_cache(node: Any) -> bool:
    return isinstance(node, (KVLayerCache, PagedKVCache))


def _attnax_caches(tree: Any) -> list[KVLayerCache | PagedKVCache]:
    return [leaf for leaf in jax.tree_util.tree_leaves(tree, is_leaf=_is_cache) if _is_cache(leaf)]


def _flags(cache: KVLayerCache | PagedKVCache) -> Bool[Array, " B"]:
    return cache.overflow if isinstance(cache, KVLayerCache) else cache.overflow_flags


def any_overflow(caches: Any) -> Bool[Array, " B"]:
    """Per row: did any write into any attnax cache in ``caches`` overflow (jittable)?

    Under ``jit`` (and so inside :func:`generate` and :func:`prefill`) a write that does not fit
    is dropped and sets the cache's sticky ``overflow`` flag; this ORs the flags of every
    :class:`KVLayerCache` and :class:`PagedKVCache` in a pytree (one layer's cache, a list of
    them, a dict ...).

    Args:
      caches: a pytree holding attnax caches of one batch.

    Returns:
      (batch,) bool.

    Raises:
      ValueError: when ``caches`` holds no attnax cache.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> caches = [attnax.init_kv_layer_cache(2, 1, 4, max_len=3) for _ in range(2)]
      >>> new = jnp.ones((2, 1, 4, 4))  # four tokens do not fit in three slots
      >>> caches[1] = jax.jit(attnax.update_kv_layer_cache)(caches[1], new, new, 0)
      >>> attnax.any_overflow(caches).tolist()
      [True, True]
    """
    found = _attnax_caches(caches)
    if not found:
        raise ValueError(
            "any_overflow: `caches` holds no KVLayerCache or PagedKVCache; pass the pytree of "
            "attnax caches the model decodes with."
        )
    flags = _flags(found[0])
    for cache in found[1:]:
        flags = flags | _flags(cache)
    return flags


def _row_overflow(caches: Any, batch: int) -> Bool[Array, " B"]:
    """:func:`any_overflow`, all False for a cache pytree without attnax caches."""
    if not _attnax_caches(caches):
        return jnp.zeros((batch,), bool)
    return any_overflow(caches)


def _with_flags(caches: CacheT) -> CacheT:
    """Paged caches built by hand carry ``overflow=None``; a loop carry needs a fixed structure."""

    def fill(node: Any) -> Any:
        if isinstance(node, PagedKVCache) and node.overflow is None:
            return dataclasses.replace(node, overflow=node.overflow_flags)
        return node

    filled: CacheT = jax.tree_util.tree_map(fill, caches, is_leaf=_is_cache)
    return filled


def _hold_lengths(old: CacheT, new: CacheT, hold: Bool[Array, " B"]) -> CacheT:
    """Rows in ``hold`` keep their old lengths: an ended row's junk write is never counted.

    Only the lengths are selected (B ints per layer), not the keys and values: the junk lands
    at the row's length, beyond what attention reads, and the next write overwrites it. A ring
    buffer's slot ``length % capacity`` holds a position the window no longer reaches.
    """

    def pick(before: Any, after: Any) -> Any:
        if isinstance(after, KVLayerCache):
            return dataclasses.replace(after, length=jnp.where(hold, before.length, after.length))
        if isinstance(after, PagedKVCache):
            lengths = jnp.where(hold, before.seq_lengths, after.seq_lengths)
            return dataclasses.replace(after, seq_lengths=lengths)
        return after

    held: CacheT = jax.tree_util.tree_map(pick, old, new, is_leaf=_is_cache)
    return held


def _check_tokens(tokens: Any, name: str, argument: str, *, one: bool) -> tuple[int, int]:
    shape = tuple(getattr(tokens, "shape", ()))
    if len(shape) != 2 or (one and shape[1] != 1) or shape[1] < 1:
        wanted = "(batch, 1)" if one else "(batch, seq)"
        raise ValueError(f"{name}: `{argument}` must be int tokens of shape {wanted}, got {shape}.")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name}: `{argument}` must be integer tokens, got {tokens.dtype}.")
    return int(shape[0]), int(shape[1])


def _last_logits(logits: Any, batch: int, seq: int, name: str) -> Float[Array, "B V"]:
    shape = tuple(getattr(logits, "shape", ()))
    if len(shape) == 3 and shape[:2] == (batch, seq):
        return jnp.asarray(logits)[:, -1]
    if seq == 1 and len(shape) == 2 and shape[0] == batch:
        return jnp.asarray(logits)
    raise ValueError(
        f"{name}: the model must return logits of shape (batch, seq, vocab) = ({batch}, {seq}, "
        f"vocab){' or (batch, vocab)' if seq == 1 else ''} with its cache, got {shape}."
    )


def _greedy(logits: Float[Array, "B V"], rng: PRNGKeyArray) -> Int[Array, " B"]:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------- prefill


def prefill(
    forward_fn: ForwardFn[CacheT],
    cache: CacheT,
    prompt: Int[Array, "B L"],
    *,
    chunk_size: int,
) -> tuple[Float[Array, "B V"], CacheT]:
    """Feed a long prompt into the cache in causal chunks, in one traceable call.

    The prompt is cut into ``chunk_size``-token chunks; the whole ones run in a ``lax.scan``
    (one trace of the model), a shorter last chunk in one more call. Each chunk goes through the
    layer's cache path (``kv_cache=``): its keys are appended at every row's length and its
    queries attend causally over everything before them, so any ``chunk_size`` gives the same
    cache and logits as one chunk of the whole prompt (up to float rounding), in
    ``O(chunk_size * L)`` attention memory instead of ``O(L ** 2)``.

    A :class:`PagedKVCache` needs its blocks for the whole prompt allocated first
    (:class:`BlockAllocator.reserve`); a write that does not fit is dropped and flagged, which
    :func:`any_overflow` of the returned cache reports.

    Args:
      forward_fn: ``(tokens (B, T), cache) -> (logits (B, T, V), cache)``.
      cache: the model's caches (any pytree; the batch is the prompt's).
      prompt: (batch, length) int tokens, every row of the same length.
      chunk_size: tokens per chunk, a positive int.

    Returns:
      ``(logits, cache)``: the (batch, vocab) logits after the prompt's last token and the cache
      holding the whole prompt.

    Raises:
      ValueError: for a bad prompt shape, chunk size or model output.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> from flax import nnx
      >>> layer = attnax.MultiHeadAttention(nnx.Rngs(0), num_heads=2, in_features=8, use_rope=True)
      >>> embed = jax.random.normal(jax.random.key(1), (11, 8))  # vocab 11
      >>> def forward(tokens, cache):
      ...     out, cache = layer(embed[tokens], kv_cache=cache)
      ...     return out @ embed.T, cache
      >>> prompt = jnp.array([[3, 1, 4, 1, 5, 9, 2], [2, 7, 1, 8, 2, 8, 1]])
      >>> empty = attnax.init_kv_layer_cache(2, 2, 4, max_len=8)
      >>> logits, cache = jax.jit(lambda c, p: attnax.prefill(forward, c, p, chunk_size=3))(
      ...     empty, prompt)
      >>> whole, _ = attnax.prefill(forward, empty, prompt, chunk_size=7)  # one chunk
      >>> logits.shape, cache.length.tolist(), bool(jnp.allclose(logits, whole, atol=1e-5))
      ((2, 11), [7, 7], True)
    """
    name = "prefill"
    batch, length = _check_tokens(prompt, name, "prompt", one=False)
    chunk = positive_int(chunk_size, "chunk_size", caller=name)
    prompt = jnp.asarray(prompt, jnp.int32)
    cache = _with_flags(cache)
    whole, rest = divmod(length, chunk)
    last: Array | None = None
    if whole:
        chunks = jnp.swapaxes(prompt[:, : whole * chunk].reshape(batch, whole, chunk), 0, 1)

        def body(carry: CacheT, tokens: Array) -> tuple[CacheT, Array]:
            logits, carry = forward_fn(tokens, carry)
            return carry, _last_logits(logits, batch, chunk, name)

        cache, lasts = jax.lax.scan(body, cache, chunks)
        last = lasts[-1]
    if rest:
        logits, cache = forward_fn(prompt[:, whole * chunk :], cache)
        last = _last_logits(logits, batch, rest, name)
    assert last is not None  # length >= 1
    return last, cache


# --------------------------------------------------------------------------- generate


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenerateResult(Generic[CacheT]):
    """What :func:`generate` returns (a pytree, so it leaves ``jit`` whole).

    Attributes:
      tokens: (batch, num_steps) int32, the sampled tokens. A row's end token is its last
        real token; from then on (and from the step its cache overflowed) it holds the pad.
      cache: the final caches. Every row that has not ended advanced by ``steps`` tokens; an
        ended row stopped at the length it had when it produced its end token.
      lengths: (batch,) int32, real tokens per row (its end token included).
      ended: (batch,) bool, the row produced ``end_token``.
      overflowed: (batch,) bool, a write into one of the row's attnax caches did not fit (the
        row stopped there; its later tokens are pad). Sticky flags: an overflow from before
        the call shows too.
      steps: int32 scalar, loop iterations run (fewer than ``num_steps`` when every row ended).

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> def count_up(tokens, cache):  # a "model" whose next token is the last one plus one
      ...     return jax.nn.one_hot(tokens[:, 0] + 1, 8), cache
      >>> cache = attnax.init_kv_layer_cache(2, 1, 4, max_len=4)  # unused by this model
      >>> result = attnax.generate(count_up, cache, jnp.array([[2], [4]]), num_steps=4,
      ...                          end_token=6)
      >>> result.tokens.tolist(), result.lengths.tolist(), result.ended.tolist()
      ([[3, 4, 5, 6], [5, 6, 6, 6]], [4, 2], [True, True])
      >>> result.raise_if_overflowed()  # eager: raises ValueError naming the rows, else None
    """

    tokens: Int[Array, "B N"]
    cache: CacheT
    lengths: Int[Array, " B"]
    ended: Bool[Array, " B"]
    overflowed: Bool[Array, " B"]
    steps: Int[Array, ""]

    def raise_if_overflowed(self) -> None:
        """Raise ``ValueError`` naming the rows whose cache overflowed (eager, outside jit)."""
        flags = np.asarray(self.overflowed)
        if np.any(flags):
            rows = np.flatnonzero(flags).tolist()
            raise ValueError(
                f"generate: the KV cache of rows {rows} overflowed and they stopped early; size "
                "every cache for prompt + num_steps tokens (paged: allocate those blocks first)."
            )


# Over 100 lines only through its docstring, the public contract; the body is short.
def generate(
    step_fn: ForwardFn[CacheT],
    cache: CacheT,
    tokens: Int[Array, "B 1"],
    *,
    num_steps: int,
    rng: PRNGKeyArray | None = None,
    sample: SampleFn | None = None,
    end_token: int | None = None,
    pad_token: int | None = None,
    stop_early: bool | None = None,
) -> GenerateResult[CacheT]:
    """Decode ``num_steps`` tokens per row in one ``lax.while_loop`` (traceable; jit it once).

    Step ``i`` feeds every row's current token (``tokens`` first, then each row's last sampled
    one), samples the next from ``step_fn``'s logits with ``sample(logits,
    jax.random.fold_in(rng, i))`` and writes it to column ``i`` of the result. So a prompt is
    fed as ``prefill(prompt[:, :-1])`` then ``generate(prompt[:, -1:])``.

    Ragged batches: a row that samples ``end_token`` (or whose cache overflows) is done; the
    loop ends once every row is (``stop_early``), else after ``num_steps``. Done rows still
    run through the model (the batch is one program), fed their end token, then the pad;
    their outputs are replaced by ``pad_token`` and the lengths of their
    :class:`KVLayerCache` / :class:`PagedKVCache` leaves are held, so the junk write is never
    counted and a done row cannot overflow. Caches of other kinds in the pytree advance every
    step.

    Overflow is never lost: size each cache for ``prompt + num_steps`` tokens (paged: allocate
    the blocks first); a jitted write that does not fit sets the cache's flag, the row stops,
    and :attr:`GenerateResult.overflowed` reports it (``raise_if_overflowed()`` raises). With
    shape checks on it is also a checkify error (see :mod:`attnax._cache`).

    Jit it with the cache donated, passing parameters as arguments::

        run = jax.jit(lambda params, cache, tokens: attnax.generate(
            functools.partial(forward, params), cache, tokens, num_steps=64),
            donate_argnums=1)

    Args:
      step_fn: ``(tokens (B, 1), cache) -> (logits (B, 1, V) or (B, V), cache)``, e.g. a
        stack of :class:`MultiHeadAttention` layers called with ``kv_cache=``.
      cache: the model's caches (any pytree).
      tokens: (batch, 1) int, the first token fed.
      num_steps: tokens to generate per row, a positive Python int.
      rng: PRNG key for ``sample``; ``jax.random.key(0)`` when None.
      sample: ``(logits (B, V), key) -> (B,) int``, e.g. ``functools.partial(sample_logits,
        temperature=0.7, top_p=0.9)``; greedy ``argmax`` when None.
      end_token: the token that ends a row; None: rows end only by overflow.
      pad_token: emitted after a row is done; default ``end_token``, else 0.
      stop_early: end the loop once every row is done (a ``while_loop`` whose condition, on a
        GPU, goes to the host every step); False runs exactly ``num_steps`` steps with a trip
        count XLA knows. Default: True when ``end_token`` is given.

    Returns:
      A :class:`GenerateResult`: tokens, final cache, lengths, ended and overflowed flags.

    Raises:
      ValueError: for a bad ``tokens`` shape, ``num_steps``, or model / sample output shape.

    Example:
      >>> import functools, jax, jax.numpy as jnp, attnax
      >>> from flax import nnx
      >>> layer = attnax.MultiHeadAttention(nnx.Rngs(0), num_heads=2, in_features=8, use_rope=True)
      >>> embed = jax.random.normal(jax.random.key(1), (11, 8))  # vocab 11
      >>> graphdef, params = nnx.split(layer)
      >>> def forward(params, tokens, cache):
      ...     out, cache = nnx.merge(graphdef, params)(embed[tokens], kv_cache=cache)
      ...     return out @ embed.T, cache  # (B, T, vocab) logits
      >>> @functools.partial(jax.jit, donate_argnums=1)
      ... def run(params, cache, prompt, rng):
      ...     step = functools.partial(forward, params)
      ...     _, cache = attnax.prefill(step, cache, prompt[:, :-1], chunk_size=4)
      ...     sample = functools.partial(attnax.sample_logits, temperature=0.7, top_k=5)
      ...     return attnax.generate(step, cache, prompt[:, -1:], num_steps=6, rng=rng,
      ...                            sample=sample, end_token=0)
      >>> prompt = jnp.array([[3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 2, 8]])
      >>> result = run(params, attnax.init_kv_layer_cache(2, 2, 4, max_len=11), prompt,
      ...              jax.random.key(2))
      >>> result.tokens.shape, bool(result.overflowed.any())
      ((2, 6), False)
      >>> bool(jnp.all(result.cache.length == 5 + jnp.minimum(result.lengths, 6)))
      True
    """
    name = "generate"
    batch, _ = _check_tokens(tokens, name, "tokens", one=True)
    steps = positive_int(num_steps, "num_steps", caller=name)
    sample_fn: SampleFn = _greedy if sample is None else sample
    key = jax.random.key(0) if rng is None else rng
    pad = pad_token if pad_token is not None else (end_token if end_token is not None else 0)

    def body(state: tuple[Any, ...]) -> tuple[Any, ...]:
        step, token, caches, done, out, lengths, ended = state
        logits, new_caches = step_fn(token, caches)
        logits = _last_logits(logits, batch, 1, name)
        new_caches = _hold_lengths(caches, new_caches, done)
        stop = done | _row_overflow(new_caches, batch)
        sampled = sample_fn(logits, jax.random.fold_in(key, step))
        if tuple(sampled.shape) != (batch,):
            raise ValueError(
                f"{name}: `sample` must return ({batch},) tokens, got shape {sampled.shape}."
            )
        emitted = jnp.where(stop, pad, sampled.astype(jnp.int32))
        out = jax.lax.dynamic_update_slice(out, emitted[:, None], (0, step))
        lengths = lengths + (~stop).astype(jnp.int32)
        if end_token is not None:
            ended = ended | (~stop & (emitted == end_token))
        return step + 1, emitted[:, None], new_caches, stop | ended, out, lengths, ended

    def running(state: tuple[Any, ...]) -> Array:
        step, done = state[0], state[3]
        return jnp.asarray((step < steps) & ~jnp.all(done))

    caches = _with_flags(cache)
    initial = (
        jnp.zeros((), jnp.int32),
        jnp.asarray(tokens, jnp.int32),
        caches,
        _row_overflow(caches, batch),
        jnp.full((batch, steps), pad, jnp.int32),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), bool),
    )
    early = end_token is not None if stop_early is None else stop_early
    if early:
        final = jax.lax.while_loop(running, body, initial)
    else:  # static bounds: fori_loop lowers to a scan, a loop of known trip count
        final = jax.lax.fori_loop(0, steps, lambda _, state: body(state), initial)
    step, _, caches, _, out, lengths, ended = final
    return GenerateResult(
        tokens=out,
        cache=caches,
        lengths=lengths,
        ended=ended,
        overflowed=_row_overflow(caches, batch),
        steps=step,
    )
