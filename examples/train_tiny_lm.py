"""Train a tiny byte-level decoder-only language model built on attnax attention.

The text is the docstrings of a few Python standard-library modules: it ships with every Python,
so the example runs offline. Each block is pre-norm: RMSNorm -> attnax attention (GQA + RoPE,
causal) -> residual, RMSNorm -> MLP -> residual; the output layer is tied to the embedding.

    python examples/train_tiny_lm.py --steps 300 --out /tmp/tiny_lm.pkl
"""

import argparse
import importlib
import pickle
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import attnax

VOCAB = 256  # bytes


def corpus() -> np.ndarray:
    """Bytes of some standard-library docstrings (offline, deterministic)."""
    names = ("textwrap", "json", "collections", "functools", "itertools", "string", "heapq")
    texts = [importlib.import_module(name).__doc__ or "" for name in names]
    return np.frombuffer("\n\n".join(texts).encode("utf-8"), np.uint8).astype(np.int32)


class Block(nnx.Module):
    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, max_len: int, rngs: nnx.Rngs):
        self.attention_norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.attention = attnax.MultiHeadAttention(
            rngs, num_heads=num_heads, in_features=d_model, num_kv_heads=num_kv_heads,
            use_rope=True, rope_max_positions=max_len, score_mod=attnax.causal_mod(),
            attention_type="memory_efficient" if jax.default_backend() == "cpu" else "flash",
            attention_block_size=64,
        )
        self.mlp_norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.mlp_in = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def __call__(self, x: jax.Array, kv_cache: Any = None) -> Any:
        h = self.attention_norm(x)
        new_cache = None
        if kv_cache is None:
            attended = self.attention(h)
        else:
            attended, new_cache = self.attention(h, kv_cache=kv_cache)
        x = x + attended
        x = x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))
        return x if kv_cache is None else (x, new_cache)


class TinyLM(nnx.Module):
    def __init__(self, *, d_model: int, num_layers: int, num_heads: int, num_kv_heads: int,
                 max_len: int, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, d_model, rngs=rngs)
        self.blocks = nnx.List(
            [Block(d_model, num_heads, num_kv_heads, max_len, rngs) for _ in range(num_layers)]
        )
        self.norm = nnx.RMSNorm(d_model, rngs=rngs)

    def __call__(self, tokens: jax.Array, kv_caches: Any = None) -> Any:
        x = self.embed(tokens)
        new_caches = []
        for i, block in enumerate(self.blocks):
            if kv_caches is None:
                x = block(x)
            else:
                x, cache = block(x, kv_cache=kv_caches[i])
                new_caches.append(cache)
        logits = self.embed.attend(self.norm(x))  # tied output layer
        return logits if kv_caches is None else (logits, new_caches)


def config(args: argparse.Namespace) -> dict[str, int]:
    return dict(d_model=args.d_model, num_layers=args.layers, num_heads=args.heads,
                num_kv_heads=args.kv_heads, max_len=args.seq * 4)


def train(args: argparse.Namespace) -> list[float]:
    data = corpus()
    model = TinyLM(**config(args), rngs=nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, optax.adamw(args.lr), wrt=nnx.Param)

    @nnx.jit
    def step(model: TinyLM, optimizer: nnx.Optimizer, batch: jax.Array) -> jax.Array:
        def loss_fn(model: TinyLM) -> jax.Array:
            logits = model(batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(args.seed)
    losses = []
    start = time.perf_counter()
    for i in range(args.steps):
        offsets = rng.integers(0, len(data) - args.seq - 1, size=args.batch)
        batch = jnp.asarray(np.stack([data[o : o + args.seq + 1] for o in offsets]))
        losses.append(float(step(model, optimizer, batch)))
        if i % max(1, args.steps // 10) == 0 or i == args.steps - 1:
            print(f"step {i:5d}  loss {losses[-1]:.3f}  ({time.perf_counter() - start:.1f}s)", flush=True)
    if args.out:
        state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        with open(args.out, "wb") as fh:
            pickle.dump({"config": config(args), "state": jax.tree.map(np.asarray, state)}, fh)
        print(f"saved {args.out}")
    return losses


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    return p


if __name__ == "__main__":
    train(parser().parse_args())
