"""Convolutional building blocks: conv + norm + act, residual bottlenecks, inverted residuals.

Feature maps are NHWC. Padding defaults to PyTorch's symmetric `k // 2` rule (so
converted timm weights give the same logits); "SAME" is TensorFlow's asymmetric
padding, which the ViT hybrids and MaxViT were trained with.

On CPU a grouped convolution (depthwise ones included) is computed as a sum over its taps
of shifted copies of its input, scaled per channel or multiplied per group: XLA:CPU's
grouped convolution (its own or YNNPACK's) is 20-60x slower forward and 10-90x slower in
the gradient; with it CoAtNet, EdgeNeXt, MobileViT and Mobile-Former infer 2-6x faster on
CPU. GPU and TPU keep the convolution.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.layers.act import get_act
from hybrid_jax.layers.axes import MAP, with_logical_partitioning
from hybrid_jax.layers.dense import flat_dot_general
from hybrid_jax.layers.drop import DropPath
from hybrid_jax.layers.norm import norm_2d
from hybrid_jax.layers.remat import checkpointed

Dtype = Any
Padding = str | int | None

# He init over fan-out, as torchvision and timm initialise convolutions.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_padding(kernel_size: int, strides: int = 1, dilation: int = 1) -> int:
    """Symmetric padding that PyTorch models use for a kernel, stride and dilation."""
    return ((strides - 1) + dilation * (kernel_size - 1)) // 2


def _resolve_padding(padding: Padding, kernel_size: int, strides: int,
                     dilation: int) -> str | tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        return padding.upper()
    pad = torch_padding(kernel_size, strides, dilation) if padding is None else padding
    return ((pad, pad), (pad, pad))


def max_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 stride-2 max pool with one pixel of -inf padding, as PyTorch's MaxPool2d(3, 2, 1) (ResNet's stem)."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _window(x: jax.Array, top: int, left: int, out_hw: tuple[int, int], strides: int) -> jax.Array:
    """The strided slice of padded input that one tap of a convolution sees, [B, *out_hw, C]."""
    batch, _, _, channels = x.shape
    limit = (batch, top + (out_hw[0] - 1) * strides + 1, left + (out_hw[1] - 1) * strides + 1, channels)
    return jax.lax.slice(x, (0, top, left, 0), limit, (1, strides, strides, 1))


def _depthwise_taps(x: jax.Array, kernel: jax.Array, strides: int, dilation: int) -> jax.Array:
    """A depthwise convolution of padded x (VALID) as a sum of its taps' slices scaled per channel, in x's dtype."""
    k, span = kernel.shape[0], dilation * (kernel.shape[0] - 1) + 1
    out_hw = tuple((size - span) // strides + 1 for size in x.shape[1:3])
    out = 0
    for i in range(k):
        for j in range(k):
            out = out + _window(x, i * dilation, j * dilation, out_hw, strides) * kernel[i, j, 0]
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x: jax.Array, kernel: jax.Array, strides: int, dilation: int) -> jax.Array:
    return _depthwise_taps(x, kernel, strides, dilation)


def _depthwise_forward(x, kernel, strides, dilation):
    return _depthwise_taps(x, kernel, strides, dilation), (x, kernel)


def _depthwise_backward(strides, dilation, residuals, grad):
    """The input's gradient as one more depthwise convolution (of the gradient, strides spread out, with the
    kernel flipped), rather than autodiff's zero-padded copy of the gradient per tap; the kernel's per tap."""
    x, kernel = residuals
    k, span = kernel.shape[0], dilation * (kernel.shape[0] - 1) + 1
    out_hw = grad.shape[1:3]
    grad_kernel = jnp.stack([
        jnp.stack([jnp.sum(_window(x, i * dilation, j * dilation, out_hw, strides) * grad, axis=(0, 1, 2))
                   for j in range(k)]) for i in range(k)])[:, :, None, :]
    # Rows and columns of x past the last window get no gradient: `extra` pads them with zeros.
    extra = [size - ((out - 1) * strides + span) for size, out in zip(x.shape[1:3], out_hw)]
    spread = jax.lax.pad(grad, jnp.zeros((), grad.dtype),
                         ((0, 0, 0), (span - 1, span - 1 + extra[0], strides - 1),
                          (span - 1, span - 1 + extra[1], strides - 1), (0, 0, 0)))
    grad_x = _depthwise_taps(spread, kernel[::-1, ::-1], 1, dilation)
    return grad_x.astype(x.dtype), grad_kernel.astype(kernel.dtype)


_depthwise.defvjp(_depthwise_forward, _depthwise_backward)


@functools.partial(jax.jit, static_argnames=("strides", "padding", "dilation", "groups"))
def grouped_conv_by_shifts(x: jax.Array, kernel: jax.Array, strides: int,
                           padding: str | tuple[tuple[int, int], ...], dilation: int = 1,
                           groups: int = 1) -> jax.Array:
    """A grouped convolution (kernel HWIO, I = C / groups) as a sum over its k*k taps of strided slices.

    The same function as `conv_general_dilated(..., feature_group_count=groups)`. A depthwise
    kernel (one input and one output channel per group) scales each slice per channel, which
    XLA fuses into one elementwise loop, and its input gradient is computed the same way
    (`_depthwise_backward`); any other grouping multiplies each slice by the tap's
    block-diagonal weights, one small matrix product per group. On CPU both are far faster than
    XLA's grouped convolution, whose gradient is 20-90x slower still. Sums in float32 at least,
    as a convolution accumulates. Jitted so that traces show it by name, which is how
    `analysis.flops.count_macs` counts it as the one convolution it is.
    """
    k = kernel.shape[0]
    span = dilation * (k - 1) + 1
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:3], (span, span), (strides, strides), padding)
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    accumulate = jnp.promote_types(x.dtype, jnp.float32)
    in_per_group, features = kernel.shape[2:]
    out_per_group = features // groups
    if in_per_group == out_per_group == 1:
        return _depthwise(x.astype(accumulate), kernel.astype(accumulate), strides, dilation).astype(x.dtype)
    batch, height, width, _ = x.shape
    out_hw = (height - span) // strides + 1, (width - span) // strides + 1
    out = jnp.zeros((batch, *out_hw, features), accumulate)
    for i in range(k):
        for j in range(k):
            window = _window(x, i * dilation, j * dilation, out_hw, strides).astype(accumulate)
            blocks = kernel[i, j].astype(accumulate).reshape(in_per_group, groups, out_per_group)
            window = window.reshape(batch, *out_hw, groups, in_per_group)
            out = out + jnp.einsum("bhwgi,igo->bhwgo", window, blocks).reshape(out.shape)
    return out.astype(x.dtype)


def pointwise_conv(x: jax.Array, kernel: jax.Array, strides: int = 1) -> jax.Array:
    """An unpadded 1x1 convolution (kernel [1, 1, in, out]) as the matrix product over pixels that it is.

    Why: XLA computes a convolution's weight gradient as another convolution over the batch, for
    which XLA:CPU writes the input and the output gradient out transposed, recomputing the fusions
    that produce them: a ResNet stage's GroupNorm backward, in ViT-R50, cost 100-140 ms per such
    copy at batch 8. A matrix product's weight gradient reads both as they are (`flat_dot_general`).
    """
    x = x[:, ::strides, ::strides] if strides > 1 else x
    return flat_dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))


class Conv2d(nn.Module):
    """2-D convolution with logical axes and optional weight standardisation (BiT's StdConv)."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: Padding = None  # None: PyTorch symmetric; "SAME": TensorFlow; int: explicit
    groups: int = 1
    dilation: int = 1
    use_bias: bool = False
    weight_standardize: bool = False
    standardize_eps: float = 1e-8
    kernel_init: Callable = CONV_INIT
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel", with_logical_partitioning(self.kernel_init, (None, None, "conv_in", "conv_out")),
            (k, k, x.shape[-1] // self.groups, self.features), self.param_dtype)
        if self.weight_standardize:
            mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
            var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
            kernel = (kernel - mean) * jax.lax.rsqrt(var + self.standardize_eps)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        padding = _resolve_padding(self.padding, k, self.strides, self.dilation)
        if k == 1 and self.groups == 1 and padding in ("SAME", "VALID", ((0, 0), (0, 0))):
            y = pointwise_conv(x, kernel, self.strides)
        elif self.groups > 1 and jax.default_backend() == "cpu":
            y = grouped_conv_by_shifts(x, kernel, self.strides, padding, self.dilation, self.groups)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, (self.strides, self.strides), padding, rhs_dilation=(self.dilation, self.dilation),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)
        if self.use_bias:
            bias = self.param("bias", with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class ConvNormAct(nn.Module):
    """Conv2d, then a norm, then an activation: the unit every CNN here is made of."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: Padding = None
    groups: int = 1
    dilation: int = 1
    use_bias: bool = False
    norm: str = "batch"  # batch | group | layer | none
    act: str = "relu"
    zero_init_norm: bool = False
    weight_standardize: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = Conv2d(self.features, self.kernel_size, self.strides, self.padding, self.groups, self.dilation,
                   self.use_bias, self.weight_standardize, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="conv")(x)
        if self.norm != "none":
            x = norm_2d(self.norm, train=train, zero_init=self.zero_init_norm, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="norm")(x)
        return get_act(self.act)(x)


class SqueezeExcite(nn.Module):
    """Channel attention from globally pooled features (Hu et al. 2018)."""

    reduced_features: int
    act: str = "relu"
    gate: str = "sigmoid"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda features, name: Conv2d(features, 1, use_bias=True, dtype=self.dtype,
                                             param_dtype=self.param_dtype, name=name)
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = get_act(self.act)(conv(self.reduced_features, "conv_reduce")(s))
        s = get_act(self.gate)(conv(x.shape[-1], "conv_expand")(s))
        return x * s


class _ResidualBlock(nn.Module):
    """Shared fields of the ResNet blocks."""

    features: int
    strides: int = 1
    norm: str = "batch"
    act: str = "relu"
    padding: Padding = None
    weight_standardize: bool = False
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def conv(self, features: int, kernel_size: int, strides: int = 1, *, act: str | None = None,
             zero_init_norm: bool = False, name: str) -> ConvNormAct:
        return ConvNormAct(features, kernel_size, strides, self.padding, norm=self.norm,
                           act=self.act if act is None else act, zero_init_norm=zero_init_norm,
                           weight_standardize=self.weight_standardize, dtype=self.dtype,
                           param_dtype=self.param_dtype, name=name)

    def shortcut(self, x: jax.Array, out_features: int, *, train: bool) -> jax.Array:
        if self.strides == 1 and x.shape[-1] == out_features:
            return x
        return self.conv(out_features, 1, self.strides, act="identity", name="downsample")(x, train=train)

    def merge(self, branch: jax.Array, shortcut: jax.Array, *, train: bool) -> jax.Array:
        branch = DropPath(self.drop_path)(branch, train=train)
        return get_act(self.act)(branch + shortcut)


class BasicBlock(_ResidualBlock):
    """ResNet-18/34 block: two 3x3 convs and a residual."""

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        shortcut = self.shortcut(x, self.features, train=train)
        y = self.conv(self.features, 3, self.strides, name="conv1")(x, train=train)
        y = self.conv(self.features, 3, act="identity", zero_init_norm=True, name="conv2")(y, train=train)
        return self.merge(y, shortcut, train=train)


class Bottleneck(_ResidualBlock):
    """ResNet-50+ block: 1x1 reduce, 3x3 (strided, as ResNet v1.5), 1x1 expand by 4, residual."""

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        out_features = self.features * self.expansion
        shortcut = self.shortcut(x, out_features, train=train)
        y = self.conv(self.features, 1, name="conv1")(x, train=train)
        y = self.conv(self.features, 3, self.strides, name="conv2")(y, train=train)
        y = self.conv(out_features, 1, act="identity", zero_init_norm=True, name="conv3")(y, train=train)
        return self.merge(y, shortcut, train=train)


RESIDUAL_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNetStage(nn.Module):
    """A stack of residual blocks; the first one changes stride and width."""

    block: str  # basic | bottleneck
    depth: int
    features: int
    strides: int = 1
    drop_path_rates: Sequence[float] = ()  # one per block; empty means none
    norm: str = "batch"
    padding: Padding = None
    weight_standardize: bool = False
    remat: str = "none"  # layers/remat.py
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        block_cls = checkpointed(RESIDUAL_BLOCKS[self.block], self.remat)
        rates = self.drop_path_rates or (0.0,) * self.depth
        for i in range(self.depth):
            x = block_cls(self.features, self.strides if i == 0 else 1, self.norm, padding=self.padding,
                          weight_standardize=self.weight_standardize, drop_path=rates[i], dtype=self.dtype,
                          param_dtype=self.param_dtype, name=f"blocks_{i}")(x, train=train)
        return nn.with_logical_constraint(x, MAP)


class InvertedResidual(nn.Module):
    """MobileNetV2 / EfficientNet MBConv: 1x1 expand, depthwise kxk, optional SE, 1x1 project."""

    features: int
    expand_ratio: float = 4.0
    kernel_size: int = 3
    strides: int = 1
    se_ratio: float = 0.0  # of the input width; 0 disables squeeze-excite
    act: str = "relu6"
    norm: str = "batch"
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        in_features = x.shape[-1]
        hidden = int(round(in_features * self.expand_ratio))
        conv = lambda features, kernel_size, name, **kw: ConvNormAct(
            features, kernel_size, norm=self.norm, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw)
        y = x
        if hidden != in_features:
            y = conv(hidden, 1, "conv_pw", act=self.act)(y, train=train)
        y = conv(hidden, self.kernel_size, "conv_dw", strides=self.strides, groups=hidden, act=self.act)(y, train=train)
        if self.se_ratio > 0:
            y = SqueezeExcite(max(1, int(in_features * self.se_ratio)), act=self.act, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="se")(y)
        y = conv(self.features, 1, "conv_pwl", act="identity")(y, train=train)
        if self.strides == 1 and in_features == self.features:
            y = DropPath(self.drop_path)(y, train=train) + x
        return y
