"""Attention through one entry point over `jax.nn.dot_product_attention`.

Every attention in every model calls `dot_product_attention` below, so the backend
(XLA everywhere, cuDNN flash attention on NVIDIA GPUs) is chosen in one place.
Relative position terms enter as an additive `bias`; a boolean `mask` marks the
keys each query may attend to.

The XLA backend is `xla_attention`: `jax.nn.dot_product_attention`'s XLA computation
(float32 logits and softmax, the same large negative for masked logits) with the heads
moved in front of the tokens first, so both products are batched over leading axes.
`jax.nn.dot_product_attention` contracts the token-major layout directly, and XLA:CPU
then transposes the logits' gradients inside the backward pass: the heads-major form
trains LeViT's attention 1.4x faster on 2 CPU cores. It also takes value heads wider or
narrower than the key heads (LeViT) as they are. The cuDNN backend is
`jax.nn.dot_product_attention` itself: there such heads are zero-padded to a common width,
which leaves the result unchanged because padded query/key columns add nothing to the
logits and padded value columns are sliced off, and odd sequence lengths (ViT's 197 tokens),
which its training kernels refuse, are padded by one position that the sequence-length
arguments hide.

For interpretability (attention rollout, attention maps) the entry point also
records the attention probabilities, but only when asked: applying a model with
the `ATTENTION_WEIGHTS` collection mutable,
`model.apply(variables, x, train=False, mutable=[ATTENTION_WEIGHTS])`, sows
`attention_weights(q, k, bias, mask)` into the calling module under
"weights". Otherwise nothing beyond the attention itself is traced or computed.
"""

import logging
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.layers.axes import with_logical_partitioning
from hybrid_jax.layers.broadcast import add_shared
from hybrid_jax.layers.dense import Dense
from hybrid_jax.layers.mlp import DENSE_INIT

Dtype = Any
Implementation = Literal["xla", "cudnn", "auto"]

# The collection the attention probabilities are sown into when a caller makes it mutable.
ATTENTION_WEIGHTS = "attention_weights"

_log = logging.getLogger(__name__)
_logged_paths: set[tuple[str, str]] = set()

_HALF_TO_FLOAT32_PRODUCTS = {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
                             jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}

# cuDNN flash attention limits (jax.nn.dot_product_attention's own checks).
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 128
_CUDNN_MAX_HEAD_DIM_HOPPER = 256


def _on_cuda() -> bool:
    if jax.default_backend() != "gpu":
        return False
    return "cuda" in getattr(jax.devices()[0].client, "platform_version", "").lower()


def _cudnn_max_head_dim() -> int:
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    major = int(str(capability).split(".")[0])
    return _CUDNN_MAX_HEAD_DIM_HOPPER if major >= 9 else _CUDNN_MAX_HEAD_DIM


def _cudnn_unsupported(q: jax.Array, head_dim: int) -> str | None:
    """Why cuDNN flash attention cannot take these arguments, or None if it can."""
    if not _on_cuda():
        return f"cuDNN attention needs an NVIDIA GPU, and this process runs on {jax.default_backend()}"
    if q.dtype not in _CUDNN_DTYPES:
        return f"cuDNN attention needs bfloat16 or float16 inputs, got {q.dtype}"
    max_dim = _cudnn_max_head_dim()
    if head_dim % 8 or head_dim > max_dim:
        return f"cuDNN attention needs a head dim that is a multiple of 8 and <= {max_dim}, got {head_dim}"
    return None


def attention_path(q: jax.Array, k: jax.Array, v: jax.Array, *, has_bias_or_mask: bool = False,
                   implementation: Implementation = "auto") -> tuple[str, str]:
    """Which backend `dot_product_attention` uses for these arguments, and why.

    Returns:
      (backend, reason): backend is "xla" or "cudnn".
    """
    head_dim = max(q.shape[-1], v.shape[-1])
    if implementation == "xla":
        return "xla", "asked for xla"
    reason = _cudnn_unsupported(q, head_dim)
    if implementation == "cudnn":
        if reason:
            raise ValueError(f"implementation='cudnn' cannot run here: {reason}. "
                             "Use implementation='auto' to fall back to XLA, or 'xla'.")
        return "cudnn", "asked for cudnn"
    if implementation != "auto":
        raise ValueError(f"unknown attention implementation {implementation!r}; choose xla, cudnn or auto")
    if reason:
        return "xla", f"auto fell back to XLA: {reason}"
    return "cudnn", "auto chose cuDNN flash attention"


def _pad_last(x: jax.Array, width: int) -> jax.Array:
    return x if x.shape[-1] == width else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


def _broadcast_4d(t: jax.Array) -> jax.Array:
    return jnp.broadcast_to(t, (1,) * (4 - t.ndim) + t.shape)


def _pad_to(x: jax.Array | None, axis: int, size: int, value: Any = 0) -> jax.Array | None:
    """`x` padded with `value` to `size` along `axis`; a broadcast axis (length 1) stays as it is."""
    if x is None or x.shape[axis] in (1, size):
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _even_lengths_for_cudnn(q, k, v, bias, mask) -> tuple[tuple, dict[str, jax.Array]]:
    """q, k, v, bias, mask with odd sequence lengths padded by one position, and the lengths that hide it.

    cuDNN's training kernels take even sequence lengths only (JAX 0.11 applies its with-bias rule to
    every call: ViT's 197 tokens were refused on an H200). The padded key is kept out of every softmax
    by `key_value_seq_lengths` rather than by a mask, so no bias tensor is added; the padded query's
    output is sliced off by the caller.
    """
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    q_even, kv_even = q_len + q_len % 2, kv_len + kv_len % 2
    q = _pad_to(q, 1, q_even)
    k, v = _pad_to(k, 1, kv_even), _pad_to(v, 1, kv_even)
    bias = _pad_to(_pad_to(bias, 2, q_even), 3, kv_even)
    mask = _pad_to(_pad_to(mask, 2, q_even, True), 3, kv_even, True)
    lengths = {"query_seq_lengths": jnp.full((batch,), q_len, jnp.int32),
               "key_value_seq_lengths": jnp.full((batch,), kv_len, jnp.int32)}
    return (q, k, v, bias, mask), lengths


def attention_weights(q: jax.Array, k: jax.Array, bias: jax.Array | None = None, mask: jax.Array | None = None, *,
                      scale: float | None = None) -> jax.Array:
    """The probabilities `dot_product_attention` mixes the values with, in float32.

    softmax(q k^T * scale + bias) over the keys, zero where `mask` is False; arguments
    as for `dot_product_attention`. An interpretability path (attention maps, rollout):
    models never call it to attend.

    Returns:
      [batch, heads, q_len, kv_len]; each row sums to 1 (0 for a fully masked query).
    """
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if bias is not None:
        logits = logits + _broadcast_4d(bias).astype(jnp.float32)
    where = None if mask is None else jnp.broadcast_to(_broadcast_4d(mask).astype(bool), logits.shape)
    return jax.nn.softmax(logits, axis=-1, where=where)


def _calling_module() -> nn.Module | None:
    # The innermost Flax module whose method is running: how flax's own functional helpers
    # (flax.linen.partitioning) reach the calling module; None outside init / apply.
    stack = getattr(getattr(nn.module, "_context", None), "module_stack", None)
    return stack[-1] if stack else None


def _sow_weights_if_asked(q, k, bias, mask, scale) -> None:
    """Sows `attention_weights` into the calling module when its apply made ATTENTION_WEIGHTS mutable."""
    module = _calling_module()
    # init makes every collection mutable; the probabilities are only wanted from apply.
    if (module is None or module.scope is None or not module.is_mutable_collection(ATTENTION_WEIGHTS)
            or module.is_initializing()):
        return
    module.sow(ATTENTION_WEIGHTS, "weights", attention_weights(q, k, bias, mask, scale=scale))


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, mask: jax.Array | None,
                  scale: float) -> jax.Array:
    """The XLA backend of `dot_product_attention`, computed heads-major; 4-d bias and mask, any value dim."""
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # [batch, heads, tokens, dim]
    # Half-precision inputs, float32 logits: the algorithm keeps the backward's products in the inputs' precision
    # too (the float32 logits' gradient times a half-precision operand), as jax.nn.dot_product_attention does.
    algorithm = _HALF_TO_FLOAT32_PRODUCTS.get(jnp.dtype(q.dtype))
    logits = jnp.einsum("bnth,bnsh->bnts", q, k, precision=algorithm, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = add_shared(logits, bias.astype(jnp.float32))
    if mask is not None:
        logits = jnp.where(mask, logits, 0.7 * jnp.finfo(jnp.float32).min)  # as jax.nn.dot_product_attention
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.swapaxes(jnp.einsum("bnts,bnsh->bnth", probs, v), 1, 2)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None,
                          mask: jax.Array | None = None, *, scale: float | None = None,
                          implementation: Implementation = "auto") -> jax.Array:
    """softmax(q k^T * scale + bias, masked) v, per head.

    Args:
      q: queries [batch, q_len, heads, key_dim].
      k: keys [batch, kv_len, heads, key_dim].
      v: values [batch, kv_len, heads, value_dim]; value_dim may differ from key_dim.
      bias: additive logits bias broadcastable to [batch, heads, q_len, kv_len]
        (2-D or 3-D biases are broadcast from the right).
      mask: boolean, broadcastable like `bias`; True where a query may attend a key.
      scale: logits scale; defaults to 1 / sqrt(key_dim).
      implementation: "xla", "cudnn" (raises where cuDNN cannot run), or "auto"
        (cuDNN flash attention on an NVIDIA GPU when dtype and shape allow, XLA otherwise).

    Returns:
      [batch, q_len, heads, value_dim], in the dtype of `v`. Inside a Flax apply with
      the `ATTENTION_WEIGHTS` collection mutable, the probabilities are also sown into
      the calling module (`attention_weights`); otherwise nothing else is computed.
    """
    key_dim, value_dim = q.shape[-1], v.shape[-1]
    if k.shape[-1] != key_dim:
        raise ValueError(f"queries and keys need the same head dim, got {q.shape} and {k.shape}")
    _sow_weights_if_asked(q, k, bias, mask, scale)
    backend, reason = attention_path(q, k, v, has_bias_or_mask=bias is not None or mask is not None,
                                     implementation=implementation)
    if (backend, reason) not in _logged_paths:
        _logged_paths.add((backend, reason))
        _log.info("attention q%s k%s v%s -> %s (%s)", q.shape, k.shape, v.shape, backend, reason)
    q, k = q.astype(v.dtype), k.astype(v.dtype)
    if bias is not None:
        bias = _broadcast_4d(bias).astype(v.dtype)
    if mask is not None:
        mask = _broadcast_4d(mask).astype(bool)
    scale = scale if scale is not None else key_dim ** -0.5
    if backend == "xla":
        return xla_attention(q, k, v, bias, mask, scale)
    width = max(key_dim, value_dim)
    q, k, v = _pad_last(q, width), _pad_last(k, width), _pad_last(v, width)
    q_len, lengths = q.shape[1], {}
    if q_len % 2 or k.shape[1] % 2:
        (q, k, v, bias, mask), lengths = _even_lengths_for_cudnn(q, k, v, bias, mask)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="cudnn",
                                       **lengths)
    return out[:, :q_len, :, :value_dim]


class MultiHeadAttention(nn.Module):
    """Multi-head attention: self-attention on `x`, or cross-attention from `x` to `context`."""

    num_heads: int
    head_dim: int | None = None  # default: input width // num_heads
    out_features: int | None = None  # default: input width
    qkv_bias: bool = True
    proj_drop: float = 0.0
    implementation: str = "auto"  # xla | cudnn | auto
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, bias: jax.Array | None = None,
                 mask: jax.Array | None = None, train: bool = False) -> jax.Array:
        context = x if context is None else context
        head_dim = self.head_dim or x.shape[-1] // self.num_heads
        dense = lambda features, axes, name, use_bias=True: Dense(
            features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            kernel_init=with_logical_partitioning(DENSE_INIT, axes),
            bias_init=with_logical_partitioning(nn.initializers.zeros, axes[-1:]))
        # Heads are flattened into one dense width (as PyTorch's Linear), split after.
        split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, head_dim)
        project = lambda name, t: split(dense(self.num_heads * head_dim, ("embed", "heads"), name, self.qkv_bias)(t))
        q, k, v = project("query", x), project("key", context), project("value", context)
        out = dot_product_attention(q, k, v, bias, mask, implementation=self.implementation)
        out = dense(self.out_features or x.shape[-1], ("heads", "embed"), "out")(out.reshape(*out.shape[:-2], -1))
        return nn.Dropout(self.proj_drop)(out, deterministic=not train)
