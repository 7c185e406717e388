"""Ring attention over a device mesh: one attnax layer on a sequence split across devices.

An ``attnax.MultiHeadAttention`` (GQA, RoPE, causal) runs inside ``jax.shard_map`` with the
sequence axis sharded over the mesh axis ``"seq"``; its ``attention_fn`` is
``ring_attention(axis_name="seq", layout="zigzag")``, so each device keeps ``T / N`` query rows
and key/value shards travel around the ring. The zigzag layout gives device ``i`` chunks ``i``
and ``2N - 1 - i`` of ``2N`` so causal work is balanced; the input is put into that order with
``to_ring_layout`` and every shard passes its tokens' *global* positions to the layer
(``position_ids_q`` / ``position_ids_kv``), so RoPE and the causal mask see the true positions.
The result is checked against the same layer (same parameters) run without sharding. On GPUs
the ring computes each shard pair with cuDNN; adding ``fused_pairs="pallas"`` to the partial
trades about a third of that speed for the least memory per device (the longest sequences:
``benchmarks/NOTES.md``, Ring).

Devices. Without a GPU host of ``--devices`` GPUs this runs on ``--devices`` *virtual* CPU
devices: when ``XLA_FLAGS`` does not already ask for a host device count, the script sets
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (appended to any other XLA flags) before
JAX is imported, because XLA reads the flag once, when it creates the CPU client. Virtual
devices share the machine's cores, so the timing shows the mechanics, not a speed-up.

    python examples/long_context.py --devices 4 --seq 4096
    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python examples/long_context.py --devices 8
"""

import argparse
import os
import sys
import time

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--devices", type=int, default=4, help="mesh size (sequence shards)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=4096, help="global length, a multiple of 2 x devices")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--block-size", type=int, default=256, help="ring tile (tokens per device)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls (median) after a warm-up")
    p.add_argument("--seed", type=int, default=0)
    return p


def request_host_devices(count: int) -> None:
    """Ask XLA for ``count`` CPU devices unless XLA_FLAGS already sets a count (before JAX)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if DEVICE_COUNT_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={count}".strip()


def run(args: argparse.Namespace) -> float:
    """Run the sharded layer and the unsharded one; print error and times; return the error."""
    # Imported only now: XLA_FLAGS must be in the environment before JAX starts (see above).
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, PartitionSpec

    import attnax

    devices = jax.devices()
    if len(devices) < args.devices:
        sys.exit(
            f"--devices {args.devices}: only {len(devices)} {devices[0].platform} device(s) "
            f"visible. On CPU, run with XLA_FLAGS unset (the script then asks for "
            f"{args.devices}) or with {DEVICE_COUNT_FLAG}={args.devices} in it; on a GPU host "
            "with fewer GPUs, add JAX_PLATFORMS=cpu."
        )
    if args.seq % (2 * args.devices):
        sys.exit(f"--seq {args.seq}: zigzag needs a multiple of 2 x {args.devices} devices.")
    mesh = Mesh(np.array(devices[: args.devices]), ("seq",))

    def layer(attention_fn: attnax.AttentionFn | None) -> attnax.MultiHeadAttention:
        # Same seed, same parameters: the sharded and unsharded layers differ only in the kernel.
        return attnax.MultiHeadAttention(
            nnx.Rngs(args.seed),
            num_heads=args.heads,
            num_kv_heads=args.kv_heads,
            in_features=args.d_model,
            use_rope=True,
            rope_max_positions=args.seq,
            score_mod=attnax.causal_mod(),
            attention_type="memory_efficient",
            attention_block_size=args.block_size,
            attention_fn=attention_fn,
        )

    x = jax.random.normal(jax.random.key(args.seed + 1), (args.batch, args.seq, args.d_model))

    ring = functools.partial(
        attnax.ring_attention, axis_name="seq", layout="zigzag", block_size=args.block_size
    )
    graphdef, state = nnx.split(layer(ring))
    # Global positions of the tokens in zigzag order; sharded with them, one block per device.
    positions = attnax.to_ring_layout(
        jnp.arange(args.seq, dtype=jnp.int32)[None, None, :, None], args.devices, "zigzag"
    )[0, 0, :, 0]

    def shard_body(state: nnx.State, x: jax.Array, positions: jax.Array) -> jax.Array:
        module = nnx.merge(graphdef, state)
        return module(x, position_ids_q=positions[None], position_ids_kv=positions[None])

    tokens = PartitionSpec(None, "seq", None)
    sharded = jax.shard_map(
        shard_body,
        mesh=mesh,
        in_specs=(PartitionSpec(), tokens, PartitionSpec("seq")),
        out_specs=tokens,
    )

    @jax.jit
    def ring_forward(state: nnx.State, x: jax.Array, positions: jax.Array) -> jax.Array:
        # (B, T, F) has the sequence on axis 1; the layout helpers expect it on axis 2.
        x_ring = attnax.to_ring_layout(x[:, None], args.devices, "zigzag")[:, 0]
        out = sharded(state, x_ring, positions)
        return attnax.from_ring_layout(out[:, None], args.devices, "zigzag")[:, 0]

    unsharded_graphdef, unsharded_state = nnx.split(layer(None))

    @jax.jit
    def single_device_forward(state: nnx.State, x: jax.Array) -> jax.Array:
        out: jax.Array = nnx.merge(unsharded_graphdef, state)(x)
        return out

    def timed(fn: functools.partial[jax.Array]) -> tuple[jax.Array, float]:
        out = fn().block_until_ready()  # warm-up (compiles)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = fn().block_until_ready()
            times.append(time.perf_counter() - start)
        return out, float(np.median(times))

    ring_out, ring_seconds = timed(functools.partial(ring_forward, state, x, positions))
    expected, single_seconds = timed(functools.partial(single_device_forward, unsharded_state, x))
    error = float(jnp.max(jnp.abs(ring_out - expected)))
    print(
        f"ring attention over {args.devices} {devices[0].platform} devices "
        f"({devices[0].device_kind}), zigzag layout: B{args.batch} T{args.seq} "
        f"d_model {args.d_model}, {args.heads} heads over {args.kv_heads} KV heads, causal + RoPE"
    )
    print(f"max |ring - single device| = {error:.2e}")
    print(f"ring: {ring_seconds * 1e3:.1f} ms   single device: {single_seconds * 1e3:.1f} ms")
    return error


def main() -> None:
    args = parser().parse_args()
    request_host_devices(args.devices)
    error = run(args)
    # float32 throughout; loose enough for GPUs whose default float32 matmuls use TF32.
    if not error < 1e-2:
        sys.exit(f"ring attention disagrees with the single-device layer: {error:.2e}")


if __name__ == "__main__":
    main()
