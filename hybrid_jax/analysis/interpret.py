"""What a hybrid looks at: attention rollout, Grad-CAM, branch attribution, and image overlays.

  maps = rollout_map(model, variables, images)                        # transformer branch
  cam = grad_cam(model, variables, images, "cnn4", head="cnn")         # CNN branch
  attribution = branch_attribution(model, variables, images)           # parallel hybrids
  save_overlays("out.png", images, {"rollout": maps, "Grad-CAM": cam})

- **Attention rollout** (Abnar & Zuidema, ACL 2020, arXiv 2005.00928): each layer's
  attention averaged over heads, plus the identity for the residual connection,
  rows renormalised, multiplied through the layers; the class token's row over the
  patch tokens is the map. The probabilities come from the shared attention entry
  point, which sows them only when the `ATTENTION_WEIGHTS` collection is mutable
  (`hybrid_jax.layers.attention`), so no model computes anything extra otherwise.
  In a parallel hybrid the fusions also move information between the branches;
  rollout follows only the token mixing inside the transformer branch.
- **Grad-CAM** (Selvaraju et al., ICCV 2017, arXiv 1610.02391): the gradient of a
  class logit with respect to one of `forward_features`' maps, averaged over space
  as channel weights; the ReLU of the weighted channel sum, upsampled to the image.
  The gradient is taken by adding a zero perturbation to the output of the module
  call that produced the map (found through `flax.linen.intercept_methods`), so
  models need no hook. Token maps ([B, N, C]) work too, reshaped to their grid.
- **Branch attribution** for models with `branch_logits` (parallel hybrids,
  Conformer): head ablation (each head's logits alone and their mean, which is the
  model's output) and gradient x input per branch, both at each head's input
  (how much of the mean logit each branch's pooled features carry; for linear heads
  exactly W_b f_b / 2, the rest being the biases) and at the image (what each head
  responds to, pixel by pixel, relative to a baseline image).

Plots use matplotlib's Agg canvas directly (no pyplot state, no display needed).
"""

import collections
import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.layers.attention import ATTENTION_WEIGHTS
from hybrid_jax.layers.model import BranchClassifier

Array = jax.Array


# --------------------------------------------------------------------------- #
# Maps on the image grid
# --------------------------------------------------------------------------- #


def token_grid(num_tokens: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The (rows, cols) of `num_tokens` patch tokens laid out with the image's aspect ratio."""
    height, width = image_hw
    rows = max(1, round(math.sqrt(num_tokens * height / width)))
    if rows * (num_tokens // rows) != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a grid with the aspect of a {height}x{width} image")
    return rows, num_tokens // rows


def to_image_grid(values: Array, image_hw: tuple[int, int], num_prefix_tokens: int = 0) -> Array:
    """Per-token [B, N] or per-position [B, h, w] values upsampled (bilinear) to [B, H, W]."""
    values = jnp.asarray(values, jnp.float32)
    if values.ndim == 2:
        values = values[:, num_prefix_tokens:]
        values = values.reshape(values.shape[0], *token_grid(values.shape[1], image_hw))
    return jax.image.resize(values, (values.shape[0], *image_hw), "bilinear")


def normalize_maps(maps: Array, *, zero_floor: bool = False) -> Array:
    """Each map scaled to [0, 1]: min-max, or divided by its max when `zero_floor` (0 stays 'no evidence').

    A map flat to float32 rounding (span under 1e-5 of its magnitude) becomes all zeros.
    """
    maps = jnp.asarray(maps, jnp.float32)
    axes = tuple(range(1, maps.ndim))
    low = 0.0 if zero_floor else jnp.min(maps, axis=axes, keepdims=True)
    span = jnp.max(maps, axis=axes, keepdims=True) - low
    varies = span > 1e-5 * jnp.max(jnp.abs(maps), axis=axes, keepdims=True)
    return jnp.where(varies, (maps - low) / jnp.where(varies, span, 1.0), 0.0)


# --------------------------------------------------------------------------- #
# Attention rollout
# --------------------------------------------------------------------------- #


def _in_call_order(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Array]]:
    # Flax fills a collection in the order modules first write to it, i.e. call order.
    found = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            found += _in_call_order(value, f"{prefix}{key}/")
        else:  # a sown tuple: one entry per call of that module
            found += [(prefix.rstrip("/") + (f"#{i}" if i else ""), v) for i, v in enumerate(value)]
    return found


def attention_maps(model: nn.Module, variables: Any, images: Array, *,
                   method: str | Callable | None = None) -> dict[str, Array]:
    """Every attention's probabilities [B, heads, q_len, kv_len], by module path, in call order.

    A module that attends more than once appears as "path", "path#1", ...
    """
    paths: list[str] = []

    def run(variables, images):
        _, state = model.apply(variables, images, train=False, method=method, mutable=[ATTENTION_WEIGHTS])
        found = _in_call_order(state.get(ATTENTION_WEIGHTS, {}))
        paths[:] = [path for path, _ in found]  # recorded while tracing; strings cannot leave jit
        return [weights for _, weights in found]

    weights = jax.jit(run)(variables, images)
    return dict(zip(paths, weights))


def attention_rollout(maps: Sequence[Array], *, residual: bool = True) -> Array:
    """Abnar & Zuidema's rollout of self-attention maps [B, heads, N, N], first layer first.

    Heads are averaged; with `residual` the identity is added for the skip connection;
    rows are renormalised; the layers are multiplied through (last @ ... @ first).

    Returns:
      [B, N, N]: row i says how much each input token reaches output token i.
    """
    maps = list(maps)
    if not maps:
        raise ValueError("attention rollout needs at least one attention map")
    shapes = {tuple(m.shape[-2:]) for m in maps}
    if len(shapes) != 1 or any(n != m for n, m in shapes):
        raise ValueError(f"rollout needs self-attention maps over one token set; got shapes {sorted(shapes)}")
    batch, n = maps[0].shape[0], maps[0].shape[-1]
    eye = jnp.eye(n, dtype=jnp.float32)
    rollout = jnp.broadcast_to(eye, (batch, n, n))
    for weights in maps:
        layer = jnp.mean(jnp.asarray(weights, jnp.float32), axis=1)
        if residual:
            layer = layer + eye
        layer = layer / jnp.sum(layer, axis=-1, keepdims=True)
        rollout = layer @ rollout
    return rollout


def select_self_attention(maps: Mapping[str, Array], include: str | None = None) -> dict[str, Array]:
    """The self-attention maps rollout can chain: those whose path matches `include` (a regex), all square.

    Raises:
      ValueError: none match, or the square maps attend over token sets of different sizes
        (several branches or stages; pick one with `include`).
    """
    chosen = {path: m for path, m in maps.items()
              if m.shape[-1] == m.shape[-2] and (include is None or re.search(include, path))}
    if not chosen:
        raise ValueError(f"no self-attention map matches include={include!r}; the model's attention maps are: "
                         f"{', '.join(f'{p} {tuple(m.shape)}' for p, m in maps.items()) or 'none'}")
    sizes = collections.defaultdict(list)
    for path, m in chosen.items():
        sizes[m.shape[-1]].append(path)
    if len(sizes) > 1:
        raise ValueError("the self-attention maps attend over token sets of different sizes; pass include= "
                         "(a regex over module paths) to pick one: "
                         + "; ".join(f"{n} tokens: {', '.join(paths)}" for n, paths in sizes.items()))
    return chosen


def rollout_map(model: nn.Module, variables: Any, images: Array, *, include: str | None = None,
                num_prefix_tokens: int = 1, query: int = 0, residual: bool = True) -> Array:
    """Attention rollout as an image map: the `query` token's (the class token's) row over the patch tokens.

    Args:
      model, variables: a model whose attention goes through `dot_product_attention`.
      images: [B, H, W, C] inputs.
      include: regex over module paths choosing the layers (default: every self-attention).
      num_prefix_tokens: class / distillation tokens in front of the patch tokens.
      query: the token whose rollout row is shown.

    Returns:
      [B, H, W] in [0, 1].
    """
    maps = select_self_attention(attention_maps(model, variables, images), include)
    row = attention_rollout(list(maps.values()), residual=residual)[:, query]
    return normalize_maps(to_image_grid(row, images.shape[1:3], num_prefix_tokens))


# --------------------------------------------------------------------------- #
# Gradients at a module call's output or input, without hooks in the model
# --------------------------------------------------------------------------- #


class _Site(NamedTuple):
    """One module call (path, method, occurrence) and one array leaf of its output (or first argument)."""

    path: tuple[str, ...]
    method: str
    occurrence: int
    leaf: int
    at_input: bool
    shape: tuple[int, ...]  # of the array found there


def _call_key(context) -> tuple[tuple[str, ...], str]:
    return tuple(context.module.path), context.method_name


def _find_sites(model: nn.Module, variables: Any, images: Array, method: str | Callable | None,
                pick: Callable[[Any], Sequence[Array]], *, at_input: bool = False) -> tuple[list[_Site], Any]:
    """The module calls whose outputs are the arrays `pick(result)`, the first (innermost) producer of each.

    A call that returns one of its own arguments (an identity shortcut, eval-mode dropout)
    passes the array on rather than producing it, and is skipped; an array made by a
    function outside any module (a pooling in the model's own method) has no site (None).
    With `at_input`, the site is the first positional argument of that call instead.
    Runs under `jax.eval_shape`: only traces. Returns the sites and the result's shapes.
    """
    sites: list[_Site | None] = []

    def run(variables, images):
        calls, counts = [], collections.Counter()

        def record(next_fun, args, kwargs, context):
            key = _call_key(context)
            occurrence = counts[key]
            counts[key] += 1
            out = next_fun(*args, **kwargs)
            if key[0]:  # the model's own methods return the feature dicts, they do not produce the maps
                calls.append((key, occurrence, args, out))  # completion order: producers before their callers
            return out

        with nn.intercept_methods(record):
            result = model.apply(variables, images, train=False, method=method)
        for target in pick(result):
            site = None
            for (path, name), occurrence, args, out in calls:
                index = next((i for i, leaf in enumerate(jax.tree.leaves(out)) if leaf is target), None)
                passed_through = any(leaf is target for leaf in jax.tree.leaves(args))  # e.g. an identity shortcut
                if index is not None and not passed_through:
                    if at_input and not (args and isinstance(args[0], jax.Array)):
                        raise ValueError(f"{'/'.join(path)}.{name} takes no array as its first positional argument")
                    shape = args[0].shape if at_input else target.shape
                    site = _Site(path, name, occurrence, 0 if at_input else index, at_input, tuple(shape))
                    break
            sites.append(site)
        return result

    shapes = jax.eval_shape(run, variables, images)
    return sites, shapes


def _apply_perturbed(model: nn.Module, variables: Any, images: Array, method: str | Callable | None,
                     sites: Sequence[_Site], deltas: Sequence[Array]) -> tuple[Any, list[Array]]:
    """The model's output with `deltas` added at `sites`, and the unperturbed values found there."""
    wanted = {(s.path, s.method, s.occurrence): i for i, s in enumerate(sites)}
    values: list[Array | None] = [None] * len(sites)
    counts = collections.Counter()

    def perturb(next_fun, args, kwargs, context):
        key = _call_key(context)
        occurrence = counts[key]
        counts[key] += 1
        index = wanted.get((*key, occurrence))
        if index is not None and sites[index].at_input:
            values[index] = args[0]
            args = (args[0] + deltas[index].astype(args[0].dtype), *args[1:])
        out = next_fun(*args, **kwargs)
        if index is not None and not sites[index].at_input:
            leaves, tree = jax.tree.flatten(out)
            values[index] = leaves[sites[index].leaf]
            leaves[sites[index].leaf] = values[index] + deltas[index].astype(values[index].dtype)
            out = jax.tree.unflatten(tree, leaves)
        return out

    with nn.intercept_methods(perturb):
        out = model.apply(variables, images, train=False, method=method)
    missing = [sites[i] for i, v in enumerate(values) if v is None]
    if missing:
        raise RuntimeError(f"module calls {missing} did not happen again; is the model's forward deterministic?")
    return out, values


def _target_logit(logits: Array, target: Array | int | None) -> tuple[Array, Array]:
    """Sum over the batch of each example's target logit (predicted class when None), and the targets."""
    if target is None:
        target = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
    target = jnp.broadcast_to(jnp.asarray(target, jnp.int32), logits.shape[:1])
    return jnp.sum(jnp.take_along_axis(logits, target[:, None], axis=-1)), target


def _heads_method(model: nn.Module, head: str | None) -> tuple[str | None, Callable[[Any], Array]]:
    if head is None:
        return None, lambda out: out
    if not isinstance(model, BranchClassifier):
        raise ValueError(f"head={head!r} needs a model with branch_logits; {type(model).__name__} has one head")
    return "branch_logits", lambda out: out[head]


# --------------------------------------------------------------------------- #
# Grad-CAM
# --------------------------------------------------------------------------- #


def grad_cam(model: nn.Module, variables: Any, images: Array, feature: str, *, target: Array | int | None = None,
             head: str | None = None, num_prefix_tokens: int = 1, normalize: bool = True) -> Array:
    """Grad-CAM of `forward_features(images)[feature]` for the `target` class.

    Args:
      model, variables: any model with `forward_features`.
      images: [B, H, W, C].
      feature: a key of `forward_features`' dict: a map [B, h, w, C] (e.g. "stage3", "cnn4") or tokens
        [B, N, C] (e.g. "transformer3"; the first `num_prefix_tokens` are left out). It must be the output
        of a module call (a stage, block or fusion), which is where the gradient is taken. A head that
        reads only the class token sees no patch token after the last block: take tokens before it.
      target: class per example ([B] or one int); default the model's prediction.
      head: for models with `branch_logits`, the head whose logit is explained ("cnn", "transformer");
        default the model's own output.
      normalize: scale each map to [0, 1] (divided by its max).

    Returns:
      [B, H, W] maps (bilinear upsampling of the feature's grid).
    """
    method, select = _heads_method(model, head)
    sites, features = _find_sites(model, variables, images, "forward_features",
                                  lambda f: [f[feature]] if feature in f else [])
    if feature not in features:
        raise KeyError(f"forward_features has no {feature!r}; it has: {', '.join(features)}")
    if sites[0] is None:
        raise ValueError(f"forward_features[{feature!r}] is not the output of a module call, so no gradient can "
                         "be taken at it; choose a stage, block or fusion output")

    def run(variables, images):
        def objective(delta):
            out, (value,) = _apply_perturbed(model, variables, images, method, sites, [delta])
            logit, _ = _target_logit(select(out).astype(jnp.float32), target)
            return logit, value

        grads, value = jax.grad(objective, has_aux=True)(jnp.zeros(sites[0].shape, jnp.float32))
        value = value.astype(jnp.float32)
        if value.ndim == 3:  # tokens: Grad-CAM over the patch tokens
            grads, value = grads[:, num_prefix_tokens:], value[:, num_prefix_tokens:]
            weights = jnp.mean(grads, axis=1, keepdims=True)
        else:
            weights = jnp.mean(grads, axis=(1, 2), keepdims=True)
        cam = nn.relu(jnp.sum(weights * value, axis=-1))
        cam = to_image_grid(cam, images.shape[1:3])
        return normalize_maps(cam, zero_floor=True) if normalize else cam

    return jax.jit(run)(variables, images)


# --------------------------------------------------------------------------- #
# Branch attribution
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class BranchAttribution:
    """How much each head of a multi-head model (parallel hybrid, Conformer) gives its output."""

    target: np.ndarray  # [B] the explained class per example
    logits: dict[str, np.ndarray]  # each head's [B, K] logits, and "mean": the model's output
    # Gradient x input of the mean's target logit at each head's input (its branch's pooled features),
    # summed over features; "bias" is the rest, so the entries add up to the mean's target logit.
    contribution: dict[str, np.ndarray]
    pixels: dict[str, np.ndarray]  # gradient x (image - baseline) of each head's target logit, [B, H, W]

    @property
    def branches(self) -> list[str]:
        return [name for name in self.logits if name != "mean"]

    def target_logits(self) -> dict[str, np.ndarray]:
        """Each head's (and the mean's) logit of the target class, [B]."""
        return {name: np.take_along_axis(v, self.target[:, None], axis=-1)[:, 0] for name, v in self.logits.items()}

    def share(self) -> dict[str, np.ndarray]:
        """Each branch's fraction of the branches' total |contribution|, [B]; they add up to 1."""
        total = sum(np.abs(self.contribution[b]) for b in self.branches)
        return {b: np.abs(self.contribution[b]) / np.where(total > 0, total, 1.0) for b in self.branches}


def branch_attribution(model: nn.Module, variables: Any, images: Array, *, target: Array | int | None = None,
                       baseline: Array | float = 0.0) -> BranchAttribution:
    """Head ablation and gradient x input per branch for a model with `branch_logits`.

    Args:
      target: class per example ([B] or one int); default the model's prediction (argmax of the mean).
      baseline: the "absent" input the pixel maps are relative to, gradient x (images - baseline):
        0 is plain gradient x input; for normalised images on a black ground pass the normalised
        black image, so the background contributes nothing.
    """
    if not isinstance(model, BranchClassifier):
        raise ValueError(f"{type(model).__name__} has no branch_logits: branch attribution is for models with "
                         "one head per branch (parallel hybrids, Conformer)")
    names: list[str] = []

    def pick(heads):
        names[:] = list(heads)
        return [heads[name] for name in names]

    sites, _ = _find_sites(model, variables, images, "branch_logits", pick, at_input=True)
    unfound = [name for name, site in zip(names, sites) if site is None]
    if unfound:
        raise ValueError(f"the logits of heads {unfound} are not the output of a module call on the branch features")

    def run(variables, images, baseline):
        def target_logits(x, deltas):
            out, values = _apply_perturbed(model, variables, x, "branch_logits", sites, deltas)
            logits = {name: out[name].astype(jnp.float32) for name in names}
            mean = sum(logits.values()) / len(logits)
            _, chosen = _target_logit(mean, target)
            per_head = jnp.stack([jnp.take_along_axis(logits[name], chosen[:, None], axis=-1)[:, 0]
                                  for name in names])
            return per_head, (logits, mean, values, chosen)

        # One forward pass; one backward pass per head (vmapped): head h's target logit at the image, and
        # at every head's input (only its own input reaches it).
        x = images.astype(jnp.float32)
        zeros = [jnp.zeros(site.shape, jnp.float32) for site in sites]
        _, backward, (logits, mean, values, chosen) = jax.vjp(target_logits, x, zeros, has_aux=True)
        per_head = jnp.broadcast_to(jnp.eye(len(names))[:, :, None], (len(names), len(names), x.shape[0]))
        image_grads, input_grads = jax.vmap(backward)(per_head)
        pixels = {name: jnp.sum(image_grads[i] * (x - baseline), axis=-1) for i, name in enumerate(names)}
        contribution = {name: jnp.sum(input_grads[i][i] * values[i].astype(jnp.float32), axis=-1) / len(names)
                        for i, name in enumerate(names)}
        picked = jnp.take_along_axis(mean, chosen[:, None], axis=-1)[:, 0]
        contribution["bias"] = picked - sum(contribution.values())
        return chosen, {**logits, "mean": mean}, contribution, pixels

    chosen, logits, contribution, pixels = jax.device_get(
        jax.jit(run)(variables, images, jnp.asarray(baseline, jnp.float32)))
    return BranchAttribution(np.asarray(chosen), logits, contribution, pixels)


# --------------------------------------------------------------------------- #
# Overlays
# --------------------------------------------------------------------------- #


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _show_image(ax, image: np.ndarray) -> None:
    image = np.asarray(image, np.float32)
    low, high = float(image.min()), float(image.max())
    image = (image - low) / (high - low) if high > low else np.zeros_like(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def save_overlays(path: str | Path, images: Array, maps: Mapping[str, Array], *,
                  titles: Sequence[str] | None = None, alpha: float = 0.5, cmap: str = "jet", dpi: int = 100) -> Path:
    """A grid PNG: the images in the first row, each named [B, H, W] map over them in the rows below.

    Maps are min-max scaled per image for display. Returns the path written.
    """
    images = np.asarray(images)
    rows = 1 + len(maps)
    figure = _new_figure(1.7 * len(images), 1.7 * rows)
    grid = figure.subplots(rows, len(images), squeeze=False)
    for col, image in enumerate(images):
        _show_image(grid[0, col], image)
        if titles is not None:
            grid[0, col].set_title(titles[col], fontsize=8)
        for row, heat in enumerate(maps.values(), start=1):
            _show_image(grid[row, col], image)
            grid[row, col].imshow(np.asarray(normalize_maps(jnp.asarray(heat)[col:col + 1]))[0], cmap=cmap,
                                  alpha=alpha, vmin=0, vmax=1)
    for row, name in enumerate(["input", *maps], start=0):
        grid[row, 0].set_ylabel(name, fontsize=8)
    return _save_png(figure, path, dpi)


def _save_png(figure, path: str | Path, dpi: int) -> Path:
    """Lays the figure out and writes it as a PNG, creating the folder."""
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, format="png")
    return path


def save_branch_attribution(path: str | Path, attribution: BranchAttribution, images: Array, *,
                            class_names: Sequence[str] | None = None, dpi: int = 100) -> Path:
    """A PNG with, per image: its target class, each head's positive pixel attribution, and the contributions.

    The bars are the branches' (and the biases') gradient x input contributions to the mean's target logit.
    """
    images = np.asarray(images)
    branches = attribution.branches
    rows = 2 + len(branches)
    figure = _new_figure(1.9 * len(images), 1.7 * rows)
    grid = figure.subplots(rows, len(images), squeeze=False)
    per_head = attribution.target_logits()
    for col, image in enumerate(images):
        target = int(attribution.target[col])
        name = class_names[target] if class_names else str(target)
        _show_image(grid[0, col], image)
        grid[0, col].set_title(name, fontsize=8)
        for row, branch in enumerate(branches, start=1):
            _show_image(grid[row, col], image)
            positive = np.maximum(attribution.pixels[branch][col], 0)
            grid[row, col].imshow(np.asarray(normalize_maps(jnp.asarray(positive)[None], zero_floor=True))[0],
                                  cmap="jet", alpha=0.5, vmin=0, vmax=1)
            grid[row, col].set_title(f"logit {per_head[branch][col]:.2f}", fontsize=7)
        bars = grid[-1, col]
        keys = [*branches, "bias"]
        bars.bar(range(len(keys)), [float(attribution.contribution[k][col]) for k in keys],
                 color=["tab:blue", "tab:orange", "tab:green", "tab:red"][:len(keys)])
        bars.axhline(0, color="black", linewidth=0.5)
        bars.set_xticks(range(len(keys)))
        bars.set_xticklabels([k[:5] for k in keys], fontsize=6)
        bars.tick_params(axis="y", labelsize=6)
        bars.set_title(f"mean {per_head['mean'][col]:.2f}", fontsize=7)
    for row, label in enumerate(["input", *(f"{b} head" for b in branches), "grad x input"]):
        grid[row, 0].set_ylabel(label, fontsize=8)
    return _save_png(figure, path, dpi)
