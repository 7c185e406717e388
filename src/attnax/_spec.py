"""``AttentionSpec``: every rule of the layer's constructor, validated before anything is built.

The spec is a frozen, hashable pydantic model (usable as a static ``jax.jit`` argument). Each
cross-field rule is its own named validator whose ``ValidationError`` names the offending field
and says how to fix it. Derived values are read-only properties.
"""

from typing import Annotated, Any, Self

import jax.numpy as jnp
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    WithJsonSchema,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from ._backends import BACKENDS, AttentionType, Backend, softmax_backend_names
from ._typing import AttentionFn, ScoreMod

__all__ = ["AttentionSpec", "AttentionType"]


_CALLABLE_NOTE = (
    "A Python callable: JSON cannot hold one, so it is always null in JSON; set it in Python."
)

# Callables stay out of JSON: the schema admits only null for them.
_OptionalAttentionFn = Annotated[
    AttentionFn | None, WithJsonSchema({"type": "null", "description": _CALLABLE_NOTE})
]
_OptionalScoreMod = Annotated[
    ScoreMod | None, WithJsonSchema({"type": "null", "description": _CALLABLE_NOTE})
]
_DropoutRate = Annotated[float, Field(ge=0.0, lt=1.0)]
# RoPE's frequencies are base^(-2i/D): a base above 1 makes them fall with i, as RoPE intends;
# at or below 1 they do not, and a tiny base underflows in float32 to infinite frequencies
# (NaN outputs, found by the property test).
_RopeBase = Annotated[float, Field(gt=1.0)]


def _field_error(field: str, kind: str, message: str, value: Any, **context: Any) -> ValidationError:
    """A ValidationError located at ``field`` (pydantic puts model-validator errors at the root)."""
    return ValidationError.from_exception_data(
        "AttentionSpec",
        [
            InitErrorDetails(
                type=PydanticCustomError(kind, message, context or None),
                loc=(field,),
                input=value,
            )
        ],
    )


def _softmax_backends_text() -> str:
    names = [repr(name) for name in softmax_backend_names()]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _float_dtype_name(value: str | None, field: str) -> str | None:
    if value is None:
        return None
    try:
        dtype = jnp.dtype(value)
    except TypeError as error:
        raise ValueError(
            f"{field}={value!r} is not a JAX dtype name; use e.g. 'float32' or 'bfloat16'."
        ) from error
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{field}={value!r} must name a floating dtype, e.g. 'float32'.")
    return dtype.name


class AttentionSpec(BaseModel, frozen=True, extra="forbid"):
    """Everything that defines a :class:`attnax.MultiHeadAttention` layer.

    Fields mirror the layer's constructor; see its docstring for their meaning.

    Raises:
      ValueError: a pydantic ``ValidationError`` naming the offending field and the fix (for
        example ``num_heads`` that does not divide ``qkv_features``).

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> spec = attnax.AttentionSpec(num_heads=4, in_features=32, num_kv_heads=2)
      >>> spec.head_dim, spec.kv_features
      (8, 16)
      >>> spec == attnax.AttentionSpec.model_validate_json(spec.model_dump_json())
      True
      >>> try:
      ...     attnax.AttentionSpec(num_heads=3, in_features=32)  # 32 features do not split in 3
      ... except ValueError as error:
      ...     print(type(error).__name__)
      ValidationError
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    num_heads: PositiveInt
    in_features: PositiveInt
    qkv_features: PositiveInt | None = None
    out_features: PositiveInt | None = None
    num_kv_heads: PositiveInt | None = None
    dropout_rate: _DropoutRate = 0.0
    broadcast_dropout: bool = True
    decode: bool = False
    attention_type: AttentionType = AttentionType.STANDARD
    attention_block_size: PositiveInt = 512
    linear_attention_chunk_size: PositiveInt = 64
    attention_fn: _OptionalAttentionFn = None
    score_mod: _OptionalScoreMod = None
    attention_window: PositiveInt | None = None
    use_rope: bool = False
    rope_base: _RopeBase = 10000.0
    rope_max_positions: PositiveInt = 4096
    dtype: str | None = None
    param_dtype: str = "float32"

    # ------------------------------------------------------------------ derived values

    @property
    def resolved_qkv_features(self) -> int:
        """Total query/key/value projection width (``qkv_features`` or ``in_features``)."""
        return self.in_features if self.qkv_features is None else self.qkv_features

    @property
    def resolved_out_features(self) -> int:
        """Output width (``out_features`` or ``in_features``)."""
        return self.in_features if self.out_features is None else self.out_features

    @property
    def resolved_num_kv_heads(self) -> int:
        """Key/value heads (``num_kv_heads`` or ``num_heads``)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        """Per-head width, ``qkv_features // num_heads``."""
        return self.resolved_qkv_features // self.num_heads

    @property
    def backend(self) -> Backend:
        """The row of the backend table (``attnax._backends.BACKENDS``) for ``attention_type``.

        ``attention_fn``, where set, beats it (see :attr:`uses_custom_attention`)."""
        return BACKENDS[self.attention_type]

    @property
    def kv_features(self) -> int:
        """Key (and value) projection width, ``num_kv_heads * head_dim``."""
        return self.resolved_num_kv_heads * self.head_dim

    # ------------------------------------------------------------------ field rules

    @field_validator("dtype")
    @classmethod
    def _dtype_is_float(cls, value: str | None) -> str | None:
        return _float_dtype_name(value, "dtype")

    @field_validator("param_dtype")
    @classmethod
    def _param_dtype_is_float(cls, value: str) -> str:
        name = _float_dtype_name(value, "param_dtype")
        assert name is not None
        return name

    # ------------------------------------------------------------------ cross-field rules

    @model_validator(mode="after")
    def _num_heads_divides_qkv_features(self) -> Self:
        if self.resolved_qkv_features % self.num_heads != 0:
            raise _field_error(
                "num_heads",
                "num_heads_divides_qkv_features",
                "num_heads={num_heads} must divide qkv_features={qkv_features} (qkv_features "
                "defaults to in_features); choose a head count that divides it or set "
                "qkv_features to a multiple of num_heads.",
                self.num_heads,
                num_heads=self.num_heads,
                qkv_features=self.resolved_qkv_features,
            )
        return self

    @model_validator(mode="after")
    def _num_kv_heads_divides_num_heads(self) -> Self:
        kv = self.resolved_num_kv_heads
        if not (1 <= kv <= self.num_heads and self.num_heads % kv == 0):
            raise _field_error(
                "num_kv_heads",
                "num_kv_heads_divides_num_heads",
                "num_kv_heads={num_kv_heads} must be between 1 and num_heads={num_heads} and "
                "divide it (MHA: equal, GQA: a divisor, MQA: 1).",
                kv,
                num_kv_heads=kv,
                num_heads=self.num_heads,
            )
        return self

    @model_validator(mode="after")
    def _decode_goes_through_kv_cache(self) -> Self:
        # flax's decode=True keeps the cache inside the layer; attnax keeps none, so accepting
        # decode=True would be an argument silently ignored.
        if self.decode:
            raise _field_error(
                "decode",
                "decode_needs_kv_cache",
                "decode=True is not a mode of attnax's layer: it keeps no cache inside itself. "
                "Create a cache (attnax.init_kv_layer_cache or init_paged_kv_cache) and pass it "
                "as layer(x, kv_cache=cache), or run a whole loop with attnax.generate; "
                "leave decode=False.",
                self.decode,
            )
        return self

    @model_validator(mode="after")
    def _rope_needs_even_head_dim(self) -> Self:
        if self.use_rope and self.head_dim % 2 != 0:
            raise _field_error(
                "use_rope",
                "rope_needs_even_head_dim",
                "use_rope=True needs an even head_dim, got head_dim={head_dim} "
                "(qkv_features / num_heads); change qkv_features or num_heads, or turn RoPE off.",
                self.use_rope,
                head_dim=self.head_dim,
            )
        return self

    @model_validator(mode="after")
    def _lite_owns_its_attention(self) -> Self:
        if self.attention_type == AttentionType.LITE and self.attention_fn is not None:
            raise _field_error(
                "attention_fn",
                "lite_excludes_attention_fn",
                "attention_type='lite' creates its own gated attention and cannot use a custom "
                "attention_fn; drop attention_fn or choose another attention_type.",
                None,
            )
        return self

    @model_validator(mode="after")
    def _window_needs_scores(self) -> Self:
        if (
            self.attention_window is not None
            and self.attention_fn is None
            and not self.backend.pair_scores
        ):
            raise _field_error(
                "attention_window",
                "window_needs_softmax_backend",
                "attention_window needs a softmax backend; attention_type='{attention_type}' has "
                "no per-pair scores to window. Drop attention_window or use {softmax_backends}.",
                self.attention_window,
                attention_type=self.attention_type.value,
                softmax_backends=_softmax_backends_text(),
            )
        return self

    @model_validator(mode="after")
    def _score_mod_needs_scores(self) -> Self:
        refusal = None if self.attention_fn is not None else (
            self.backend.score_mod_refusal(self.score_mod)
        )
        if refusal is not None:
            raise _field_error("score_mod", "score_mod_needs_softmax_backend", refusal, None)
        return self

    # ------------------------------------------------------------------ JSON

    @field_serializer("attention_fn", "score_mod", when_used="json")
    def _callables_are_not_json(self, value: object) -> None:
        if value is not None:
            raise ValueError(
                "AttentionSpec holds a Python callable (attention_fn or score_mod), which JSON "
                "cannot represent; dump a spec without callables and set them in Python."
            )

    @property
    def uses_custom_attention(self) -> bool:
        """Whether ``attention_fn`` overrides ``attention_type``."""
        return self.attention_fn is not None
