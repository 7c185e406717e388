"""``MultiHeadAttention``: a thin NNX layer that projects, rotates, caches and calls a kernel.

Data flows one way: spec -> projections -> RoPE -> KV cache -> kernel -> output projection ->
dropout. Which kernel runs is decided in one table, ``attnax._backends.BACKENDS``; the layer
reads the spec's row of it (:attr:`AttentionSpec.backend`).
"""

import functools
from typing import Any, overload

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from ._backends import AttentionType, KernelSettings, user_layer_kernel
from ._checks import check_float_inputs
from ._cache import KVLayerCache, PagedKVCache, attend_with_cache, cache_positions
from ._mods import MaskScoreMod, SlidingWindowMask, compose_score_mods
from ._rope import apply_rope, rope_table
from ._spec import AttentionSpec
from ._typing import AttentionFn, AttentionMask, ScoreMod

__all__ = ["MultiHeadAttention", "RotaryTable"]


class RotaryTable(nnx.Variable[jax.Array]):
    """The precomputed RoPE cos/sin table: layer state, never trained."""


class MultiHeadAttention(nnx.Module):
    """Multi-head attention (MHA, GQA, MQA) with RoPE, score mods, sliding windows and KV caches.

    Every constructor argument is validated by :class:`AttentionSpec` first, so a bad
    combination raises ``ValueError`` (a pydantic ``ValidationError``) naming the field.

    Args:
      rngs: random streams for parameter init and dropout.
      num_heads: query heads.
      in_features: width of the input (and of ``context`` for cross-attention).
      qkv_features: total query width, ``num_heads * head_dim`` (default ``in_features``).
      out_features: output width (default ``in_features``).
      num_kv_heads: key/value heads, a divisor of ``num_heads`` (default ``num_heads``).
      dropout_rate: dropout on the layer's output.
      broadcast_dropout: share the output-dropout mask across the batch.
      decode: must stay False (a ValueError otherwise): the layer keeps no cache; decode by
        passing ``kv_cache=`` to the call, or with :func:`attnax.generate`.
      attention_type: the backend (:class:`AttentionType` or its string value).
      attention_block_size: block size of the blockwise backends (PALLAS_FLASH rounds it down to
        a power of two and clamps it to [16, 128] for its query tiles, and to at most 64 for
        its forward's key tiles).
      linear_attention_chunk_size: chunk size of LINEAR (inputs are padded to whole chunks).
      attention_fn: any :class:`AttentionFn`; it beats ``attention_type``.
      score_mod: applied on every call, composed before a per-call ``score_mod``.
      attention_window: causal sliding window over absolute positions.
      use_rope: rotate queries and keys (RoPE).
      rope_base: RoPE frequency base.
      rope_max_positions: size of the precomputed RoPE table (positions must stay below it).
      dtype: computation dtype name (default: inferred from inputs and parameters).
      param_dtype: parameter dtype name.

    LINEAR and LITE have no per-pair scores: a causal mask mod becomes their causal form; any
    other score mod raises ``NotImplementedError`` (at construction, a ``ValidationError``)
    naming the backends that apply it.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> from flax import nnx
      >>> layer = attnax.MultiHeadAttention(
      ...     nnx.Rngs(0), num_heads=4, in_features=16, num_kv_heads=2, use_rope=True)
      >>> x = jax.random.normal(jax.random.key(0), (1, 6, 16))
      >>> @nnx.jit
      ... def causal_forward(layer, x):
      ...     return layer(x, score_mod=attnax.causal_mod())
      >>> causal_forward(layer, x).shape
      (1, 6, 16)
      >>> layer.spec.head_dim  # the validated AttentionSpec; from_spec rebuilds the layer
      4
    """

    def __init__(
        self,
        rngs: nnx.Rngs,
        *,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        dropout_rate: float = 0.0,
        broadcast_dropout: bool = True,
        decode: bool = False,
        attention_type: AttentionType | str = AttentionType.STANDARD,
        attention_block_size: int = 512,
        linear_attention_chunk_size: int = 64,
        attention_fn: AttentionFn | None = None,
        score_mod: ScoreMod | None = None,
        attention_window: int | None = None,
        use_rope: bool = False,
        rope_base: float = 10000.0,
        rope_max_positions: int = 4096,
        dtype: str | None = None,
        param_dtype: str = "float32",
    ) -> None:
        spec = AttentionSpec(
            num_heads=num_heads,
            in_features=in_features,
            qkv_features=qkv_features,
            out_features=out_features,
            num_kv_heads=num_kv_heads,
            dropout_rate=dropout_rate,
            broadcast_dropout=broadcast_dropout,
            decode=decode,
            attention_type=AttentionType(attention_type),
            attention_block_size=attention_block_size,
            linear_attention_chunk_size=linear_attention_chunk_size,
            attention_fn=attention_fn,
            score_mod=score_mod,
            attention_window=attention_window,
            use_rope=use_rope,
            rope_base=rope_base,
            rope_max_positions=rope_max_positions,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self._build(spec, rngs)

    @classmethod
    def from_spec(cls, spec: AttentionSpec, *, rngs: nnx.Rngs) -> "MultiHeadAttention":
        """Build a layer from a spec (its fields become the constructor's arguments)."""
        fields = {name: getattr(spec, name) for name in type(spec).model_fields}
        return cls(rngs, **fields)

    def _build(self, spec: AttentionSpec, rngs: nnx.Rngs) -> None:
        self._spec = spec
        dtype = None if spec.dtype is None else jnp.dtype(spec.dtype)
        param_dtype = jnp.dtype(spec.param_dtype)
        linear = functools.partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = linear(spec.in_features, spec.resolved_qkv_features)
        self.key = linear(spec.in_features, spec.kv_features)
        self.value = linear(spec.in_features, spec.kv_features)
        self.out = linear(spec.resolved_qkv_features, spec.resolved_out_features)
        self.gate = (
            linear(spec.in_features, spec.resolved_qkv_features)
            if spec.backend.gated and spec.attention_fn is None
            else nnx.data(None)
        )
        self.rope = (
            RotaryTable(rope_table(spec.rope_max_positions, spec.head_dim, spec.rope_base))
            if spec.use_rope
            else nnx.data(None)
        )
        self.dropout = nnx.Dropout(
            spec.dropout_rate, broadcast_dims=(0,) if spec.broadcast_dropout else (), rngs=rngs
        )
        self._kernel = (
            user_layer_kernel(spec.attention_fn)
            if spec.attention_fn is not None
            else spec.backend.layer_kernel(
                KernelSettings(spec.attention_block_size, spec.linear_attention_chunk_size)
            )
        )

    @property
    def spec(self) -> AttentionSpec:
        """The validated spec this layer was built from."""
        return self._spec

    @overload
    def __call__(
        self,
        x: Float[Array, "B T F"],
        *,
        context: Float[Array, "B S F"] | None = None,
        mask: Bool[Array, "#B #H #T #S"] | None = None,
        deterministic: bool | None = None,
        position_ids_q: Int[Array, "#B T"] | None = None,
        position_ids_kv: Int[Array, "#B S"] | None = None,
        score_mod: ScoreMod | None = None,
        kv_cache: None = None,
    ) -> Float[Array, "B T O"]: ...

    @overload
    def __call__(
        self,
        x: Float[Array, "B T F"],
        *,
        context: Float[Array, "B S F"] | None = None,
        mask: Bool[Array, "#B #H #T #S"] | None = None,
        deterministic: bool | None = None,
        position_ids_q: Int[Array, "#B T"] | None = None,
        position_ids_kv: Int[Array, "#B S"] | None = None,
        score_mod: ScoreMod | None = None,
        kv_cache: KVLayerCache,
    ) -> tuple[Float[Array, "B T O"], KVLayerCache]: ...

    @overload
    def __call__(
        self,
        x: Float[Array, "B T F"],
        *,
        context: Float[Array, "B S F"] | None = None,
        mask: Bool[Array, "#B #H #T #S"] | None = None,
        deterministic: bool | None = None,
        position_ids_q: Int[Array, "#B T"] | None = None,
        position_ids_kv: Int[Array, "#B S"] | None = None,
        score_mod: ScoreMod | None = None,
        kv_cache: PagedKVCache,
    ) -> tuple[Float[Array, "B T O"], PagedKVCache]: ...

    def __call__(
        self,
        x: Float[Array, "B T F"],
        *,
        context: Float[Array, "B S F"] | None = None,
        mask: Bool[Array, "#B #H #T #S"] | None = None,
        deterministic: bool | None = None,
        position_ids_q: Int[Array, "#B T"] | None = None,
        position_ids_kv: Int[Array, "#B S"] | None = None,
        score_mod: ScoreMod | None = None,
        kv_cache: KVLayerCache | PagedKVCache | None = None,
    ) -> Float[Array, "B T O"] | tuple[Float[Array, "B T O"], KVLayerCache | PagedKVCache]:
        """Attend from ``x`` to itself (or to ``context``).

        Args:
          x: (batch, seq_q, in_features).
          context: (batch, seq_kv, in_features) for cross-attention; ``x`` when None.
          mask: boolean, broadcastable to (batch, num_heads, seq_q, seq_kv); True = attend.
          deterministic: no dropout when True; None follows the module's train/eval state.
          position_ids_q: RoPE positions of the queries, (batch or 1, seq_q); default
            0..seq_q-1, or each row's cache length + i when decoding.
          position_ids_kv: RoPE positions of the keys (default like the queries' for
            self-attention, 0..seq_kv-1 for cross-attention).
          score_mod: composed after the constructor's score mod for this call.
          kv_cache: a :class:`KVLayerCache` or :class:`PagedKVCache`; the new keys and values
            are appended at each row's length and attention covers the whole cache with
            absolute positions. The call then returns ``(out, new_cache)``.

        Returns:
          (batch, seq_q, out_features), or ``(out, new_cache)`` when ``kv_cache`` is given.
        """
        spec = self._spec
        check_float_inputs("MultiHeadAttention", x=x, context=context)
        if x.ndim != 3 or x.shape[-1] != spec.in_features:
            raise ValueError(
                f"`x` must have shape (batch, seq, in_features={spec.in_features}), got {x.shape}."
            )
        if context is not None and (
            context.ndim != 3
            or context.shape[0] != x.shape[0]
            or context.shape[-1] != spec.in_features
        ):
            raise ValueError(
                f"`context` must have shape (batch={x.shape[0]}, seq_kv, in_features="
                f"{spec.in_features}), got {context.shape}."
            )
        if kv_cache is not None and context is not None:
            raise ValueError("`kv_cache` caches self-attention keys; do not pass `context` with it.")
        batch, seq_q, _ = x.shape
        kv_input = x if context is None else context
        seq_kv = kv_input.shape[1]
        heads, kv_heads, head_dim = spec.num_heads, spec.resolved_num_kv_heads, spec.head_dim

        query = self.query(x).reshape(batch, seq_q, heads, head_dim)
        key = self.key(kv_input).reshape(batch, seq_kv, kv_heads, head_dim)
        value = self.value(kv_input).reshape(batch, seq_kv, kv_heads, head_dim)

        if kv_cache is not None:
            return self._attend_cached(
                x, query, key, value, kv_cache,
                mask=mask, deterministic=deterministic, position_ids_q=position_ids_q,
                score_mod=score_mod,
            )

        if spec.use_rope:
            assert isinstance(self.rope, RotaryTable)
            table = self.rope[...]
            default_q = jnp.arange(seq_q)[None]
            pos_q = default_q if position_ids_q is None else position_ids_q
            if position_ids_kv is not None:
                pos_kv = position_ids_kv
            elif context is None:
                pos_kv = pos_q
            else:
                pos_kv = jnp.arange(seq_kv)[None]
            query = apply_rope(query, pos_q, table, argument="position_ids_q")
            key = apply_rope(key, pos_kv, table, argument="position_ids_kv")

        window_mod = (
            None
            if spec.attention_window is None
            else MaskScoreMod(SlidingWindowMask(spec.attention_window, causal=True))
        )
        combined_mod = compose_score_mods(spec.score_mod, score_mod, window_mod)
        out = self._run_kernel(x, query, key, value, mask=mask, score_mod=combined_mod)
        return self._project_out(out, deterministic)

    def _run_kernel(
        self,
        x: Array,
        query: Array,
        key: Array,
        value: Array,
        *,
        mask: AttentionMask | None,
        score_mod: ScoreMod | None,
    ) -> Array:
        extra: dict[str, Any] = {}
        if self.gate is not None:
            batch, seq_q, _ = x.shape
            extra["gate"] = self.gate(x).reshape(batch, seq_q, self._spec.num_heads, -1)
        return self._kernel(query, key, value, mask=mask, score_mod=score_mod, **extra)

    def _project_out(self, out: Array, deterministic: bool | None) -> Array:
        batch, seq_q = out.shape[:2]
        projected = self.out(out.reshape(batch, seq_q, -1))
        return self.dropout(projected, deterministic=deterministic)

    def _attend_cached(
        self,
        x: Array,
        query: Array,
        key: Array,
        value: Array,
        kv_cache: KVLayerCache | PagedKVCache,
        *,
        mask: AttentionMask | None,
        deterministic: bool | None,
        position_ids_q: Array | None,
        score_mod: ScoreMod | None,
    ) -> tuple[Array, KVLayerCache | PagedKVCache]:
        """Decode step: rotate at absolute positions, append, attend over the whole cache."""
        spec = self._spec
        if mask is not None:
            raise NotImplementedError(
                "`mask` is not supported with `kv_cache`: the cache masks beyond each row's "
                "length itself; express other masking as a score mod (e.g. document_mask_mod)."
            )
        reason = None if spec.attention_fn is not None else spec.backend.no_decode_reason
        if reason is not None:
            raise NotImplementedError(
                f"attention_type={spec.backend.name!r} has no KV-cache decode path: {reason}. "
                "Decode with a softmax backend (flash, pallas_flash, memory_efficient, standard)."
            )
        seq_q = x.shape[1]
        positions = cache_positions(kv_cache, seq_q) if position_ids_q is None else position_ids_q
        if spec.use_rope:
            assert isinstance(self.rope, RotaryTable)
            table = self.rope[...]
            query = apply_rope(query, positions, table, argument="position_ids_q")
            key = apply_rope(key, positions, table, argument="position_ids_q")
        out, new_cache = attend_with_cache(
            jnp.swapaxes(query, 1, 2),
            jnp.swapaxes(key, 1, 2),
            jnp.swapaxes(value, 1, 2),
            kv_cache,
            score_mod=compose_score_mods(spec.score_mod, score_mod),
            attention_window=spec.attention_window,
            kernel=spec.attention_fn,
        )
        return self._project_out(jnp.swapaxes(out, 1, 2), deterministic), new_cache
