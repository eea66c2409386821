"""Normalisation layers with logical axis names on their parameters."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from hybrid_jax.layers.axes import with_logical_partitioning

Dtype = Any


def layer_norm(epsilon: float = 1e-6, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over the channel axis; its scale and bias shard like `embed`."""
    return nn.LayerNorm(
        epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def norm_2d(kind: str, *, train: bool, zero_init: bool = False, epsilon: float = 1e-5, num_groups: int = 32,
            dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Module:
    """Norm for NHWC feature maps: kind is batch | group | layer.

    `zero_init` starts the scale at zero, so a residual branch ending in this norm
    begins as the identity (timm's zero_init_last).
    """
    scale = nn.initializers.zeros if zero_init else nn.initializers.ones
    kwargs = dict(
        epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=with_logical_partitioning(scale, ("conv_out",)),
        bias_init=with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))
    if kind == "batch":
        # Flax momentum 0.9 is PyTorch's momentum 0.1.
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, **kwargs)
    if kind == "group":
        return nn.GroupNorm(num_groups=num_groups, **kwargs)
    if kind == "layer":
        return nn.LayerNorm(**kwargs)
    raise ValueError(f"unknown norm {kind!r}; choose batch, group or layer")
