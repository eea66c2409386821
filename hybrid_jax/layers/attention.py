"""Attention through one entry point over `jax.nn.dot_product_attention`.

Every attention in every model calls `dot_product_attention` below, so the backend
(XLA everywhere, cuDNN flash attention on NVIDIA GPUs) is chosen in one place.
Relative position terms enter as an additive `bias`; a boolean `mask` marks the
keys each query may attend to. The entry point also takes shapes that
`jax.nn.dot_product_attention` itself rejects: value heads wider or narrower than
the key heads (LeViT) are zero-padded to a common width, which leaves the result
unchanged because padded query/key columns add nothing to the logits and padded
value columns are sliced off.
"""

import logging
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.layers.mlp import DENSE_INIT

Dtype = Any
Implementation = Literal["xla", "cudnn", "auto"]

_log = logging.getLogger(__name__)
_logged_paths: set[tuple[str, str]] = set()

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
    seq_odd = q.shape[1] % 2 or k.shape[1] % 2
    if reason is None and has_bias_or_mask and seq_odd:
        # cuDNN's backward pass with a bias needs even sequence lengths.
        reason = f"cuDNN attention with a bias or mask needs even sequence lengths, got {q.shape[1]} and {k.shape[1]}"
    if reason:
        return "xla", f"auto fell back to XLA: {reason}"
    return "cudnn", "auto chose cuDNN flash attention"


def _pad_last(x: jax.Array, width: int) -> jax.Array:
    return x if x.shape[-1] == width else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


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
      [batch, q_len, heads, value_dim], in the dtype of `v`.
    """
    key_dim, value_dim = q.shape[-1], v.shape[-1]
    if k.shape[-1] != key_dim:
        raise ValueError(f"queries and keys need the same head dim, got {q.shape} and {k.shape}")
    backend, reason = attention_path(q, k, v, has_bias_or_mask=bias is not None or mask is not None,
                                     implementation=implementation)
    if (backend, reason) not in _logged_paths:
        _logged_paths.add((backend, reason))
        _log.info("attention q%s k%s v%s -> %s (%s)", q.shape, k.shape, v.shape, backend, reason)
    width = max(key_dim, value_dim)
    q, k, v = _pad_last(q, width), _pad_last(k, width), _pad_last(v, width)
    q, k = q.astype(v.dtype), k.astype(v.dtype)
    if bias is not None:
        bias = jnp.broadcast_to(bias, (1,) * (4 - bias.ndim) + bias.shape).astype(v.dtype)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (1,) * (4 - mask.ndim) + mask.shape).astype(bool)
    out = jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=scale if scale is not None else key_dim ** -0.5,
        implementation=backend)
    return out[..., :value_dim]


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
        dense = lambda features, axes, name, use_bias=True: nn.Dense(
            features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            kernel_init=nn.with_logical_partitioning(DENSE_INIT, axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))
        # Heads are flattened into one dense width (as PyTorch's Linear), split after.
        split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, head_dim)
        project = lambda name, t: split(dense(self.num_heads * head_dim, ("embed", "heads"), name, self.qkv_bias)(t))
        q, k, v = project("query", x), project("key", context), project("value", context)
        out = dot_product_attention(q, k, v, bias, mask, implementation=self.implementation)
        out = dense(self.out_features or x.shape[-1], ("heads", "embed"), "out")(out.reshape(*out.shape[:-2], -1))
        return nn.Dropout(self.proj_drop)(out, deterministic=not train)
