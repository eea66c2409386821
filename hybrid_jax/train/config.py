"""Every key a training run reads, with its default; experiment configs override these.

One source of truth: `configs/*.py` start from `default_config()`, so a key that is
not here does not exist, and `--config.key=value` on the command line is checked
against this list (with close matches suggested) before anything runs.
"""

import ast
import dataclasses
import difflib
import importlib.util
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from hybrid_jax.layers.remat import REMAT_POLICIES

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config.dtype -> the compute dtype
REMAT = tuple(REMAT_POLICIES)
MODES = ("train", "eval")
HEAD_LOSSES = ("each", "mean")
# Module fields the run sets itself (the task from its data, the dtype and remat from config.dtype and config.remat).
RUN_FIELDS = ("num_classes", "dtype", "param_dtype", "remat")
# Keys that no longer exist, and what replaced them.
RENAMED_KEYS = {
    "model_overrides": "set model fields one by one: --config.model.FIELD=VALUE (config.model is nested)",
    "no_decay_names": "config.no_decay holds regular expressions matched against parameter paths",
}


def default_config() -> ml_collections.ConfigDict:
    """The defaults for a classification run, and the re-ID settings under `reid`."""
    c = ml_collections.ConfigDict()
    c.task = "classification"  # classification | reid (person re-identification), hybrid_jax.tasks
    # The registered name and every field of the model (model_config), so that the command line and
    # sweeps set any field with its type checked: --config.model.drop_path_rate=0.1.
    c.model = model_config("test_resnet")
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 (params and loss stay float32)
    # What each block recomputes in the backward pass instead of storing (hybrid_jax/layers/remat.py): none |
    # block (keep weight-matmul outputs) | full (keep only block inputs). Same model and numbers, more compute.
    c.remat = "none"
    c.mode = "train"  # train | eval (score init_from on the eval split, write summary.json, train nothing)
    # Where the weights start (fine-tuning) or what mode=eval scores: a checkpoint file of config.model's
    # reference implementation (.safetensors, .npz, .pth: the authors', timm's) or the workdir of a run of
    # ours (its newest step). A classifier of another size starts afresh. "" starts from scratch.
    c.init_from = ""

    c.dataset = "fashion_mnist"  # tfds name; fashion_mnist is built offline from the Debian package
    c.data_dir = ""  # tfds data dir; "" means $TFDS_DATA_DIR or ~/tensorflow_datasets
    # Where datasets that cannot be downloaded are read from on first use (market1501, dukemtmc_reid,
    # msmt17: the extracted folder); "" means {data_dir}/downloads/manual.
    c.manual_dir = ""
    c.train_split = "train"
    c.eval_split = "test"
    c.train_fraction = 1.0  # keep the first fraction of the train split (dataset-size ablations)
    c.resize = ()  # (H, W) to resize images to on the host; () keeps the stored size
    # 0 squashes eval images to config.resize; else timm's eval view: the shorter side of the decoded
    # original to int(S / eval_crop_pct), then the centre S x S (ImageNet weights: 0.875 or 0.9).
    c.eval_crop_pct = 0.0
    c.eval_interpolation = "bilinear"  # nearest | bilinear | bicubic: the eval resize filter (timm: bicubic)
    c.read_threads = 4
    # A training split of fixed-size images whose pixels fit in this many MiB is read into memory once,
    # sparing the per-record parsing every epoch (Fashion-MNIST: 45 MiB); 0 always reads from disk.
    c.cache_max_mb = 1024
    c.worker_count = 0  # grain worker processes; 0 reads in the training process

    c.batch_size = 128  # global, over all processes and devices
    c.eval_batch_size = 512
    c.num_epochs = 5.0
    c.total_steps = 0  # train-step calls; 0 derives them from num_epochs

    c.optimizer = "adamw"  # adamw | sgd | lamb
    c.learning_rate = 1e-3
    c.min_learning_rate = 1e-5
    c.warmup_steps = 200
    c.weight_decay = 0.05
    c.b1 = 0.9
    c.b2 = 0.999
    c.momentum = 0.9
    c.nesterov = True
    c.clip_norm = 1.0  # global-norm clipping; 0 turns it off
    c.grad_accum_steps = 1
    c.label_smoothing = 0.1
    # Models with several classifier heads (parallel hybrids): "each" head its own cross-entropy
    # (Conformer), or "mean": one cross-entropy of their mean logits, the prediction.
    c.head_loss = "each"
    c.ema_decay = 0.0  # 0 turns the parameter EMA off
    # Parameters weight decay leaves alone besides biases and norm scales: regular expressions matched
    # (re.search) against each parameter's path "block_0/attn/relative_position_bias_table".
    c.no_decay = (r"pos_embed", r"cls_token", r"dist_token", r"(^|/)tokens", r"relative_position_bias_table",
                  r"rel_pos", r"attention_biases", r"relative_pos", r"height_rel", r"width_rel", r"(^|/)centers")
    # Layer-wise learning-rate decay (BEiT / timm): layer id i of 0..L+1 (stem 0, head L+1; each family's order
    # in hybrid_jax/train/layer_decay.py) learns at layer_decay ** (L + 1 - i) of the rate; 1 turns it off.
    c.layer_decay = 1.0
    # Parameters not trained: regular expressions matched (re.search) against each parameter's path.
    c.freeze = ()

    c.augment = ml_collections.ConfigDict()
    c.augment.random_resized_crop = False  # crops back to the input size
    c.augment.crop_scale = (0.08, 1.0)
    # With random_resized_crop: cut it from the decoded original on the host (variable-size data: ImageNet)
    # rather than on device from the image resized to config.resize.
    c.augment.crop_on_host = False
    c.augment.flip = True
    c.augment.randaug_num_ops = 0
    c.augment.randaug_magnitude = 9.0
    c.augment.mixup_alpha = 0.0
    c.augment.cutmix_alpha = 0.0
    c.augment.mean = (0.5,)
    c.augment.std = (0.5,)

    c.mesh_shape = (-1, 1, 1)  # ('data', 'fsdp', 'tensor'); -1 takes the remaining devices
    c.distributed = False  # call jax.distributed.initialize (multi-host TPU/GPU, or CPU processes)
    c.coordinator_address = ""  # host:port of process 0; "" lets jax detect it (TPU, SLURM)
    c.num_processes = 0
    c.process_id = -1

    # Person re-identification (task="reid"): P x K batches, ID + triplet (+ center) loss, retrieval eval.
    c.reid = ml_collections.ConfigDict()
    c.reid.images_per_identity = 4  # K; each batch holds K images of each of batch_size / K identities
    c.reid.id_weight = 1.0  # cross-entropy through the BNNeck, smoothed by label_smoothing
    c.reid.triplet_weight = 1.0
    c.reid.triplet_margin = 0.3  # batch-hard triplet margin; 0 uses the soft margin
    c.reid.center_weight = 0.0  # center loss weight; 0 turns it off (Bag of Tricks: 5e-4)
    c.reid.query_split = "query"
    c.reid.gallery_split = "gallery"
    c.reid.distance = "cosine"  # cosine | euclidean, between BNNeck embeddings
    c.reid.eval_block_size = 256  # queries ranked against the whole gallery per device call
    c.reid.rerank = False  # k-reciprocal re-ranking (host memory grows with (query + gallery)^2)
    c.reid.rerank_k1 = 20
    c.reid.rerank_k2 = 6
    c.reid.rerank_lambda = 0.3

    # Config fields a resumed run may change from the run that wrote its checkpoints (e.g. "total_steps,
    # num_epochs" for a longer schedule); any other difference stops the resume and names the fields.
    c.resume_changes = ()

    # JAX's persistent compilation cache (local or gs://), shared by reruns and by every process of a pod;
    # "" leaves it off. Set by the command line (hybrid_jax.main) around the run.
    c.compilation_cache_dir = ""
    # (first, last): a jax.profiler trace of these train steps into {workdir}/profile (TensorBoard's profile
    # plugin or Perfetto read it); () traces nothing.
    c.profile_steps = ()

    c.seed = 0
    c.log_every = 50
    c.eval_every = 0  # steps between evaluations; 0 evaluates once per epoch
    c.eval_at_start = False  # also evaluate the untrained model at step 0 (the baseline training must beat)
    c.checkpoint_every = 500
    c.max_to_keep = 3
    c.async_checkpoint = True
    c.progress_bar = True
    return c


class ConfigError(ValueError):
    """A config key or value that cannot work, with what to do instead."""


class _Field(NamedTuple):
    default: Any  # the registered variant's value
    annotation: Any


def _variant_fields(name: str) -> dict[str, _Field]:
    """The configurable fields of the registered model `name`, with the variant's values as defaults."""
    from hybrid_jax.registry import model_info

    try:
        entry = model_info(name)
    except ValueError as error:
        raise ConfigError(f"config.model.name: {error}") from None
    fields = {}
    for field in dataclasses.fields(entry.module):
        if field.init and field.name not in ("parent", "name", *RUN_FIELDS):
            fields[field.name] = _Field(entry.fields.get(field.name, field.default), field.type)
    return fields


def _placeholder(field: _Field) -> Any:
    """A typed empty value for a field whose variant leaves it None (`int | None`), so it can be set later."""
    annotation = str(field.annotation)
    for kind in (bool, int, float, str, tuple):
        if kind.__name__ in annotation:
            return config_dict.placeholder(kind)
    return None


def model_config(name: str, **changes: Any) -> ml_collections.ConfigDict:
    """`config.model` for the registered variant `name`: its name and every field with the variant's value.

    Args:
      name: a registered model name (hybrid_jax.list_models()).
      **changes: fields to set, e.g. depth=6.
    """
    fields = _variant_fields(name)
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise ConfigError(f"model {name!r} has no field {', '.join(map(repr, unknown))}; "
                          f"its fields: {', '.join(sorted(fields))}")
    config = ml_collections.ConfigDict({"name": name})
    for key, field in fields.items():
        value = changes.get(key, field.default)
        config[key] = _placeholder(field) if value is None else value
    return config


def config_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Every key's default for a run of `config.model.name`: what a key newer than a checkpoint stood for."""
    defaults = default_config()
    defaults.model = model_config(config.model.name)
    return defaults


def _tuples(value: Any) -> Any:
    """Lists (what JSON gives back for tuples) as tuples, which Flax module fields need to be hashable."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def model_changes(model: ml_collections.ConfigDict) -> tuple[str, dict[str, Any]]:
    """(name, the fields that differ from the registered variant) of a `config.model`.

    Fields the config leaves out keep the variant's values.
    """
    if not isinstance(model, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f"config.model={model!r}: the model is a nested config now. In a config file write "
                          f"config.model = model_config({model!r}); on the command line "
                          f"--config.model.name={model}.")
    values = dict(model)
    name = values.pop("name", None)
    if not name:
        raise ConfigError("config.model has no name; build it with model_config(NAME)")
    fields = _variant_fields(name)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        hints = [f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if (close := difflib.get_close_matches(
            key, list(fields), n=3)) else "") for key in unknown]
        raise ConfigError(f"model {name!r} has no field {', '.join(hints)}. A config.model holding another "
                          f"model's fields is built with model_config({name!r}).")
    changes = {key: _tuples(value) for key, value in values.items() if _tuples(value) != fields[key].default}
    return name, changes


def build_model(model: ml_collections.ConfigDict, **run_fields: Any) -> nn.Module:
    """The module `config.model` describes; `run_fields` are what the run decides (num_classes, dtype)."""
    from hybrid_jax.registry import create_model

    name, changes = model_changes(model)
    try:
        return create_model(name, **changes, **run_fields)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config.model ({name}): {error}") from error


def load_config_file(spec: str | os.PathLike) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file named as on the command line: "configs/cifar10.py:cifar100"."""
    path, _, arg = str(spec).partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"no config file at {path!r}; name one such as configs/fashion_mnist.py")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg)


def parse_value(text: str, kind: type | None) -> Any:
    """A command-line value as the field's type: strings as written, everything else as a Python literal."""
    if text == "None":
        return None
    if kind is str:
        return text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" else text
    if kind is bool and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError):
        raise ConfigError(f"{text!r} is not {kind.__name__ if kind else 'a Python literal'}") from None


def set_model_fields(config: ml_collections.ConfigDict, assignments: dict[str, str]) -> None:
    """Applies command-line `--config.model.FIELD=VALUE` assignments (values as typed), `name` first.

    A new name builds the new model's config; fields the config file had changed from the old
    variant carry over where the new model has them.
    """
    assignments = dict(assignments)
    with config.unlocked():
        if "name" in assignments:
            name = parse_value(assignments.pop("name"), str)
            if name != config.model.name:
                _, carried = model_changes(config.model)
                kept = {k: v for k, v in carried.items() if k in _variant_fields(name)}
                config.model = model_config(name, **kept)
        for key, text in assignments.items():
            if key not in config.model:
                close = difflib.get_close_matches(key, list(config.model.keys()), n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"model {config.model.name!r} has no field {key!r} (--config.model.{key}).{hint}")
            kind = config.model.get_ref(key).get_type()
            try:
                config.model[key] = parse_value(text, kind)
            except (TypeError, ConfigError) as error:
                raise ConfigError(f"--config.model.{key}={text}: {key} takes {kind.__name__} values "
                                  f"(now {config.model[key]!r}); {error}") from None


def check_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None,
               prefix: str = "") -> None:
    """Fails on any key the defaults do not know, naming the closest known ones (config.model: its fields)."""
    reference = reference or default_config()
    for key, value in config.items():
        path = f"{prefix}{key}"
        if path in RENAMED_KEYS:
            raise ConfigError(f"config.{path} no longer exists: {RENAMED_KEYS[path]}.")
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference.keys()), n=3)
            hint = f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key {path!r}.{hint}")
        if path == "model":
            model_changes(value)
        elif isinstance(value, ml_collections.ConfigDict):
            check_keys(value, reference[key], f"{path}.")


def check_values(config: ml_collections.ConfigDict) -> None:
    """Fails early on values that would only break deep inside the run."""
    if config.dtype not in DTYPES:
        raise ConfigError(f"config.dtype={config.dtype!r}; choose one of {tuple(DTYPES)}.")
    if config.remat not in REMAT:
        raise ConfigError(f"config.remat={config.remat!r}; choose one of {REMAT}.")
    if len(config.mesh_shape) != 3:
        raise ConfigError(f"config.mesh_shape={tuple(config.mesh_shape)} needs three sizes ('data', 'fsdp', 'tensor').")
    if config.grad_accum_steps < 1:
        raise ConfigError("config.grad_accum_steps must be >= 1.")
    if config.total_steps <= 0 and config.num_epochs <= 0:
        raise ConfigError("set config.num_epochs > 0 or config.total_steps > 0.")
    if config.log_every <= 0 or config.checkpoint_every <= 0:
        raise ConfigError("config.log_every and config.checkpoint_every must be positive.")
    if config.mode not in MODES:
        raise ConfigError(f"config.mode={config.mode!r}; choose one of {MODES}.")
    if config.mode == "eval" and not config.init_from:
        raise ConfigError("config.mode='eval' scores config.init_from: set it to a checkpoint file or a run's workdir.")
    if config.head_loss not in HEAD_LOSSES:
        raise ConfigError(f"config.head_loss={config.head_loss!r}; choose one of {HEAD_LOSSES}.")
    if config.profile_steps and not (len(config.profile_steps) == 2 and 0 < config.profile_steps[0]
                                     <= config.profile_steps[1]):
        raise ConfigError(f"config.profile_steps={tuple(config.profile_steps)}: give (first, last) train steps, "
                          "1 <= first <= last, e.g. (10, 15).")
    if not 0 < config.layer_decay <= 1:
        raise ConfigError(f"config.layer_decay={config.layer_decay}: choose 0 < layer_decay <= 1 (1 turns it off).")
    for key in ("no_decay", "freeze"):
        for pattern in config[key]:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ConfigError(f"config.{key}: {pattern!r} is not a regular expression ({error}).") from None
