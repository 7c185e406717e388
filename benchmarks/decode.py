"""Decode benchmark (issue 5): split-KV decode kernels and an end-to-end decode loop.

Part 1, kernels: B8, 32 query heads over 8 KV heads, head_dim 128, 32768 cached tokens in
every row, bf16, one query token. attnax contiguous (a few kernel configs; the best is
reported), attnax paged (shuffled block table), JAX's Pallas ``decode_attention.gqa``, cuDNN
(``jax.nn.dot_product_attention(implementation="cudnn")``, q of length 1) and XLA
(``implementation="xla"``). Time = median of >= 30 calls after a compile call; bandwidth =
key + value bytes read / time.

Part 2, end to end: 4 layers, B8, d_model 1024, 16 query heads over 4 KV heads, RoPE, a
4096-token cache (filled to 4096 - 160 so every timed step fits), bf16. Tokens/s of a jitted
one-token step (caches donated) and of a ``lax.scan`` over 64 steps, for attnax
``MultiHeadAttention(kv_cache=...)`` against ``flax.nnx.MultiHeadAttention(decode=True)``
(same GQA, no RoPE: flax has none) driven by ``nnx.jit`` and by a pure ``jax.jit`` of its
split state.

Part 3, generation from tokens (issue 21): the part-2 stack with a tied ``--vocab`` embedding
and greedy argmax feeding each row its own next token, 64 tokens per call: ``attnax.generate``
(one jitted ``lax.while_loop``, caches donated; contiguous and paged caches) against flax's
``nnx.MultiHeadAttention(decode=True)`` stack in a ``lax.scan`` running the same loop, and a
Python loop of one jitted attnax step (caches donated).

Every configuration runs in its own try/except that records the error; the table is printed
last and ``$OUT/decode.json`` (env ``OUT``, default ``benchmarks/results``) holds every number
with the device name. ``--smoke`` runs tiny sizes on CPU (a manual check, not in the suite).
"""

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import _timing  # benchmarks/_timing.py (scripts run from benchmarks/)
import jax
import jax.numpy as jnp
import numpy as np

RESULTS: list[dict[str, Any]] = []


INNER_CALLS = 10


def median_seconds(fn: Callable[[], Any], iters: int) -> float:
    """Median per-call time over ``iters`` rounds of ``INNER_CALLS`` back-to-back calls.

    Calls are queued without waiting and each round blocks once on its last result, so the
    figure is the steady-state time per call of a decode loop (host dispatch overlaps the
    previous call), not one call's dispatch latency: a ~0.5 ms kernel timed one call at a time
    carries tens of microseconds of host round trip. Every row, attnax and peers alike, is
    timed this way after one warm-up (compile) call (``_timing``, shared by the benchmarks).
    """
    return _timing.median_seconds(fn, samples=iters, calls=INNER_CALLS)


def record(name: str, group: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """Run one configuration; its error (with the last traceback lines) is recorded, not raised."""
    entry: dict[str, Any] = {"name": name, "group": group}
    try:
        entry.update(fn())
        entry["ok"] = True
    except Exception as error:  # noqa: BLE001 - a benchmark row records any failure and goes on
        entry["ok"] = False
        entry["error"] = f"{type(error).__name__}: {error}"[:800]
        entry["traceback"] = traceback.format_exc()[-2000:]
    RESULTS.append(entry)
    status = "ok" if entry["ok"] else "FAILED " + entry["error"][:200]
    print(f"[{group}] {name}: {status} {_short(entry)}", flush=True)
    return entry if entry["ok"] else None


def _short(entry: dict[str, Any]) -> str:
    keys = ("ms", "tb_per_s", "tokens_per_s")
    return " ".join(f"{k}={entry[k]:.4g}" for k in keys if k in entry)


# --------------------------------------------------------------------------- kernels


def kernel_benchmarks(args: argparse.Namespace) -> None:
    from attnax.kernels.decode import decode_attention, paged_decode_attention

    batch, num_heads, num_kv_heads, head_dim, length = (
        args.batch,
        args.heads,
        args.kv_heads,
        args.head_dim,
        args.cache_len,
    )
    dtype = jnp.bfloat16
    interpret = args.smoke
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    query = jax.random.normal(kq, (batch, num_heads, 1, head_dim), dtype)
    keys = jax.random.normal(kk, (batch, num_kv_heads, length, head_dim), dtype)
    values = jax.random.normal(kv, (batch, num_kv_heads, length, head_dim), dtype)
    lengths = jnp.full((batch,), length, jnp.int32)
    kv_bytes = 2 * keys.size * keys.dtype.itemsize
    iters = args.iters

    def timed(fn: Callable[[], Any]) -> dict[str, Any]:
        seconds = median_seconds(fn, iters)
        return {"ms": seconds * 1e3, "tb_per_s": kv_bytes / seconds / 1e12, "kv_bytes": kv_bytes}

    reference = None
    try:
        reference = np.asarray(
            jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, use_pallas=False))(
                query, keys, values, lengths
            ),
            np.float32,
        )
    except Exception as error:  # noqa: BLE001
        print(f"reference (XLA path) failed: {error}", flush=True)

    def check(out: Any) -> dict[str, Any]:
        if reference is None:
            return {}
        out_np = np.asarray(out, np.float32).reshape(reference.shape)
        return {"max_abs_err_vs_xla_path": float(np.max(np.abs(out_np - reference)))}

    # attnax contiguous: a small sweep; the best config is the headline number.
    contiguous_configs = [
        {"block_kv": 128, "num_splits": None, "num_warps": 4, "num_stages": 2},
        {"block_kv": 64, "num_splits": None, "num_warps": 4, "num_stages": 3},
        {"block_kv": 128, "num_splits": 32, "num_warps": 4, "num_stages": 3},
        {"block_kv": 128, "num_splits": 8, "num_warps": 8, "num_stages": 2},
        {"block_kv": 256, "num_splits": 16, "num_warps": 8, "num_stages": 2},
    ]
    if args.sweep:
        # First sweep (results/decode_sweep_h100.json) found every 4-warp config at 2.6-2.8
        # TB/s; these are its best rows, re-timed beside the default.
        contiguous_configs += [
            {"block_kv": 128, "num_splits": 8, "num_warps": 4, "num_stages": 3},
            {"block_kv": 128, "num_splits": None, "num_warps": 8, "num_stages": 3},
        ]
    if args.smoke:
        contiguous_configs = [{"block_kv": 16, "num_splits": 2, "num_warps": 4, "num_stages": 2}]
    for config in contiguous_configs:

        def run_contiguous(config: dict[str, Any] = config) -> dict[str, Any]:
            fn = jax.jit(
                lambda q, k, v, n: decode_attention(
                    q, k, v, n, use_pallas=True, interpret=interpret, **config
                )
            )
            out = fn(query, keys, values, lengths)
            return {**timed(lambda: fn(query, keys, values, lengths)), **check(out), **config}

        record(f"attnax contiguous {config}", "kernel/attnax-contiguous", run_contiguous)

    # attnax paged: shuffled block table over a pool of exactly the needed blocks.
    paged_configs = [
        {"block_size": 16, "block_kv": 128, "num_splits": None, "num_warps": 4, "num_stages": 2},
        {"block_size": 64, "block_kv": 128, "num_splits": None, "num_warps": 4, "num_stages": 2},
        {"block_size": 128, "block_kv": 128, "num_splits": None, "num_warps": 4, "num_stages": 3},
        {"block_size": 16, "block_kv": 64, "num_splits": 32, "num_warps": 4, "num_stages": 3},
    ]
    if args.sweep:
        # Three sweeps (results/decode_sweep*_h100.json): 2.0-2.35 TB/s for every tile, stage,
        # split count, grid order and table-reading strategy tried; these are the best rows.
        paged_configs += [
            {"block_size": 64, "block_kv": 64, "num_splits": None, "num_warps": 4, "num_stages": 3},
            {"block_size": 64, "block_kv": 64, "num_splits": 8, "num_warps": 4, "num_stages": 2},
        ]
    if args.smoke:
        paged_configs = [
            {"block_size": 16, "block_kv": 16, "num_splits": 2, "num_warps": 4, "num_stages": 2}
        ]
    # --paged-sorted adds each config over an identity block table (row b's pages in order,
    # the pool then *is* a (B, S, Hk, D) cache): if those rows match the shuffled ones, the
    # paged kernel's gap to the contiguous one is the head-interleaved layout, not the
    # scattered pages.
    orders = ("shuffled", "sorted") if args.paged_sorted else ("shuffled",)
    for config, order in [(c, o) for c in paged_configs for o in orders]:

        def run_paged(config: dict[str, Any] = config, order: str = order) -> dict[str, Any]:
            block_size = config["block_size"]
            blocks_per_seq = length // block_size
            num_blocks = batch * blocks_per_seq
            permutation = jax.random.permutation(jax.random.key(1), num_blocks)
            if order == "sorted":
                permutation = jnp.arange(num_blocks)
            table = permutation.reshape(batch, blocks_per_seq).astype(jnp.int32)

            def to_pool(array: Any) -> Any:
                # (B, Hk, L, D) -> (B * L / P, P, Hk, D), then place block i at table position.
                blocks = jnp.swapaxes(array, 1, 2).reshape(
                    num_blocks, block_size, num_kv_heads, head_dim
                )
                return jnp.zeros_like(blocks).at[table.reshape(-1)].set(blocks)

            key_pool, value_pool = to_pool(keys), to_pool(values)
            kernel_config = {k: v for k, v in config.items() if k != "block_size"}
            fn = jax.jit(
                lambda q, kp, vp, t, n: paged_decode_attention(
                    q, kp, vp, t, n, use_pallas=True, interpret=interpret, **kernel_config
                )
            )
            out = fn(query, key_pool, value_pool, table, lengths)
            result = timed(lambda: fn(query, key_pool, value_pool, table, lengths))
            return {**result, **check(out), **config, "table": order}

        group = "kernel/attnax-paged" if order == "shuffled" else "kernel/attnax-paged-sorted"
        record(f"attnax paged {order} {config}", group, run_paged)

    # Peers use the (B, S, N, H) layout.
    def bsnh() -> tuple[Any, Any, Any]:
        return (
            jnp.swapaxes(query, 1, 2),
            jnp.swapaxes(keys, 1, 2),
            jnp.swapaxes(values, 1, 2),
        )

    def run_pallas_gqa() -> dict[str, Any]:
        from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode

        q, k, v = bsnh()
        fn = jax.jit(
            lambda q, k, v: jax_decode.gqa(
                q[:, 0], k, v, interpret=interpret, k_splits=min(16, length // 16)
            )
        )
        out = fn(q, k, v)
        return {**timed(lambda: fn(q, k, v)), **check(out[:, :, None])}

    if not args.smoke or args.smoke_peers:
        record("jax pallas decode_attention.gqa", "kernel/peer", run_pallas_gqa)

    def run_read_ceiling() -> dict[str, Any]:
        # Not attention: one XLA reduction over every key and value byte, the card's practical
        # read bandwidth for this footprint (what "2.5 TB/s" is measured against).
        fn = jax.jit(lambda k, v: jnp.max(k) + jnp.max(v))
        fn(keys, values)
        return timed(lambda: fn(keys, values))

    record("XLA max over keys and values (read ceiling)", "kernel/ceiling", run_read_ceiling)

    for implementation in ("cudnn", "xla"):

        def run_dpa(implementation: str = implementation) -> dict[str, Any]:
            q, k, v = bsnh()
            fn = jax.jit(
                lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=implementation)
            )
            out = fn(q, k, v)
            return {**timed(lambda: fn(q, k, v)), **check(jnp.swapaxes(out, 1, 2))}

        if implementation == "cudnn" and jax.default_backend() != "gpu":
            continue
        record(f"jax.nn.dot_product_attention({implementation})", "kernel/peer", run_dpa)


# --------------------------------------------------------------------------- end to end


def end_to_end_benchmarks(args: argparse.Namespace) -> None:
    from flax import nnx

    batch, d_model, num_heads, num_kv_heads, layers = (
        args.e2e_batch,
        args.d_model,
        args.e2e_heads,
        args.e2e_kv_heads,
        args.layers,
    )
    head_dim = d_model // num_heads
    max_len = args.e2e_cache_len
    scan_steps = args.scan_steps
    start_length = max_len - (args.iters + 2) * 2 - scan_steps * 2 - 8
    dtype = jnp.bfloat16
    x = jax.random.normal(jax.random.key(2), (batch, 1, d_model), dtype)
    iters = args.iters

    def tokens_result(seconds: float, tokens: int) -> dict[str, Any]:
        return {"ms": seconds * 1e3, "tokens_per_s": tokens / seconds}

    # ---------------------------------------------------------------- attnax
    def attnax_parts() -> tuple[Any, Any, list[Any]]:
        import attnax
        from attnax._cache import init_kv_layer_cache

        model = [
            attnax.MultiHeadAttention(
                nnx.Rngs(i),
                num_heads=num_heads,
                in_features=d_model,
                num_kv_heads=num_kv_heads,
                use_rope=True,
                rope_max_positions=2 * max_len,
                dtype="bfloat16",
                param_dtype="bfloat16",
            )
            for i in range(layers)
        ]
        graphdef, params = nnx.split(model)
        caches = []
        for i in range(layers):
            cache = init_kv_layer_cache(batch, num_kv_heads, head_dim, max_len, dtype)
            k1, k2 = jax.random.split(jax.random.key(10 + i))
            cache = dataclasses.replace(
                cache,
                keys=jax.random.normal(k1, cache.keys.shape, dtype),
                values=jax.random.normal(k2, cache.values.shape, dtype),
                length=jnp.full((batch,), start_length, jnp.int32),
            )
            caches.append(cache)
        return graphdef, params, caches

    def attnax_apply(
        graphdef: Any, params: Any, x: Any, caches: list[Any]
    ) -> tuple[Any, list[Any]]:
        model = nnx.merge(graphdef, params)
        new_caches = []
        for layer, cache in zip(model, caches, strict=True):
            y, cache = layer(x, kv_cache=cache)
            x = x + y
            new_caches.append(cache)
        return x, new_caches

    def run_attnax_step() -> dict[str, Any]:
        graphdef, params, caches = attnax_parts()
        step = jax.jit(lambda p, x, c: attnax_apply(graphdef, p, x, c), donate_argnums=(2,))
        state = {"caches": caches}

        def call() -> Any:
            out, state["caches"] = step(params, x, state["caches"])
            return out

        seconds = median_seconds(call, iters)
        overflow = any(bool(jnp.any(c.overflow)) for c in state["caches"])
        return {**tokens_result(seconds, batch), "overflow": overflow}

    def run_attnax_scan() -> dict[str, Any]:
        graphdef, params, caches = attnax_parts()

        def loop(p: Any, x: Any, c: Any) -> Any:
            def body(carry: Any, _: Any) -> Any:
                x, c = carry
                y, c = attnax_apply(graphdef, p, x, c)
                return (y, c), None

            (x, c), _ = jax.lax.scan(body, (x, c), None, length=scan_steps)
            return x, c

        run = jax.jit(loop, donate_argnums=(2,))
        state = {"caches": caches}

        def call() -> Any:
            out, state["caches"] = run(params, x, state["caches"])
            # Rewind so repeated timing never overflows (lengths only; contents do not matter).
            state["caches"] = [
                dataclasses.replace(c, length=jnp.full((batch,), start_length, jnp.int32))
                for c in state["caches"]
            ]
            return out

        seconds = median_seconds(call, max(3, iters // 6))
        return tokens_result(seconds, batch * scan_steps)

    record("attnax 4-layer step (jax.jit, donated caches)", "e2e/attnax", run_attnax_step)
    record(f"attnax 4-layer lax.scan x{scan_steps}", "e2e/attnax", run_attnax_scan)

    # ---------------------------------------------------------------- flax nnx
    def flax_model() -> Any:
        model = [
            nnx.MultiHeadAttention(
                num_heads,
                d_model,
                num_kv_heads=num_kv_heads,
                decode=True,
                dtype=dtype,
                param_dtype=dtype,
                rngs=nnx.Rngs(i),
            )
            for i in range(layers)
        ]
        for i, layer in enumerate(model):
            layer.init_cache((batch, max_len, d_model), dtype)
            k1, k2 = jax.random.split(jax.random.key(20 + i))
            layer.cached_key[...] = jax.random.normal(k1, layer.cached_key[...].shape, dtype)
            layer.cached_value[...] = jax.random.normal(k2, layer.cached_value[...].shape, dtype)
            layer.cache_index[...] = jnp.asarray(start_length, jnp.int32)
        return model

    def flax_apply(model: Any, x: Any) -> Any:
        for layer in model:
            x = x + layer(x)
        return x

    def run_flax_nnx_jit() -> dict[str, Any]:
        model = flax_model()
        step = nnx.jit(flax_apply)

        def call() -> Any:
            return step(model, x)

        seconds = median_seconds(call, iters)
        return tokens_result(seconds, batch)

    def run_flax_pure_jit() -> dict[str, Any]:
        model = flax_model()
        graphdef, state = nnx.split(model)

        def pure(state: Any, x: Any) -> Any:
            m = nnx.merge(graphdef, state)
            y = flax_apply(m, x)
            return y, nnx.state(m)

        step = jax.jit(pure, donate_argnums=(0,))
        holder = {"state": state}

        def call() -> Any:
            out, holder["state"] = step(holder["state"], x)
            return out

        seconds = median_seconds(call, iters)
        return tokens_result(seconds, batch)

    def run_flax_scan() -> dict[str, Any]:
        model = flax_model()
        graphdef, state = nnx.split(model)
        cache_index = start_length

        def loop(state: Any, x: Any) -> Any:
            def body(carry: Any, _: Any) -> Any:
                state, x = carry
                m = nnx.merge(graphdef, state)
                y = flax_apply(m, x)
                return (nnx.state(m), y), None

            (state, x), _ = jax.lax.scan(body, (state, x), None, length=scan_steps)
            return x, state

        run = jax.jit(loop, donate_argnums=(0,))
        holder = {"state": state}

        def call() -> Any:
            out, new_state = run(holder["state"], x)
            m = nnx.merge(graphdef, new_state)
            for layer in m:
                layer.cache_index[...] = jnp.asarray(cache_index, jnp.int32)
            holder["state"] = nnx.state(m)
            return out

        seconds = median_seconds(call, max(3, iters // 6))
        return tokens_result(seconds, batch * scan_steps)

    record("flax nnx MHA decode step (nnx.jit)", "e2e/flax", run_flax_nnx_jit)
    record(
        "flax nnx MHA decode step (jax.jit of split state, donated)", "e2e/flax", run_flax_pure_jit
    )
    record(f"flax nnx MHA lax.scan x{scan_steps}", "e2e/flax", run_flax_scan)


# --------------------------------------------------------------------------- generate


def generate_benchmarks(args: argparse.Namespace) -> None:
    """Whole greedy decode loops from tokens: ``attnax.generate`` against the same loop elsewhere.

    The part-2 stack gains a tied embedding of ``--vocab`` tokens (logits = x @ embed.T) and
    greedy argmax, so every row feeds back its own token. Rows: ``attnax.generate`` (one jitted
    ``lax.while_loop``, caches donated; contiguous and paged caches), flax's
    ``nnx.MultiHeadAttention(decode=True)`` stack in a ``lax.scan`` doing the same, and a Python
    loop of one jitted attnax step (caches donated). Tokens/s = batch * tokens / time.
    """
    import functools

    from flax import nnx

    import attnax

    batch, d_model, num_heads, num_kv_heads, layers = (
        args.e2e_batch,
        args.d_model,
        args.e2e_heads,
        args.e2e_kv_heads,
        args.layers,
    )
    head_dim = d_model // num_heads
    max_len, steps, vocab = args.e2e_cache_len, args.scan_steps, args.vocab
    start_length = max_len - (args.iters + 2) * 2 - steps * 2 - 8
    dtype = jnp.bfloat16
    embed = jax.random.normal(jax.random.key(30), (vocab, d_model), dtype) * 0.02
    first = jax.random.randint(jax.random.key(31), (batch, 1), 0, vocab)
    iters = args.iters

    def tokens_result(seconds: float, tokens: int) -> dict[str, Any]:
        return {"ms": seconds * 1e3, "tokens_per_s": tokens / seconds, "vocab": vocab}

    graphdef, params = nnx.split(
        [
            attnax.MultiHeadAttention(
                nnx.Rngs(i),
                num_heads=num_heads,
                in_features=d_model,
                num_kv_heads=num_kv_heads,
                use_rope=True,
                rope_max_positions=2 * max_len,
                dtype="bfloat16",
                param_dtype="bfloat16",
            )
            for i in range(layers)
        ]
    )

    def contiguous_caches() -> list[Any]:
        caches = []
        for i in range(layers):
            cache = attnax.init_kv_layer_cache(batch, num_kv_heads, head_dim, max_len, dtype)
            k1, k2 = jax.random.split(jax.random.key(40 + i))
            caches.append(
                dataclasses.replace(
                    cache,
                    keys=jax.random.normal(k1, cache.keys.shape, dtype),
                    values=jax.random.normal(k2, cache.values.shape, dtype),
                    length=jnp.full((batch,), start_length, jnp.int32),
                )
            )
        return caches

    def paged_caches() -> list[Any]:
        block_size = args.block_size
        per_seq = max_len // block_size
        caches = []
        for i in range(layers):
            cache = attnax.init_paged_kv_cache(
                num_blocks=batch * per_seq,
                block_size=block_size,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                batch_size=batch,
                max_blocks_per_seq=per_seq,
                dtype=dtype,
            )
            k1, k2, k3 = jax.random.split(jax.random.key(50 + i), 3)
            table = jax.random.permutation(k3, batch * per_seq).reshape(batch, per_seq)
            caches.append(
                dataclasses.replace(
                    cache,
                    key_pool=jax.random.normal(k1, cache.key_pool.shape, dtype),
                    value_pool=jax.random.normal(k2, cache.value_pool.shape, dtype),
                    block_table=table.astype(jnp.int32),
                    seq_lengths=jnp.full((batch,), start_length, jnp.int32),
                )
            )
        return caches

    def rewind(caches: list[Any]) -> list[Any]:
        # Lengths only (contents do not matter), so repeated timing never overflows. One array
        # per cache: a buffer shared by two donated leaves cannot be donated.
        def length() -> Any:
            return jnp.full((batch,), start_length, jnp.int32)

        return [
            dataclasses.replace(c, length=length())
            if isinstance(c, attnax.KVLayerCache)
            else dataclasses.replace(c, seq_lengths=length())
            for c in caches
        ]

    def forward(params: Any, embed: Any, tokens: Any, caches: Any) -> tuple[Any, Any]:
        x = embed[tokens]
        new_caches = []
        for layer, cache in zip(nnx.merge(graphdef, params), caches, strict=True):
            y, cache = layer(x, kv_cache=cache)
            x = x + y
            new_caches.append(cache)
        return x[:, -1] @ embed.T, new_caches

    def run_generate(make_caches: Callable[[], list[Any]]) -> dict[str, Any]:
        def loop(params: Any, caches: Any, embed: Any, tokens: Any) -> Any:
            step = functools.partial(forward, params, embed)
            result = attnax.generate(step, caches, tokens, num_steps=steps)
            return result.tokens, result.cache, result.overflowed

        run = jax.jit(loop, donate_argnums=(1,))
        state: dict[str, Any] = {"caches": make_caches(), "overflowed": None}

        def call() -> Any:
            out, caches, overflowed = run(params, state["caches"], embed, first)
            state["caches"] = rewind(caches)
            state["overflowed"] = overflowed
            return out

        seconds = median_seconds(call, max(3, iters // 6))
        return {
            **tokens_result(seconds, batch * steps),
            "overflow": bool(jnp.any(state["overflowed"])),
        }

    def run_python_loop() -> dict[str, Any]:
        def one(params: Any, caches: Any, embed: Any, tokens: Any) -> Any:
            logits, caches = forward(params, embed, tokens, caches)
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, None], caches

        step = jax.jit(one, donate_argnums=(1,))
        state: dict[str, Any] = {"caches": contiguous_caches(), "token": first, "count": 0}

        def call() -> Any:
            state["token"], state["caches"] = step(params, state["caches"], embed, state["token"])
            state["count"] += 1
            if state["count"] % steps == 0:
                state["caches"] = rewind(state["caches"])
            return state["token"]

        seconds = median_seconds(call, iters)
        return tokens_result(seconds, batch)

    def run_flax_scan() -> dict[str, Any]:
        model = [
            nnx.MultiHeadAttention(
                num_heads,
                d_model,
                num_kv_heads=num_kv_heads,
                decode=True,
                dtype=dtype,
                param_dtype=dtype,
                rngs=nnx.Rngs(i),
            )
            for i in range(layers)
        ]
        for i, layer in enumerate(model):
            layer.init_cache((batch, max_len, d_model), dtype)
            k1, k2 = jax.random.split(jax.random.key(60 + i))
            layer.cached_key[...] = jax.random.normal(k1, layer.cached_key[...].shape, dtype)
            layer.cached_value[...] = jax.random.normal(k2, layer.cached_value[...].shape, dtype)
            layer.cache_index[...] = jnp.asarray(start_length, jnp.int32)
        flax_graphdef, flax_state = nnx.split(model)

        def loop(state: Any, embed: Any, tokens: Any) -> Any:
            def body(carry: Any, _: Any) -> Any:
                state, tokens = carry
                m = nnx.merge(flax_graphdef, state)
                x = embed[tokens]
                for layer in m:
                    x = x + layer(x)
                token = jnp.argmax(x[:, -1] @ embed.T, axis=-1).astype(jnp.int32)[:, None]
                return (nnx.state(m), token), token[:, 0]

            (state, _), out = jax.lax.scan(body, (state, tokens), None, length=steps)
            return out, state

        run = jax.jit(loop, donate_argnums=(0,))
        holder = {"state": flax_state}

        def call() -> Any:
            out, new_state = run(holder["state"], embed, first)
            m = nnx.merge(flax_graphdef, new_state)
            for layer in m:
                layer.cache_index[...] = jnp.asarray(start_length, jnp.int32)
            holder["state"] = nnx.state(m)
            return out

        seconds = median_seconds(call, max(3, iters // 6))
        return tokens_result(seconds, batch * steps)

    record(
        f"attnax.generate {layers}-layer x{steps} (contiguous, one jitted loop)",
        "generate/attnax",
        lambda: run_generate(contiguous_caches),
    )
    record(
        f"attnax.generate {layers}-layer x{steps} (paged block {args.block_size})",
        "generate/attnax-paged",
        lambda: run_generate(paged_caches),
    )
    record(
        f"attnax {layers}-layer jitted step, Python loop (donated caches)",
        "generate/attnax-python-loop",
        run_python_loop,
    )
    record(f"flax nnx MHA {layers}-layer lax.scan x{steps} (same greedy loop)", "generate/flax",
           run_flax_scan)


# --------------------------------------------------------------------------- report


def _best(group: str, key: str) -> dict[str, Any] | None:
    rows = [r for r in RESULTS if r["group"] == group and r.get("ok") and key in r]
    return max(rows, key=lambda r: r[key]) if rows else None


def summary() -> dict[str, Any]:
    out: dict[str, Any] = {}
    contiguous = _best("kernel/attnax-contiguous", "tb_per_s")
    paged = _best("kernel/attnax-paged", "tb_per_s")
    cudnn = next((r for r in RESULTS if "cudnn" in r["name"] and r.get("ok")), None)
    if contiguous:
        out["contiguous_tb_per_s"] = contiguous["tb_per_s"]
        out["contiguous_best_config"] = contiguous["name"]
    if paged:
        out["paged_tb_per_s"] = paged["tb_per_s"]
        out["paged_best_config"] = paged["name"]
    if contiguous and paged:
        out["paged_over_contiguous"] = paged["tb_per_s"] / contiguous["tb_per_s"]
    if contiguous and cudnn:
        out["attnax_over_cudnn"] = contiguous["tb_per_s"] / cudnn["tb_per_s"]
    steps = {r["name"]: r for r in RESULTS if r["group"].startswith("e2e") and r.get("ok")}
    attnax_step = next(
        (r for n, r in steps.items() if n.startswith("attnax") and "step" in n), None
    )
    flax_steps = [r for n, r in steps.items() if n.startswith("flax") and "step" in n]
    if attnax_step and flax_steps:
        best_flax = max(flax_steps, key=lambda r: r["tokens_per_s"])
        out["e2e_step_attnax_over_best_flax"] = (
            attnax_step["tokens_per_s"] / best_flax["tokens_per_s"]
        )
    attnax_scan = next(
        (r for n, r in steps.items() if n.startswith("attnax") and "scan" in n), None
    )
    flax_scan = next((r for n, r in steps.items() if n.startswith("flax") and "scan" in n), None)
    if attnax_scan and flax_scan:
        out["e2e_scan_attnax_over_flax"] = attnax_scan["tokens_per_s"] / flax_scan["tokens_per_s"]
    generated = {
        group: _best(f"generate/{group}", "tokens_per_s")
        for group in ("attnax", "attnax-paged", "attnax-python-loop", "flax")
    }
    if generated["attnax"]:
        speed = generated["attnax"]["tokens_per_s"]
        for group, key in (
            ("flax", "generate_attnax_over_flax_scan"),
            ("attnax-python-loop", "generate_attnax_over_python_loop"),
        ):
            if generated[group]:
                out[key] = speed / generated[group]["tokens_per_s"]
        if generated["attnax-paged"]:
            out["generate_paged_over_contiguous"] = (
                generated["attnax-paged"]["tokens_per_s"] / speed
            )
    return out


def print_table(extra: dict[str, Any]) -> None:
    print()
    print(f"{'group':<26} {'name':<78} {'ms':>9} {'TB/s':>7} {'tok/s':>10}  error")
    for r in RESULTS:
        ms = f"{r['ms']:.4f}" if "ms" in r else "-"
        tb = f"{r['tb_per_s']:.3f}" if "tb_per_s" in r else "-"
        tok = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"
        err = "" if r.get("ok") else r.get("error", "")[:120]
        print(f"{r['group']:<26} {r['name'][:78]:<78} {ms:>9} {tb:>7} {tok:>10}  {err}")
    print()
    for key, value in extra.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes on CPU, kernels interpreted"
    )
    parser.add_argument(
        "--smoke-peers", action="store_true", help="also interpret JAX's gqa in --smoke"
    )
    parser.add_argument(
        "--sweep", action="store_true", help="grid of kernel configs (tiles, stages, warps)"
    )
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument(
        "--paged-sorted", action="store_true", help="paged rows over an identity table too"
    )
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument(
        "--skip-generate", action="store_true", help="no attnax.generate / greedy-loop rows"
    )
    parser.add_argument(
        "--vocab", type=int, default=None, help="vocabulary of the generate rows (8192; smoke 64)"
    )
    args = parser.parse_args()
    if args.smoke:
        sizes = {
            "batch": 2,
            "heads": 8,
            "kv_heads": 2,
            "head_dim": 16,
            "cache_len": 64,
            "iters": 3,
            "e2e_batch": 2,
            "d_model": 64,
            "e2e_heads": 4,
            "e2e_kv_heads": 2,
            "layers": 2,
            "e2e_cache_len": 96,
            "scan_steps": 4,
            "vocab": 64,
            "block_size": 16,
        }
    else:
        sizes = {
            "batch": 8,
            "heads": 32,
            "kv_heads": 8,
            "head_dim": 128,
            "cache_len": 32768,
            "iters": 30,
            "e2e_batch": 8,
            "d_model": 1024,
            "e2e_heads": 16,
            "e2e_kv_heads": 4,
            "layers": 4,
            "e2e_cache_len": 4096,
            "scan_steps": 64,
            "vocab": 8192,
            "block_size": 64,
        }
    if args.vocab is not None:
        sizes["vocab"] = args.vocab
    for key, value in sizes.items():
        setattr(args, key, value)
    started = time.perf_counter()
    if not args.skip_kernels:
        kernel_benchmarks(args)
    if not args.skip_e2e:
        end_to_end_benchmarks(args)
    if not args.skip_generate:
        generate_benchmarks(args)
    extra = summary()
    device = jax.devices()[0]
    payload = {
        "benchmark": "decode",
        "device": getattr(device, "device_kind", str(device)),
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "smoke": args.smoke,
        "sizes": sizes,
        "wall_seconds": time.perf_counter() - started,
        "summary": extra,
        "results": RESULTS,
    }
    out_dir = os.environ.get(
        "OUT", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    )
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "decode_smoke.json" if args.smoke else "decode.json")
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2, default=str)
    print_table(extra)
    print(f"device: {payload['device']}  wall: {payload['wall_seconds']:.1f}s  json: {path}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
