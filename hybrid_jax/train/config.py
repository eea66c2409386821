"""Every key a training run reads, with its default; experiment configs override these.

One source of truth: `configs/*.py` start from `default_config()`, so a key that is
not here does not exist, and `--config.key=value` on the command line is checked
against this list (with close matches suggested) before anything runs.
"""

import ast
import difflib
from typing import Any

import ml_collections

DTYPES = ("float32", "bfloat16")
TASKS = ("classification", "reid")
REID_DISTANCES = ("cosine", "euclidean")
HEAD_LOSSES = ("each", "mean")


def default_config() -> ml_collections.ConfigDict:
    """The defaults for a classification run, and the re-ID settings under `reid`."""
    c = ml_collections.ConfigDict()
    c.task = "classification"  # classification | reid (person re-identification, hybrid_jax.reid)
    c.model = "test_resnet"  # any name in hybrid_jax.list_models()
    # Fields of the model to change, as keyword arguments: "drop_path_rate=0.1, hybrid_layers=(2,)".
    # A string, so that the command line can set fields the config file does not mention.
    c.model_overrides = ""
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 (params and loss stay float32)

    c.dataset = "fashion_mnist"  # tfds name; fashion_mnist is built offline from the Debian package
    c.data_dir = ""  # tfds data dir; "" means $TFDS_DATA_DIR or ~/tensorflow_datasets
    # Where datasets that cannot be downloaded are read from on first use (market1501, dukemtmc_reid,
    # msmt17: the extracted folder); "" means {data_dir}/downloads/manual.
    c.manual_dir = ""
    c.train_split = "train"
    c.eval_split = "test"
    c.train_fraction = 1.0  # keep the first fraction of the train split (dataset-size ablations)
    c.resize = ()  # (H, W) to resize images to on the host; () keeps the stored size
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
    c.no_decay_names = ("pos_embed", "cls_token", "dist_token", "tokens", "relative_position_bias_table", "rel_pos")

    c.augment = ml_collections.ConfigDict()
    c.augment.random_resized_crop = False  # crops back to the input size
    c.augment.crop_scale = (0.08, 1.0)
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


def check_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None,
               prefix: str = "") -> None:
    """Fails on any key the defaults do not know, naming the closest known ones."""
    reference = reference or default_config()
    for key, value in config.items():
        path = f"{prefix}{key}"
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference.keys()), n=3)
            hint = f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key {path!r}.{hint}")
        if isinstance(value, ml_collections.ConfigDict):
            check_keys(value, reference[key], f"{path}.")


def check_values(config: ml_collections.ConfigDict) -> None:
    """Fails early on values that would only break deep inside the run."""
    if config.dtype not in DTYPES:
        raise ConfigError(f"config.dtype={config.dtype!r}; choose one of {DTYPES}.")
    if len(config.mesh_shape) != 3:
        raise ConfigError(f"config.mesh_shape={tuple(config.mesh_shape)} needs three sizes ('data', 'fsdp', 'tensor').")
    if config.grad_accum_steps < 1:
        raise ConfigError("config.grad_accum_steps must be >= 1.")
    if config.total_steps <= 0 and config.num_epochs <= 0:
        raise ConfigError("set config.num_epochs > 0 or config.total_steps > 0.")
    if config.log_every <= 0 or config.checkpoint_every <= 0:
        raise ConfigError("config.log_every and config.checkpoint_every must be positive.")
    if config.head_loss not in HEAD_LOSSES:
        raise ConfigError(f"config.head_loss={config.head_loss!r}; choose one of {HEAD_LOSSES}.")
    if config.task not in TASKS:
        raise ConfigError(f"config.task={config.task!r}; choose one of {TASKS}.")
    if config.task == "reid":
        _check_reid_values(config)


def _check_reid_values(config: ml_collections.ConfigDict) -> None:
    k = config.reid.images_per_identity
    if k < 2 or config.batch_size % k:
        raise ConfigError(f"config.batch_size={config.batch_size} must be a multiple of config.reid."
                          f"images_per_identity={k} (>= 2, so every image has a positive for the triplet loss).")
    if config.augment.mixup_alpha or config.augment.cutmix_alpha:
        raise ConfigError("config.augment.mixup_alpha and cutmix_alpha must be 0 for re-ID: a blended image has no "
                          "single identity for the triplet loss.")
    if config.reid.distance not in REID_DISTANCES:
        raise ConfigError(f"config.reid.distance={config.reid.distance!r}; choose one of {REID_DISTANCES}.")


def parse_overrides(text: str) -> dict[str, Any]:
    """Turns "depth=4, hybrid_layers=(2,)" into keyword arguments; values are Python literals."""
    if not text.strip():
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        if call.args:
            raise ValueError("every item needs a name: field=value")
        return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as error:
        raise ConfigError(f"config.model_overrides={text!r} is not a list of field=value with Python literal "
                          f"values, e.g. \"drop_path_rate=0.1, hybrid_layers=(2,)\" ({error}).") from error
