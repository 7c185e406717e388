"""Generate text from the tiny LM of ``train_tiny_lm.py`` with attnax KV caches, in one program.

The prompt (but its last byte) is prefilled in causal chunks (``attnax.prefill``); then
``attnax.generate`` runs the whole decode loop as one ``lax.while_loop`` inside a single jitted
call with the caches donated (RoPE positions and the causal mask use each row's absolute cache
length), sampling with temperature / top-k / top-p through ``attnax.sample_logits``.

    python examples/train_tiny_lm.py --steps 300 --out /tmp/tiny_lm.pkl
    python examples/generate.py --model /tmp/tiny_lm.pkl --prompt "The " --tokens 80
"""

import argparse
import functools
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

import attnax  # noqa: E402


def load(path: Path) -> TinyLM:
    with open(path, "rb") as fh:
        saved = pickle.load(fh)
    model = TinyLM(**saved["config"], rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, saved["state"])
    nnx.update(model, state)
    return model


def generate(
    model: TinyLM,
    prompt: str,
    num_tokens: int,
    *,
    temperature: float,
    seed: int,
    top_k: int | None = None,
    top_p: float | None = None,
) -> str:
    tokens = jnp.asarray(np.frombuffer(prompt.encode("utf-8"), np.uint8).astype(np.int32))[None]
    spec = model.blocks[0].attention.spec
    max_len = tokens.shape[1] + num_tokens
    caches = [
        attnax.init_kv_layer_cache(1, spec.resolved_num_kv_heads, spec.head_dim, max_len)
        for _ in model.blocks
    ]
    graphdef, params = nnx.split(model)

    def forward(params: Any, tokens: jax.Array, caches: Any) -> Any:
        return nnx.merge(graphdef, params)(tokens, kv_caches=caches)

    sample = functools.partial(
        attnax.sample_logits, temperature=temperature, top_k=top_k, top_p=top_p
    )

    # One compiled program: prefill, then every new byte; the caches are updated in place.
    @functools.partial(jax.jit, donate_argnums=1)
    def run(params: Any, caches: Any, tokens: jax.Array, key: jax.Array) -> Any:
        step = functools.partial(forward, params)
        if tokens.shape[1] > 1:
            _, caches = attnax.prefill(step, caches, tokens[:, :-1], chunk_size=64)
        return attnax.generate(
            step, caches, tokens[:, -1:], num_steps=num_tokens, rng=key, sample=sample
        )

    result = run(params, caches, tokens, jax.random.key(seed))
    result.raise_if_overflowed()
    out = np.asarray(result.tokens[0]).astype(np.uint8).tobytes()
    return prompt + out.decode("utf-8", errors="replace")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--prompt", default="The ")
    p.add_argument("--tokens", type=int, default=80)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(generate(load(args.model), args.prompt, args.tokens, temperature=args.temperature,
                   seed=args.seed, top_k=args.top_k, top_p=args.top_p))


if __name__ == "__main__":
    main()
