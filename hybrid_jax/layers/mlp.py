"""Dense blocks: the transformer feed-forward MLP and the classifier head."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.layers.act import get_act
from hybrid_jax.layers.axes import with_logical_partitioning
from hybrid_jax.layers.dense import Dense

Dtype = Any

DENSE_INIT = nn.initializers.xavier_uniform()
HEAD_INIT = nn.initializers.truncated_normal(0.02)


class Mlp(nn.Module):
    """Two dense layers with an activation between: fc1 -> act -> drop -> fc2 -> drop."""

    hidden_features: int
    out_features: int | None = None
    act: str = "gelu"
    dropout: float = 0.0
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        out_features = self.out_features or x.shape[-1]
        dense = lambda features, axes, name: Dense(
            features, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            kernel_init=with_logical_partitioning(DENSE_INIT, axes),
            bias_init=with_logical_partitioning(nn.initializers.zeros, axes[-1:]))
        x = dense(self.hidden_features, ("embed", "mlp"), "fc1")(x)
        x = get_act(self.act)(x)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = dense(out_features, ("mlp", "embed"), "fc2")(x)
        return nn.Dropout(self.dropout)(x, deterministic=not train)


def classifier_head(num_classes: int, **kw: Any) -> Dense:
    """The final linear classifier, its weight sharded over ("embed", "classes")."""
    return Dense(num_classes, kernel_init=with_logical_partitioning(HEAD_INIT, ("embed", "classes")),
                 bias_init=with_logical_partitioning(nn.initializers.zeros, ("classes",)), **kw)


def classifier(num_classes: int, drop_rate: float, **kw: Any) -> tuple[nn.Dropout, Dense | None]:
    """A model's `head_drop` and `head`: dropout on the pooled features, then `classifier_head` (None: no classes)."""
    return nn.Dropout(drop_rate), classifier_head(num_classes, **kw) if num_classes else None
