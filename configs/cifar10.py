"""CIFAR-10 (or CIFAR-100 with the argument "cifar100") through the same tfds + grain path.

python -m hybrid_jax.main --config configs/cifar10.py --workdir runs/cifar10
python -m hybrid_jax.main --config configs/cifar10.py:cifar100 --workdir runs/cifar100

tfds builds CIFAR from numpy arrays, which needs TensorFlow and internet once:
`tfds build cifar10 --file_format=array_record` on a machine that has both, then
copy the directory into $TFDS_DATA_DIR (the run's error message says the same).
"""

from hybrid_jax.train.config import default_config, model_config


def get_config(arg: str | None = None):
    """`arg`: "cifar10" (default) or "cifar100"."""
    c = default_config()
    c.dataset = arg or "cifar10"
    if c.dataset not in ("cifar10", "cifar100"):
        raise ValueError(f"unknown config argument {arg!r}; use 'cifar10' or 'cifar100'")
    c.model = model_config("resnet18")
    c.batch_size = 256
    c.num_epochs = 100.0
    c.learning_rate = 2e-3
    c.warmup_steps = 1000
    c.weight_decay = 0.05
    c.label_smoothing = 0.1
    c.ema_decay = 0.9998
    c.augment.random_resized_crop = True
    c.augment.crop_scale = (0.35, 1.0)
    c.augment.randaug_num_ops = 2
    c.augment.randaug_magnitude = 9.0
    c.augment.mixup_alpha = 0.2
    c.augment.cutmix_alpha = 1.0
    c.augment.mean = (0.491, 0.482, 0.447)  # CIFAR-10 pixel statistics
    c.augment.std = (0.247, 0.243, 0.262)
    c.dtype = "bfloat16"
    c.log_every = 100
    c.checkpoint_every = 2000
    return c
