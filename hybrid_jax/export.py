"""Serialised inference functions: a model and its weights as one `jax.export` artifact, any batch size.

    python -m hybrid_jax.export --model test_resnet --num_classes 10 --checkpoint WORKDIR --out model.jaxexport

The artifact holds StableHLO with the weights as constants and a symbolic batch dimension;
JAX's compatibility guarantees let a later JAX run it without this package:

    exported = jax.export.deserialize(open("model.jaxexport", "rb").read())
    logits = exported.call(images)  # images: [any batch, H, W, 3] float32

Attention runs through XLA in an export: cuDNN's kernels are custom calls without a
compatibility guarantee, which `jax.export` refuses to serialise.
"""

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from hybrid_jax import registry
from hybrid_jax.checkpoint import Checkpointer, CheckpointError, tree_differences
from hybrid_jax.runtime import configure_process


def export_model(model: nn.Module, variables: dict[str, Any], image_shape: Sequence[int], *,
                 platforms: Sequence[str] | None = None) -> jax.export.Exported:
    """`model.apply(variables, images, train=False)` exported for images of shape [b, *image_shape], b symbolic.

    Args:
      model: an unbound Linen model of the zoo (`hybrid_jax.create_model`).
      variables: its {"params", "batch_stats"}, boxed or not; they become constants of the export.
      image_shape: (height, width, channels) of one image.
      platforms: where the export may run, e.g. ("cpu", "cuda"); default: this process's backend.

    A model whose attention implementation is "auto" is exported with "xla" (see the module docstring).

    Returns:
      The `jax.export.Exported`: `.call(images)` runs it, `.serialize()` gives its bytes.
    """
    if len(image_shape) != 3:
        raise ValueError(f"image_shape is (height, width, channels), got {tuple(image_shape)}")
    if getattr(model, "attn_impl", "xla") == "cudnn":
        raise ValueError("attn_impl='cudnn' cannot be exported: cuDNN attention is a custom call without a "
                         "compatibility guarantee; build the model with attn_impl='xla' or 'auto'")
    if getattr(model, "attn_impl", "xla") == "auto":
        model = model.clone(attn_impl="xla")
    # On the host: the export's constants belong to no device or mesh.
    variables = jax.tree.map(np.asarray, jax.device_get(nn.meta.unbox(variables)))

    def infer(images: jax.Array) -> jax.Array:
        return model.apply(variables, images, train=False)

    batch, = jax.export.symbolic_shape("b")
    images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    return jax.export.export(jax.jit(infer), platforms=platforms)(images)


def save(exported: jax.export.Exported, path: str | os.PathLike) -> int:
    """Writes `exported`'s serialised bytes to `path` (local or gs://); returns their number."""
    data = exported.serialize()
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return len(data)


def load(path: str | os.PathLike) -> jax.export.Exported:
    """The export `save` wrote at `path`."""
    return jax.export.deserialize(bytearray(epath.Path(path).read_bytes()))


def random_variables(model: nn.Module, image_shape: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """The model's initial variables for one image of `image_shape`, unboxed."""
    init = jax.jit(lambda key: nn.meta.unbox(model.init(key, jnp.zeros((1, *image_shape)), train=False)))
    return init(jax.random.key(seed))


def restore_checkpoint(path: str | os.PathLike, *, ema: bool = False) -> tuple[dict[str, Any], str]:
    """({"params", "batch_stats"}, where they came from) of a run: its workdir, checkpoints directory or one step.

    A workdir or checkpoints directory gives its newest readable step (`Checkpointer.restore_variables`).
    """
    path = epath.Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory: give a run's workdir, its checkpoints directory or the "
                         "directory of one step")
    step = int(path.name) if path.name.isdigit() and (path / "_CHECKPOINT_METADATA").exists() else None
    checkpointer = Checkpointer(path.parent if step is not None else path, async_save=False)
    try:
        step, variables = checkpointer.restore_variables(ema=ema, step=step)
    finally:
        checkpointer.close()
    return variables, f"step {step} of {checkpointer.directory}" + (" (parameter EMA)" if ema else "")


def export_registered(name: str, *, num_classes: int | None = None, checkpoint: str | None = None,
                      pretrained: str | None = None, ema: bool = False, image_size: int | None = None,
                      channels: int = 3, platforms: Sequence[str] | None = None) -> tuple[jax.export.Exported, str]:
    """(the export, a description of its weights) of a registered model; the command line's work.

    Weights come from a run (`checkpoint`), a converted reference file (`pretrained`) or, with
    neither, a random initialisation (seed 0).
    """
    if checkpoint and pretrained:
        raise ValueError("give --checkpoint or --pretrained, not both")
    if num_classes is not None and num_classes < 0:
        raise ValueError(f"--num_classes {num_classes}: give 0 (pooled features) or more")
    model = registry.create_model(name, num_classes=num_classes, pretrained=pretrained)
    side = image_size if image_size is not None else (getattr(model, "img_size", None)
                                                      or registry.model_info(name).input_size)
    if side <= 0 or channels <= 0:
        raise ValueError(f"--image_size {side} --channels {channels}: both must be positive")
    image_shape = (side, side, channels)
    if pretrained:
        model, variables = model.unbind()
        source = f"converted from {pretrained}"
    elif checkpoint:
        variables, source = restore_checkpoint(checkpoint, ema=ema)
        _check_fits(model, variables, image_shape, name, source)
    else:
        variables, source = random_variables(model, image_shape), "random initialisation (seed 0)"
    return export_model(model, variables, image_shape, platforms=platforms), source


def _check_fits(model: nn.Module, variables: dict[str, Any], image_shape: tuple[int, ...], name: str,
                source: str) -> None:
    """Raises ValueError naming the differences when `variables` are not the model's for these images."""
    expected = nn.meta.unbox(jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                                            jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)))
    if differences := tree_differences(variables, expected):
        raise ValueError(f"{source} does not fit {name} on {image_shape} images ({'; '.join(differences)}); pass "
                         "the --num_classes, --image_size and --channels the run was trained with")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, as this command's own."""

    def error(self, message: str):
        raise SystemExit(f"{self.prog}: error: {message} (see --help)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = _Parser(prog="python -m hybrid_jax.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a registered name (hybrid_jax.list_models())")
    parser.add_argument("--num_classes", type=int, default=None,
                        help="classifier width, 0 for pooled features; default: the variant's, or the "
                             "--pretrained checkpoint's")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", help="a run's workdir, its checkpoints directory (newest step) or one "
                                              "step's directory")
    weights.add_argument("--pretrained", help="a reference checkpoint (.safetensors, .npz, .pth) to convert")
    parser.add_argument("--ema", action="store_true", help="with --checkpoint: the parameters' EMA")
    parser.add_argument("--image_size", type=int, default=None,
                        help="side of the square input; default: the model's img_size or registered size")
    parser.add_argument("--channels", type=int, default=3, help="input channels (1 for a Fashion-MNIST run)")
    parser.add_argument("--platforms", default=None, help="comma-separated, e.g. cpu,cuda; default: this backend")
    parser.add_argument("--out", required=True, help="file to write (local or gs://)")
    args = parser.parse_args(argv)
    if args.ema and not args.checkpoint:
        parser.error("--ema needs --checkpoint")
    platforms = tuple(p.strip() for p in args.platforms.split(",")) if args.platforms else None
    try:
        exported, source = export_registered(
            args.model, num_classes=args.num_classes, checkpoint=args.checkpoint, pretrained=args.pretrained,
            ema=args.ema, image_size=args.image_size, channels=args.channels, platforms=platforms)
        size = save(exported, args.out)
    except (ValueError, TypeError, OSError, ImportError, CheckpointError) as error:
        # Registry, checkpoint and conversion errors already say what to do; keep them to one line.
        raise SystemExit(f"{parser.prog}: error: {' '.join(str(error).split())}") from None
    if not (args.checkpoint or args.pretrained):
        print(f"no --checkpoint or --pretrained: exported {args.model} with random weights", file=sys.stderr)
    shapes = ", ".join(f"{a.dtype}{list(a.shape)}" for a in exported.out_avals)
    print(f"wrote {args.out} ({size / 1e6:.1f} MB): {args.model} with weights from {source}; "
          f"{exported.in_avals[0].dtype}{list(exported.in_avals[0].shape)} -> {shapes} on "
          f"{', '.join(exported.platforms)}")


if __name__ == "__main__":
    configure_process()
    main()
