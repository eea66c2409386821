"""ConViT (d'Ascoli et al., ICML 2021, arXiv 2103.10697): a ViT with a soft convolutional inductive bias.

The first `local_up_to_layer` (10 of 12) blocks replace self-attention with *gated
positional self-attention* (GPSA). Each head mixes two attention distributions with
a learned gate g = sigmoid(gating_param):

    attn = (1 - g) * softmax(q k^T / sqrt(d))  +  g * softmax(pos_proj(r_ij))

where r_ij = (dx, dy, dx^2 + dy^2) is the offset from query patch i to key patch j.
`pos_proj` is initialised so that each head attends to one neighbour of a
sqrt(heads) x sqrt(heads) patch kernel (`locality_strength` sets how sharply): at
initialisation a GPSA layer behaves like a convolution, and each head may learn to
escape locality by lowering its gate. The remaining blocks are ordinary multi-head
self-attention; the class token joins only there, after the local layers (it has no
position in the grid GPSA reasons about).

Why "serial" and not "vit": the convolutional bias lives in the early blocks and
plain global attention in the late ones, so a ConViT is a soft convolutional
front end followed by a transformer — the same conv-then-attention order as the
serial hybrids, with the convolution expressed as (escapable) attention rather than
as hard-wired kernels.

How GPSA meets the shared attention entry point: the content distribution is a
plain softmax(q k^T) and goes through `dot_product_attention`, which returns its
product with V, not the map. The gated mix is linear, so mixing the two *outputs*,
(1 - g) softmax(qk) V + g softmax(pos) V, equals applying the mixed map to V (timm
then divides the mixed map by its row sums, which are 1 up to rounding). The
positional distribution has no queries or keys: it is a fixed [heads, N, N] map per
input size, shared by the whole batch, applied to V with one einsum. Routing it
through the entry point would need dummy zero queries/keys that the entry point pads
to the value width (N^2 * C wasted MACs per layer). The price of output mixing is one
extra N^2 * C product per GPSA layer compared with timm's single (mixed map) x V
(see the registry sources); the gain is that the content attention can use cuDNN's
fused kernel and no per-example [heads, N, N] map is materialised. ConViT's
attention dropout (on the mixed map, 0 in every published config) is not modelled.

Layout and names follow timm's `convit_*` (the official facebookresearch/convit
weights), whose `embed_dim` is per head (48); ours is the full width. Position
embeddings cover the patch grid only (no class-token slot) and are resampled for
other input sizes; GPSA's offsets are computed for the actual grid.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.layers.attention import MultiHeadAttention, dot_product_attention
from hybrid_jax.layers.axes import TOKENS, with_logical_partitioning
from hybrid_jax.layers.broadcast import add_shared
from hybrid_jax.layers.dense import Dense
from hybrid_jax.layers.drop import DropPath, drop_path_schedule
from hybrid_jax.layers.features import FeatureInfo
from hybrid_jax.layers.mlp import DENSE_INIT, Mlp, classifier
from hybrid_jax.layers.model import ImageClassifier
from hybrid_jax.layers.norm import layer_norm
from hybrid_jax.layers.patch import PatchEmbed, grid_to_tokens, prepend_tokens, resample_pos_embed
from hybrid_jax.layers.remat import checkpointed
from hybrid_jax.layers.scan import block_sequence, run_sequence
from hybrid_jax.registry import PaperFigures, register_model, register_variants

Dtype = Any


def relative_offsets(height: int, width: int) -> np.ndarray:
    """(dx, dy, dx^2 + dy^2) from every query patch to every key patch of a row-major grid: float32 [N, N, 3]."""
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dx = xs[None, :] - xs[:, None]
    dy = ys[None, :] - ys[:, None]
    return np.stack([dx, dy, dx ** 2 + dy ** 2], axis=-1).astype(np.float32)


def local_pos_proj_init(num_heads: int, locality_strength: float):
    """pos_proj kernel [3, heads]: head h = h1 + k * h2 of a k x k kernel (k = floor(sqrt(heads))) prefers offset
    (h2 - c, h1 - c), as timm's `GPSA.local_init`; heads beyond k^2 keep a small random init. All scaled by
    `locality_strength`."""
    kernel_size = int(num_heads ** 0.5)
    center = (kernel_size - 1) / 2 if kernel_size % 2 == 0 else kernel_size // 2

    pattern, local = np.zeros((3, num_heads), np.float32), np.zeros((1, num_heads), bool)
    for h1 in range(kernel_size):
        for h2 in range(kernel_size):
            head = h1 + kernel_size * h2
            # logits = 2 (h2 - c) dx + 2 (h1 - c) dy - (dx^2 + dy^2): a peak at (dx, dy) = (h2 - c, h1 - c).
            pattern[:, head] = (2 * (h2 - center), 2 * (h1 - center), -1.0)
            local[0, head] = True

    def init(key, shape, dtype=jnp.float32):
        kernel = jnp.where(local, pattern, nn.initializers.truncated_normal(0.02)(key, shape, jnp.float32))
        return (kernel * locality_strength).astype(dtype)

    return init


def _identity_init(key, shape, dtype=jnp.float32):
    """GPSA's value projection starts as the identity (timm's local_init), so a head copies its attended patch."""
    del key
    return jnp.eye(*shape, dtype=dtype)


class GPSA(nn.Module):
    """Gated positional self-attention over a patch grid (no class token)."""

    num_heads: int
    qkv_bias: bool = False
    locality_strength: float = 1.0
    proj_drop: float = 0.0
    attn_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, grid: tuple[int, int], *, train: bool) -> jax.Array:
        """x: [B, h*w, C] patch tokens of an h x w `grid`."""
        batch, length, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        dense = lambda features, axes, name, use_bias, init=DENSE_INIT: Dense(
            features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            kernel_init=with_logical_partitioning(init, axes),
            bias_init=with_logical_partitioning(nn.initializers.zeros, axes[-1:]))
        qk = dense(2 * dim, ("embed", "heads"), "qk", self.qkv_bias)(x).reshape(batch, length, 2, heads, head_dim)
        v = dense(dim, ("embed", "heads"), "v", self.qkv_bias, _identity_init)(x).reshape(batch, length, heads,
                                                                                         head_dim)
        content = dot_product_attention(qk[:, :, 0], qk[:, :, 1], v, implementation=self.attn_impl)

        # Positional attention: a softmax over fixed offsets, the same for every example.
        pos_logits = dense(heads, (None, "heads"), "pos_proj", True,
                           local_pos_proj_init(heads, self.locality_strength))(jnp.asarray(relative_offsets(*grid)))
        pos_attn = jax.nn.softmax(pos_logits.astype(jnp.float32), axis=1).astype(v.dtype)  # [N query, N key, heads]
        positional = jnp.einsum("nmh,bmhd->bnhd", pos_attn, v)

        gating = self.param("gating_param", with_logical_partitioning(nn.initializers.ones, ("heads",)),
                            (heads,), self.param_dtype)
        gate = jax.nn.sigmoid(gating.astype(jnp.float32)).astype(v.dtype)[:, None]
        out = (1 - gate) * content.astype(v.dtype) + gate * positional
        out = dense(dim, ("heads", "embed"), "proj", True)(out.reshape(batch, length, dim))
        return nn.Dropout(self.proj_drop)(out, deterministic=not train)


class ConvitBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), x + mlp(norm(x)); attn is GPSA or multi-head self-attention."""

    num_heads: int
    use_gpsa: bool
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    locality_strength: float = 1.0
    drop_rate: float = 0.0
    drop_path: float = 0.0
    attn_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, grid: tuple[int, int], *, train: bool,
                 drop_path: jax.Array | None = None) -> jax.Array:
        """`drop_path` overrides the field (a scanned stack passes each block's rate)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = layer_norm(name="norm1", **kw)(x)
        if self.use_gpsa:
            y = GPSA(self.num_heads, self.qkv_bias, self.locality_strength, self.drop_rate, self.attn_impl,
                     name="attn", **kw)(y, grid, train=train)
        else:
            y = MultiHeadAttention(self.num_heads, qkv_bias=self.qkv_bias, proj_drop=self.drop_rate,
                                   implementation=self.attn_impl, name="attn", **kw)(y, train=train)
        x = x + DropPath(self.drop_path)(y, train=train, rate=drop_path)
        y = Mlp(int(x.shape[-1] * self.mlp_ratio), dropout=self.drop_rate, name="mlp", **kw)(
            layer_norm(name="norm2", **kw)(x), train=train)
        x = x + DropPath(self.drop_path)(y, train=train, rate=drop_path)
        return nn.with_logical_constraint(x, TOKENS)


class ConViT(ImageClassifier):
    """ConViT: patch embedding + positions, GPSA blocks, then a class token and self-attention blocks."""

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 192  # full width (timm's embed_dim is per head: 48 * num_heads)
    depth: int = 12
    num_heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    local_up_to_layer: int = 10  # blocks [0, local_up_to_layer) use GPSA; the class token joins after them
    locality_strength: float = 1.0
    global_pool: str = "token"  # token | avg
    attn_impl: str = "auto"  # xla | cudnn | auto
    # The GPSA blocks and the global blocks as two nn.scans (layers/scan.py): "blocks_0to9", "blocks_10to11".
    scan_blocks: bool = False

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if not 0 < self.local_up_to_layer < self.depth:
            raise ValueError(f"local_up_to_layer must lie in 1..depth-1 (the class token joins after the local "
                             f"blocks), got {self.local_up_to_layer} with depth {self.depth}")
        self.patch_embed = PatchEmbed(self.patch_size, self.embed_dim, **kw)
        grid = self.img_size // self.patch_size
        init = nn.initializers.truncated_normal(0.02)
        self.pos_embed = self.param("pos_embed", with_logical_partitioning(init, (None, None, "embed")),
                                    (1, grid * grid, self.embed_dim), self.param_dtype)
        self.cls_token = self.param("cls_token", with_logical_partitioning(init, (None, None, "embed")),
                                    (1, 1, self.embed_dim), self.param_dtype)
        self.pos_drop = nn.Dropout(self.drop_rate)
        rates = drop_path_schedule(self.drop_path_rate, (self.depth,))[0]
        fields = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                      locality_strength=self.locality_strength, drop_rate=self.drop_rate, attn_impl=self.attn_impl,
                      **kw)
        self.blocks = block_sequence(
            checkpointed(ConvitBlock, self.remat),
            [dict(fields, use_gpsa=i < self.local_up_to_layer, drop_path=rate) for i, rate in enumerate(rates)],
            name="blocks", scan=self.scan_blocks)
        self.norm = layer_norm(**kw)
        self.head_drop, self.head = classifier(self.num_classes, self.drop_rate, **kw)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """Every block's patch tokens as a map (stride patch_size); the class token joins after the local blocks."""
        return tuple(FeatureInfo(f"block{i}", self.embed_dim, self.patch_size,
                                 num_prefix_tokens=int(i >= self.local_up_to_layer)) for i in range(self.depth))

    def forward_stages(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """The patch grid and the tokens after every block (patch tokens only in the local blocks)."""
        grid = self.patch_embed(x)
        features = {"patch_embed": grid}
        x = grid_to_tokens(grid)
        x = add_shared(x, resample_pos_embed(self.pos_embed, grid.shape[1:3], num_prefix_tokens=0).astype(x.dtype))
        x = self.pos_drop(x, deterministic=not train)
        x, local = run_sequence(self.blocks, x, grid.shape[1:3], train=train, layers=range(self.local_up_to_layer))
        _, outputs = run_sequence(self.blocks, prepend_tokens(x, self.cls_token), grid.shape[1:3], train=train,
                                  layers=range(self.local_up_to_layer, self.depth))
        return features | {f"block{i}": tokens for i, tokens in enumerate(local + outputs)}

    def forward_pool(self, features: dict[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
        """The normed final tokens and the pooled features: the class token, or the mean of the patch tokens."""
        x = self.norm(features[f"block{self.depth - 1}"])
        return {"tokens": x, "pooled": x[:, 0] if self.global_pool == "token" else jnp.mean(x[:, 1:], axis=1)}


def positional_branch_gmacs(embed_dim: int, num_tokens: int, gpsa_layers: int = 10) -> float:
    """The MACs our GPSA adds over timm's: its positional map applied to V on its own, N^2 * C per GPSA layer."""
    return gpsa_layers * num_tokens ** 2 * embed_dim / 1e9


# Parameters and GMACs: timm's benchmark csv (results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090; params
# 5.71 / 27.78 / 86.54 M, GMACs 1.26 / 5.76 / 17.52). The paper's Table 1 gives rounded figures (6M / 1G,
# 27M / 5.4G, 86M / 17G) that leave out the attention matmuls, so timm's count is the one checked here. Our GMACs
# add the positional branch's own product with V (module docstring): +0.074 / 0.166 / 0.295 G at 224 px.
# Top-1: paper Table 1 (timm's evaluation of the official weights: 73.14 / 81.41 / 82.30).
_SOURCE = ("params / GMACs: timm benchmark csv (convit_{size}: {params}M, {timm_gmacs} GMACs) + {extra:.3f} G for "
           "GPSA's separate positional x V product (see convit.py); top-1: paper Table 1")
_SIZES = {
    # size: (num_heads, params M, timm GMACs, top-1)
    "tiny": (4, 5.71, 1.26, 73.1),
    "small": (9, 27.78, 5.76, 81.3),
    "base": (16, 86.54, 17.52, 82.4),
}



def _variant(size: str, heads: int, params: float, gmacs: float, top1: float) -> tuple[dict, PaperFigures]:
    extra = positional_branch_gmacs(48 * heads, 196)
    return dict(embed_dim=48 * heads, num_heads=heads), PaperFigures(
        params, gmacs + extra, top1, _SOURCE.format(size=size, params=params, timm_gmacs=gmacs, extra=extra))


register_variants(ConViT, {f"convit_{size}": _variant(size, *row) for size, row in _SIZES.items()}, category="serial")

# A tiny variant for the registry-wide tests: 32 px, 4x4 patches of 8 px, 2 GPSA blocks then 1 global block.
register_model("test_convit", ConViT, dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4,
                                           local_up_to_layer=2, num_classes=10), category="serial", input_size=32)
