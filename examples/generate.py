"""Generate text from the tiny LM of ``train_tiny_lm.py`` with attnax KV caches under jit.

The prompt is prefilled in one call; then each new byte is one jitted step over every layer's
cache (the RoPE positions and the causal mask use each row's absolute cache length).

    python examples/train_tiny_lm.py --steps 300 --out /tmp/tiny_lm.pkl
    python examples/generate.py --model /tmp/tiny_lm.pkl --prompt "The " --tokens 80
"""

import argparse
import pickle
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_lm import TinyLM  # noqa: E402

from attnax._cache import init_kv_layer_cache  # noqa: E402


def load(path: Path) -> TinyLM:
    with open(path, "rb") as fh:
        saved = pickle.load(fh)
    model = TinyLM(**saved["config"], rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, saved["state"])
    nnx.update(model, state)
    return model


def generate(model: TinyLM, prompt: str, num_tokens: int, *, temperature: float, seed: int) -> str:
    tokens = jnp.asarray(np.frombuffer(prompt.encode("utf-8"), np.uint8).astype(np.int32))[None]
    first_block = model.blocks[0].attention
    spec = first_block.spec
    max_len = tokens.shape[1] + num_tokens
    caches = [
        init_kv_layer_cache(1, spec.resolved_num_kv_heads, spec.head_dim, max_len, jnp.float32)
        for _ in model.blocks
    ]

    @nnx.jit
    def step(model: TinyLM, tokens: jax.Array, caches: Any, key: jax.Array) -> Any:
        logits, caches = model(tokens, kv_caches=caches)
        last = logits[:, -1] / max(temperature, 1e-6)
        next_token = jax.random.categorical(key, last) if temperature > 0 else jnp.argmax(last, -1)
        return next_token[:, None].astype(jnp.int32), caches

    key = jax.random.key(seed)
    out = []
    current = tokens
    for _ in range(num_tokens):
        key, sub = jax.random.split(key)
        current, caches = step(model, current, caches, sub)
        out.append(int(current[0, 0]))
    return prompt + bytes(out).decode("utf-8", errors="replace")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--prompt", default="The ")
    p.add_argument("--tokens", type=int, default=80)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(generate(load(args.model), args.prompt, args.tokens, temperature=args.temperature, seed=args.seed))


if __name__ == "__main__":
    main()
