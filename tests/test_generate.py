"""attnax.generate / prefill / sample_logits against step-by-step Python loops (CPU, tiny model)."""

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, assert_type

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnax

VOCAB, WIDTH, LAYERS, HEADS, KV_HEADS = 17, 32, 2, 4, 2
HEAD_DIM = WIDTH // HEADS
WINDOW = 6
BATCH, PROMPT, STEPS = 3, 7, 6
README = Path(__file__).resolve().parent.parent / "README.md"


class TinyModel(nnx.Module):
    """Embedding, a residual stack of attnax layers over KV caches, and an output layer."""

    def __init__(self, *, window: int | None, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.layers = nnx.List(
            [
                attnax.MultiHeadAttention(
                    rngs,
                    num_heads=HEADS,
                    in_features=WIDTH,
                    num_kv_heads=KV_HEADS,
                    use_rope=True,
                    rope_max_positions=64,
                    attention_window=window,
                )
                for _ in range(LAYERS)
            ]
        )
        self.unembed = nnx.Linear(WIDTH, VOCAB, rngs=rngs)

    def __call__(self, tokens: jax.Array, caches: list[Any]) -> tuple[jax.Array, list[Any]]:
        x = self.embed(tokens)
        new_caches = []
        for layer, cache in zip(self.layers, caches, strict=True):
            y, cache = layer(x, kv_cache=cache)
            x = x + y
            new_caches.append(cache)
        return self.unembed(x), new_caches


def _model(kind: str) -> tuple[Any, Any]:
    model = TinyModel(window=WINDOW if kind == "ring" else None, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    return graphdef, params


def _caches(kind: str, capacity: int = PROMPT + STEPS) -> list[Any]:
    if kind == "contiguous":
        return [
            attnax.init_kv_layer_cache(BATCH, KV_HEADS, HEAD_DIM, capacity) for _ in range(LAYERS)
        ]
    if kind == "ring":
        return [
            attnax.init_kv_layer_cache(BATCH, KV_HEADS, HEAD_DIM, WINDOW, ring_buffer=True)
            for _ in range(LAYERS)
        ]
    caches = []
    for _ in range(LAYERS):
        cache = attnax.init_paged_kv_cache(
            num_blocks=16, block_size=4, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
            batch_size=BATCH, max_blocks_per_seq=4,
        )
        allocator = attnax.BlockAllocator.for_cache(cache)
        for row in (2, 0, 1):  # rows own interleaved, out-of-order blocks
            cache = allocator.reserve(cache, sequence_idx=row, num_new_tokens=capacity)
        caches.append(cache)
    return caches


def _prompt() -> jax.Array:
    return jax.random.randint(jax.random.key(3), (BATCH, PROMPT), 0, VOCAB)


def _forward(graphdef: Any) -> Callable[..., Any]:
    def forward(params: Any, tokens: jax.Array, caches: Any) -> Any:
        return nnx.merge(graphdef, params)(tokens, caches)

    return forward


def _reference(
    graphdef: Any,
    params: Any,
    caches: Any,
    prompt: jax.Array,
    *,
    num_steps: int,
    sample: Callable[..., jax.Array],
    rng: jax.Array,
    end_token: int | None = None,
) -> tuple[np.ndarray, Any]:
    """Prefill in one call, then one jitted step per token from Python (the semantics, spelled
    out)."""
    step = jax.jit(_forward(graphdef))
    _, caches = step(params, prompt[:, :-1], caches)
    token = prompt[:, -1:]
    done = np.zeros(prompt.shape[0], bool)
    out = []
    for i in range(num_steps):
        logits, caches = step(params, token, caches)
        sampled = np.asarray(sample(logits[:, -1], jax.random.fold_in(rng, i)))
        emitted = np.where(done, end_token if end_token is not None else 0, sampled)
        out.append(emitted)
        if end_token is not None:
            done = done | (emitted == end_token)
        token = jnp.asarray(emitted, jnp.int32)[:, None]
    return np.stack(out, axis=1), caches


def _compiled_generate(graphdef: Any, **options: Any) -> Callable[..., Any]:
    forward = _forward(graphdef)

    @functools.partial(jax.jit, donate_argnums=1)
    def run(params: Any, caches: Any, prompt: jax.Array) -> Any:
        step = functools.partial(forward, params)
        _, caches = attnax.prefill(step, caches, prompt[:, :-1], chunk_size=4)
        return attnax.generate(step, caches, prompt[:, -1:], **options)

    return run


def _greedy(logits: jax.Array, rng: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@pytest.mark.parametrize("kind", ["contiguous", "ring", "paged"])
def test_scanned_greedy_equals_python_loop(kind: str) -> None:
    graphdef, params = _model(kind)
    prompt = _prompt()
    expected, expected_caches = _reference(
        graphdef, params, _caches(kind), prompt, num_steps=STEPS, sample=_greedy,
        rng=jax.random.key(0),
    )
    result = _compiled_generate(graphdef, num_steps=STEPS)(params, _caches(kind), prompt)
    np.testing.assert_array_equal(np.asarray(result.tokens), expected)
    assert result.lengths.tolist() == [STEPS] * BATCH
    assert int(result.steps) == STEPS
    assert not bool(result.overflowed.any()) and not bool(result.ended.any())
    result.raise_if_overflowed()
    for got, want in zip(result.cache, expected_caches, strict=True):
        got_length = got.length if kind != "paged" else got.seq_lengths
        want_length = want.length if kind != "paged" else want.seq_lengths
        assert got_length.tolist() == want_length.tolist() == [PROMPT - 1 + STEPS] * BATCH


def test_sampled_generation_equals_python_loop() -> None:
    graphdef, params = _model("contiguous")
    prompt = _prompt()
    sample = functools.partial(attnax.sample_logits, temperature=0.9, top_k=5, top_p=0.9)
    rng = jax.random.key(7)
    expected, _ = _reference(
        graphdef, params, _caches("contiguous"), prompt, num_steps=STEPS, sample=sample,
        rng=rng, end_token=3,
    )
    run = _compiled_generate(graphdef, num_steps=STEPS, sample=sample, rng=rng, end_token=3)
    result = run(params, _caches("contiguous"), prompt)
    np.testing.assert_array_equal(np.asarray(result.tokens), expected)


def test_ragged_end_tokens() -> None:
    """Rows end at different steps, then emit the end token; their cache lengths stop there."""
    end = 0
    # Row b's next token is schedule[b, cache length - PROMPT + 1]: row 0 ends at step 1,
    # row 1 at step 3, row 2 never within STEPS.
    schedule = jnp.array(
        [[5, end, 7, 7, 7, 7, 7], [4, 4, 4, end, 9, 9, 9], [1, 2, 3, 4, 5, 6, 7]], jnp.int32
    )
    graphdef, params = _model("contiguous")
    forward = _forward(graphdef)

    def step(tokens: jax.Array, caches: Any) -> Any:
        position = caches[0].length - (PROMPT - 1)
        _, caches = forward(params, tokens, caches)  # the real stack still writes the caches
        chosen = schedule[jnp.arange(BATCH), jnp.clip(position, 0, STEPS)]
        return jax.nn.one_hot(chosen, VOCAB)[:, None], caches

    prompt = _prompt()
    _, caches = jax.jit(functools.partial(forward, params))(prompt[:, :-1], _caches("contiguous"))
    result = jax.jit(
        lambda c, t: attnax.generate(step, c, t, num_steps=STEPS, end_token=end), donate_argnums=0
    )(caches, prompt[:, -1:])
    assert result.tokens.tolist() == [
        [5, end, end, end, end, end],
        [4, 4, 4, end, end, end],
        [1, 2, 3, 4, 5, 6],
    ]
    assert result.lengths.tolist() == [2, 4, 6]
    assert result.ended.tolist() == [True, True, False]
    assert int(result.steps) == STEPS
    for cache in result.cache:
        assert cache.length.tolist() == [PROMPT - 1 + 2, PROMPT - 1 + 4, PROMPT - 1 + 6]

    # With a pad token, and stopping early once every row has ended.
    short = schedule.at[2, 4].set(end)
    result = attnax.generate(
        lambda t, c: (jax.nn.one_hot(short[jnp.arange(BATCH), c], VOCAB), c + 1),
        jnp.zeros((BATCH,), jnp.int32),
        prompt[:, -1:],
        num_steps=STEPS,
        end_token=end,
        pad_token=VOCAB - 1,
    )
    pad = VOCAB - 1
    assert result.tokens.tolist() == [
        [5, end, pad, pad, pad, pad],
        [4, 4, 4, end, pad, pad],
        [1, 2, 3, 4, end, pad],
    ]
    assert int(result.steps) == 5 and result.cache.tolist() == [5, 5, 5]
    assert result.ended.tolist() == [True] * BATCH
    fixed = attnax.generate(
        lambda t, c: (jax.nn.one_hot(short[jnp.arange(BATCH), jnp.minimum(c, 6)], VOCAB), c + 1),
        jnp.zeros((BATCH,), jnp.int32),
        prompt[:, -1:],
        num_steps=STEPS,
        end_token=end,
        pad_token=pad,
        stop_early=False,  # a loop of known trip count: every step runs
    )
    assert fixed.tokens.tolist() == result.tokens.tolist()
    assert int(fixed.steps) == STEPS and fixed.cache.tolist() == [STEPS] * BATCH


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_overflow_under_the_loop_is_reported(kind: str) -> None:
    graphdef, params = _model(kind)
    prompt = _prompt()
    fits = 3  # generated tokens that fit; the cache holds the prompt minus its last token
    caches = _caches(kind, capacity=PROMPT - 1 + fits)
    if kind == "paged":
        # Only row 1 is short of blocks: give rows 0 and 2 room for every step.
        for i, cache in enumerate(caches):
            allocator = attnax.BlockAllocator.for_cache(cache)
            for row in (0, 2):
                cache = allocator.reserve(cache, sequence_idx=row, num_new_tokens=PROMPT + STEPS)
            caches[i] = cache
        # Row 1's blocks hold 12 tokens (3 of 4): the 13th write, step 6, would not fit.
        fits = 3 * 4 - (PROMPT - 1)
    result = _compiled_generate(graphdef, num_steps=STEPS + 2)(params, caches, prompt)
    rows = [0, 1, 2] if kind == "contiguous" else [1]
    assert np.flatnonzero(np.asarray(result.overflowed)).tolist() == rows
    assert np.flatnonzero(np.asarray(attnax.any_overflow(result.cache))).tolist() == rows
    for row in rows:
        assert int(result.lengths[row]) == fits
        assert result.tokens[row, fits:].tolist() == [0] * (STEPS + 2 - fits)
    with pytest.raises(ValueError, match=r"rows \[" + ", ".join(map(str, rows)) + r"\] overflowed"):
        result.raise_if_overflowed()


@pytest.mark.parametrize("kind", ["contiguous", "ring", "paged"])
def test_prefill_in_chunks_equals_one_chunk(kind: str) -> None:
    graphdef, params = _model(kind)
    prompt = jax.random.randint(jax.random.key(4), (BATCH, 11), 0, VOCAB)
    forward = functools.partial(_forward(graphdef), params)
    run = jax.jit(attnax.prefill, static_argnums=0, static_argnames="chunk_size")
    whole, whole_caches = run(forward, _caches(kind, capacity=16), prompt, chunk_size=11)
    chunked, chunked_caches = run(forward, _caches(kind, capacity=16), prompt, chunk_size=4)
    full_logits, _ = jax.jit(forward)(prompt, _caches(kind, capacity=16))
    np.testing.assert_allclose(chunked, whole, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(whole, full_logits[:, -1], atol=1e-5, rtol=1e-5)
    for got, want in zip(chunked_caches, whole_caches, strict=True):
        for name in ("keys", "values", "key_pool", "value_pool", "length", "seq_lengths"):
            if hasattr(want, name):
                np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=1e-5)
    assert not bool(attnax.any_overflow(chunked_caches).any())


def test_sample_logits() -> None:
    logits = jax.random.normal(jax.random.key(5), (4, VOCAB)) * 3
    argmax = jnp.argmax(logits, axis=-1).tolist()
    for seed in range(4):
        key = jax.random.key(seed)
        assert attnax.sample_logits(logits, key, top_k=1).tolist() == argmax
        assert attnax.sample_logits(logits, key, top_p=1e-6).tolist() == argmax
        assert attnax.sample_logits(logits, key, temperature=0.0, top_k=3).tolist() == argmax
    keys = jax.random.split(jax.random.key(6), 256)
    sample = jax.vmap(functools.partial(attnax.sample_logits, temperature=2.0, top_k=3), (None, 0))
    drawn = np.asarray(sample(logits, keys))  # (256, 4)
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    for row in range(4):
        assert set(drawn[:, row].tolist()) <= set(top3[row].tolist())
        assert len(set(drawn[:, row].tolist())) > 1  # it samples, not argmax
    # top_p: the nucleus of [0.5, 0.3, 0.2] at 0.6 is the first two tokens.
    probs = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    nucleus = jax.vmap(functools.partial(attnax.sample_logits, top_p=0.6), (None, 0))(probs, keys)
    assert set(np.asarray(nucleus).ravel().tolist()) == {0, 1}
    for bad in ({"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            attnax.sample_logits(logits, keys[0], **bad)


def test_bad_arguments_are_named() -> None:
    caches = _caches("contiguous")
    step = lambda t, c: (jnp.zeros((BATCH, VOCAB)), c)  # noqa: E731
    with pytest.raises(ValueError, match="`tokens` must be int tokens of shape \\(batch, 1\\)"):
        attnax.generate(step, caches, jnp.zeros((BATCH, 2), jnp.int32), num_steps=2)
    with pytest.raises(ValueError, match="`num_steps` must be a positive int"):
        attnax.generate(step, caches, jnp.zeros((BATCH, 1), jnp.int32), num_steps=0)
    with pytest.raises(ValueError, match="`chunk_size` must be a positive int"):
        attnax.prefill(step, caches, jnp.zeros((BATCH, 4), jnp.int32), chunk_size=0)
    with pytest.raises(ValueError, match="logits of shape"):
        attnax.prefill(step, caches, jnp.zeros((BATCH, 4), jnp.int32), chunk_size=2)
    with pytest.raises(ValueError, match="holds no KVLayerCache"):
        attnax.any_overflow([jnp.zeros(3)])


def test_result_type_follows_the_cache() -> None:
    caches: list[attnax.KVLayerCache] = [attnax.init_kv_layer_cache(BATCH, 1, 4, 4)]

    def step(
        tokens: jax.Array, caches: list[attnax.KVLayerCache]
    ) -> tuple[jax.Array, list[attnax.KVLayerCache]]:
        return jnp.zeros((BATCH, VOCAB)), caches

    result = attnax.generate(step, caches, jnp.zeros((BATCH, 1), jnp.int32), num_steps=1)
    assert_type(result, attnax.GenerateResult[list[attnax.KVLayerCache]])  # mypy checks this
    assert_type(result.cache, list[attnax.KVLayerCache])
    assert result.tokens.shape == (BATCH, 1)


def test_readme_generation_snippet_runs() -> None:
    text = README.read_text()
    section = text.split("## Generation in one compiled loop", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README's generation section has no python snippet"
    namespace: dict[str, Any] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["result"].tokens.shape[1] == namespace["num_steps"]
